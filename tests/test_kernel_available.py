"""`triton_available()`: true only where the kernels can run, and importing kvtier's kernel
package never imports triton. Checked in a fresh interpreter, since both depend on the
process's imports and environment."""
import json
import os
import subprocess
import sys

import torch

PROBE = r"""
import json, os, sys
if os.environ.get("HIDE_TRITON"):
    sys.modules["triton"] = None  # import triton now fails, as where it is not installed
import kvtier.engine.kernels as kernels
imported_early = "triton" in sys.modules and sys.modules["triton"] is not None
print(json.dumps({"imported_early": imported_early, "cpu": kernels.triton_available("cpu"),
                  "default": kernels.triton_available()}))
"""


def probe(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HIDE_TRITON")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_availability_follows_triton_and_the_interpreter():
    has_triton = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode == 0
    interpreted = probe(TRITON_INTERPRET="1")
    assert interpreted == {"imported_early": False, "cpu": has_triton, "default": has_triton}
    compiled = probe()
    assert compiled["imported_early"] is False
    assert compiled["cpu"] is False  # no interpreter: CPU tensors cannot run compiled kernels
    assert compiled["default"] == (has_triton and torch.cuda.is_available())
    missing = probe(TRITON_INTERPRET="1", HIDE_TRITON="1")
    assert missing == {"imported_early": False, "cpu": False, "default": False}
