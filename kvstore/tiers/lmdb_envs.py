"""One LMDB environment per directory per process, shared by every tier opened on it.

LMDB forbids opening the same environment twice in one process: closing the second handle
drops the first one's file locks (POSIX advisory locks are per process). So tiers acquire
the environment here and release it when closed; the last release closes it. Other
processes open their own handle, which LMDB supports (lock=True: its lock file coordinates
readers and serializes writers across processes).
"""
from __future__ import annotations

import os
import threading

import lmdb

_lock = threading.Lock()
_envs: dict[str, list] = {}  # real path -> [environment, users]


def acquire_env(path: str, map_size: int, sync: bool) -> lmdb.Environment:
    """The process's environment for `path`, opened on first use (first opener's settings)."""
    real = os.path.realpath(path)
    with _lock:
        entry = _envs.get(real)
        if entry is None:
            os.makedirs(real, exist_ok=True)
            env = lmdb.open(
                real,
                map_size=map_size,
                max_dbs=4,
                subdir=True,
                lock=True,
                readahead=False,  # random block reads; readahead only evicts useful page cache
                meminit=False,  # values are written in full, no need to zero buffers
                metasync=False,  # data pages are synced; a crash loses at most the last commit
                sync=sync,
                max_readers=512,
            )
            # Free the reader slots of processes that died mid-read (SIGKILL, OOM): their
            # snapshots would otherwise pin old pages forever and fill the map.
            env.reader_check()
            entry = _envs[real] = [env, 0]
        entry[1] += 1
        return entry[0]


def release_env(path: str) -> None:
    real = os.path.realpath(path)
    with _lock:
        entry = _envs.get(real)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _envs[real]
            entry[0].close()
