"""kvtier sets a short OpenMP spin (GOMP_SPINCOUNT) before torch loads, unless the user set one.

The effect itself (steps 2-5x slower under CPU contention without it) is a benchmark figure
(README, "CPU threads"), not a timed assert; these tests pin down when the default applies.
"""
from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import kvtier, torch, os; torch.ones(4).sum(); print(os.environ.get('GOMP_SPINCOUNT'))"


def _spincount_seen(extra: dict[str, str], code: str = PROBE) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | extra
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_kvtier_sets_a_short_spin():
    assert _spincount_seen({}) == "1000"


def test_a_value_the_user_set_is_kept():
    assert _spincount_seen({"GOMP_SPINCOUNT": "77"}) == "77"


def test_the_cli_gets_the_default():
    code = "import sys, os; import kvtier.engine.cli; print(os.environ.get('GOMP_SPINCOUNT'))"
    assert _spincount_seen({}, code) == "1000"
