"""The accuracy script prints one row per loss and regime and a worst case within bound."""

import re

from tests.losses import accuracy as accuracy_losses


def test_main_prints_every_loss_and_a_bounded_worst_case(capsys):
  accuracy_losses.main(["--cases", "3", "--classes", "2", "8"])
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
  assert len(rows) == (
    len(accuracy_losses.CASES) * len(accuracy_losses.REGIMES)
    + 1
    + 2 * len(accuracy_losses.HIERARCHICAL_REGIMES)
    + 2 * len(accuracy_losses.TREE_REGIMES)
  )
  worst = float(re.search(r"worst case over all losses: ([0-9.]+)", out).group(1))
  assert 0.0 < worst <= 4.0
