"""The accuracy script prints one row per loss and regime and a worst case within bound,
compiled as a user's program is: with XLA's defaults, not the suite's cheaper code
generators (``SUITE_XLA_FLAGS`` in the root conftest.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.losses import accuracy as accuracy_losses

ROOT = Path(__file__).resolve().parents[2]


def test_main_prints_every_loss_and_a_bounded_worst_case():
  env = {**os.environ, "XLA_FLAGS": ""}
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    env.pop(name, None)  # the suite's cache holds programs built with the suite's flags
  command = [sys.executable, "-m", "tests.losses.accuracy", "--cases", "3", "--classes", "2", "8"]
  out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  out = out.stdout
  first, second = out.split("Second derivatives")
  rows = [line for line in first.splitlines() if line.startswith("| ") and "---" not in line][1:]
  assert len(rows) == (
    len(accuracy_losses.CASES) * len(accuracy_losses.REGIMES)
    + 1
    + 2 * len(accuracy_losses.HIERARCHICAL_REGIMES)
    + 2 * len(accuracy_losses.TREE_REGIMES)
    + len(accuracy_losses.SEQUENCE_CASES) * len(accuracy_losses.SEQUENCE_REGIMES)
  )
  worst = float(re.search(r"worst case over all losses: ([0-9.]+)", out).group(1))
  assert 0.0 < worst <= 4.0
  # Every Hessian entry (reverse over reverse and forward over reverse) against mpmath: at
  # most 4 ulps per unit of (1 + cond), as the first derivatives (0.62 in the full run).
  # Before the partition kernel's exact second-order rule, nll's entries at p(S) -> 1 were
  # 5.7e6 ulps off (an exact 0 for ~2e-9, logits [20, 0, 0], label 1) reverse over reverse.
  rows = [line for line in second.splitlines() if line.startswith("| ") and "---" not in line][1:]
  assert len(rows) == len(accuracy_losses.HESSIAN_CASES) * len(accuracy_losses.REGIMES) * 2
  worst = float(re.search(r"worst second derivative: ([0-9.]+)", out).group(1))
  assert 0.0 < worst <= 4.0
