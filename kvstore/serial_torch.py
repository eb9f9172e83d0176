"""Helper threads run their torch ops on themselves alone: an OpenMP team of one.

torch gives each thread that runs a parallel op (a copy or an elementwise op above its grain
size: an fp8 encode or decode, a block copy) an OpenMP team of its own. kvtier's loader,
writer and client-pool threads would each start one, and once a process holds more OpenMP
threads than cores libgomp spins only 100 times at a barrier whatever GOMP_SPINCOUNT says,
which slows every forward pass of the engine (README, "`kvtier serve` under load").

torch.set_num_threads(1) would not do: it also sets the count that every thread starting
torch work later inherits. The OpenMP runtime's own omp_set_num_threads changes the calling
thread alone, so that is what a helper thread calls, found in the runtime torch loaded.
"""
from __future__ import annotations

import ctypes
import functools
import re

import torch

_RUNTIME = re.compile(r"/lib(g|i|)omp[^/]*\.so[^/]*$")  # libgomp, libiomp5, libomp


@functools.lru_cache(maxsize=1)
def _omp_set_num_threads():
    """omp_set_num_threads of the OpenMP runtime mapped into this process, or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if _RUNTIME.search(line.rstrip())}
    except OSError:  # not Linux: helper threads keep torch's default
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


def serial_torch_thread() -> None:
    """Call first thing in a helper thread (a thread pool's initializer): its torch ops then
    run on it alone. Without an OpenMP runtime in the process it does nothing."""
    set_threads = _omp_set_num_threads()
    if set_threads is None:
        return
    # torch sets a thread's OpenMP count when the thread first asks for it; ours must come after.
    torch.get_num_threads()
    set_threads(1)
