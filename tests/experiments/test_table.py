"""``jaxsoftmax-table``: every regime under every protocol from one command, on tiny runs."""

import importlib.metadata
import json

import numpy as np
import pytest
from kinds_common import TINY_CLASSIFIER

from jaxsoftmax_experiments import loop, table

TINY = ["--config=feedback_digits", *TINY_CLASSIFIER, "--progress=false"]
REGIMES = "--config.regimes=('positive_only', 'forward', 'mcl_log')"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  root = tmp_path_factory.mktemp("table")
  assert table.main([*TINY, REGIMES, f"--workdir={root}", "--protocols=uniform,feedback"]) == 0
  return root, json.loads((root / "table.json").read_text())


def test_the_table_holds_each_protocols_results(made):
  root, got = made
  assert list(got["protocols"]) == ["uniform", "feedback"]
  for protocol, entry in got["protocols"].items():
    results = json.loads((root / protocol / "results.json").read_text())
    assert entry["regimes"] == results["regimes"]
    assert results["config"]["protocol"] == protocol
    assert entry["wall_seconds"] > 0
  # forward needs the transition matrix: trained under uniform, left out under feedback
  # with the config check's reason.
  assert list(got["protocols"]["uniform"]["regimes"]) == ["positive_only", "forward", "mcl_log"]
  assert list(got["protocols"]["feedback"]["regimes"]) == ["positive_only", "mcl_log"]
  assert "transition matrix" in got["protocols"]["feedback"]["left_out"]["forward"]


def test_the_markdown_has_a_row_per_regime_and_the_cells_of_the_json(made):
  root, got = made
  text = (root / "table.md").read_text()
  row = next(l for l in text.splitlines() if l.startswith("| forward |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[2] == "n/a"
  mean = np.mean(got["protocols"]["uniform"]["regimes"]["forward"]["test_accuracy"])
  assert cells[1].startswith(f"{mean:.4f} ± ")
  assert "| uniform | 6 |" in text and "| feedback | 4 |" in text  # runs: regimes x seeds


def test_rerunning_the_same_command_trains_nothing_again(made, capsys):
  root, got = made
  before = {p: (root / p / "metrics.jsonl").read_text() for p in got["protocols"]}
  table_md = (root / "table.md").read_bytes()
  assert table.main([*TINY, REGIMES, f"--workdir={root}", "--protocols=uniform,feedback"]) == 0
  assert "is complete" in capsys.readouterr().out
  assert {p: (root / p / "metrics.jsonl").read_text() for p in got["protocols"]} == before
  # Before: the rerun rewrote table.md with "Whole command: 1.1 s".
  assert (root / "table.md").read_bytes() == table_md


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--protocols=uniform,supervisedd", "--protocols: must be a comma-separated list"),
    ("--config.protocol=uniform", "--config.protocol: the table runs every protocol"),
  ],
)
def test_bad_flags_are_refused_before_anything_runs(tmp_path, capsys, flag, message):
  assert table.main([*TINY, f"--workdir={tmp_path / 'w'}", flag]) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_feedback_rounds_gather_each_inputs_wrong_predictions_into_one_set():
  from jaxsoftmax_experiments import config as config_lib
  from jaxsoftmax_experiments import data, protocols

  c = config_lib.defaults()
  c.dataset, c.hidden, c.steps, c.eval_every, c.num_seeds = "synthetic", (8,), 5, 5, 2
  c.initial_steps, c.num_labeled, c.feedback_rounds = 5, 50, 3
  c.regimes = ("complement_likelihood",)
  config_lib.validate(c)
  plan = loop.make_plan(c, data.load("synthetic"))
  *_, last = loop.run(plan)
  ex = loop.light(last, examples=True).examples[0]
  kind, label, wrong = (
    np.asarray(a).reshape(2, 3, -1, *np.shape(a)[2:]) for a in (ex.kind, ex.label, ex.wrong)
  )
  negative = kind == protocols.NEGATIVE
  assert negative.sum(axis=1).max() == 1  # at most one negative example per input
  y = np.asarray(plan.dataset.y_train)
  for s, r, i in zip(*np.nonzero(negative)):
    members = [int(label[s, r, i]), *[int(w) for w in wrong[s, r, i] if w >= 0]]
    assert len(set(members)) == len(members) and y[i] not in members
    assert len(members) <= r + 1  # one wrong prediction per round at most
  assert wrong.max() >= 0  # some input was wrong in two rounds


def test_console_script_is_installed():
  scripts = importlib.metadata.entry_points(group="console_scripts")
  assert scripts["jaxsoftmax-table"].value == "jaxsoftmax_experiments.table:cli"
