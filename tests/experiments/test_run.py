"""The command line: a short feedback run on digits, its outputs, and bad input.

The feedback run is the default config shortened (300 steps, 3 seeds); its expected
outcome is the one stated in the experiment issue, not tuned to this run.
"""

import importlib.metadata
import json
import os

import numpy as np
import pytest
from kinds_common import TINY_CLASSIFIER

from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import report, run

CONFIG = "feedback_digits"
SHORT = ["--config.steps=300", "--config.num_seeds=3", "--progress=false"]
TINY = [*TINY_CLASSIFIER, "--progress=false"]


@pytest.fixture(scope="module")
def feedback_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("feedback_digits")
  assert run.main([f"--config={CONFIG}", f"--workdir={workdir}", *SHORT]) == 0
  results = json.loads((workdir / "results.json").read_text())
  return workdir, results


def test_complement_beats_positive_only_and_negated_falls_below(feedback_run):
  _, results = feedback_run
  acc = {r: np.mean(v["test_accuracy"]) for r, v in results["regimes"].items()}
  assert acc["complement_likelihood"] > acc["positive_only"]
  assert acc["negated_gradient"] < acc["positive_only"]
  neg = results["regimes"]["negated_gradient"]
  for diverged, loss in zip(neg["diverged"], neg["train_loss"]):
    assert diverged or loss < 0


def test_results_json_has_the_documented_fields(feedback_run):
  workdir, results = feedback_run
  assert set(results["regimes"]) == {"positive_only", "negated_gradient", "complement_likelihood"}
  for r in results["regimes"].values():
    for key in ("test_accuracy", "test_nll", "diverged", "diverged_at_step"):
      assert len(r[key]) == 3
    for diverged, at in zip(r["diverged"], r["diverged_at_step"]):
      assert isinstance(diverged, bool)
      assert (at is None) == (not diverged) and (at is None or 1 <= at <= 300)
    assert all(p + n <= 1347 for p, n in zip(r["num_positive"], r["num_negative"]))
  assert results["config"] == json.loads((workdir / "config.json").read_text())
  assert results["config"]["steps"] == 300
  assert results["num_devices"] == 1  # 15 runs and batch 128 on this machine's one CPU device
  timing = json.loads((workdir / "timing.json").read_text())
  assert timing["wall_seconds"] > 0 and timing["resumed_from_step"] is None
  assert not list(workdir.glob(".*tmp*"))  # no temporary files left behind


def test_feedback_examples_cover_every_training_input_once(feedback_run):
  _, results = feedback_run
  for r in results["regimes"].values():
    # One round: the 100 labeled inputs and every judged prediction, 1347 in all.
    assert [p + n for p, n in zip(r["num_positive"], r["num_negative"])] == [1347] * 3
    assert all(p >= 100 for p in r["num_positive"])


def test_metrics_jsonl_ends_with_the_results(feedback_run):
  workdir, results = feedback_run
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == (1 + 300 // 100) * 3 * 3  # evaluations x regimes x seeds
  assert sorted({l["step"] for l in lines}) == [0, 100, 200, 300]
  last = [l for l in lines if l["step"] == 300]
  for regime, r in results["regimes"].items():
    mine = sorted((l for l in last if l["regime"] == regime), key=lambda l: l["seed"])
    assert [l["test_accuracy"] for l in mine] == r["test_accuracy"]
  for key in ("test_accuracy", "test_nll", "train_loss", "max_logit", "param_norm"):
    assert key in lines[-1]


def test_summary_and_curves(feedback_run):
  workdir, results = feedback_run
  summary = (workdir / "summary.md").read_text()
  for regime, r in results["regimes"].items():
    a = np.array(r["test_accuracy"])
    row = next(l for l in summary.splitlines() if l.startswith(f"| {regime} |"))
    assert f"{a.mean():.4f} ± {a.std(ddof=1):.4f}" in row
    assert f"| {sum(r['diverged'])}/3" in row
  assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.stepz=3"], "config.stepz: unknown key"),
    (["--config.steps=0"], "config.steps: must be an int >= 1"),
    (["--config.steps=abc"], "--config.steps=abc"),
    (["--config.regimes=('unlikelihood',)"], "config.regimes"),
    (["--config.num_labeled=5000"], "config.num_labeled: must be at most the 1347"),
    (["--config.protocol=uniform", "--config.feedback_rounds=2"], "config.feedback_rounds"),
    (["--bogus=1"], "bogus"),
  ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
  workdir = tmp_path / "out"
  assert run.main([f"--config={CONFIG}", f"--workdir={workdir}", *args]) == 2
  assert message in capsys.readouterr().err
  assert not workdir.exists()


def test_missing_flags_and_config_file(tmp_path, capsys):
  assert run.main([f"--workdir={tmp_path / 'a'}"]) == 2
  assert "--config is required" in capsys.readouterr().err
  assert run.main([f"--config={CONFIG}"]) == 2
  assert "--workdir is required" in capsys.readouterr().err
  assert run.main(["--config=configs/none.py", f"--workdir={tmp_path / 'a'}"]) == 2
  assert "cannot load --config" in capsys.readouterr().err
  assert not (tmp_path / "a").exists()


def test_a_workdir_with_a_run_is_kept_unless_overwrite(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "results.json").write_text('{"earlier": true}\n')
  assert run.main([f"--config={CONFIG}", f"--workdir={workdir}", *TINY]) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert (workdir / "results.json").read_text() == '{"earlier": true}\n'
  assert run.main([f"--config={CONFIG}", f"--workdir={workdir}", *TINY, "--overwrite"]) == 0
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"]["dataset"] == "synthetic"


def test_tiny_runs_of_every_protocol(tmp_path):
  for protocol in ("supervised", "uniform", "biased"):
    workdir = tmp_path / protocol
    assert (
      run.main(
        [f"--config={CONFIG}", f"--workdir={workdir}", *TINY, f"--config.protocol={protocol}"]
      )
      == 0
    )
    r = json.loads((workdir / "results.json").read_text())["regimes"]["positive_only"]
    # supervised: all 500 synthetic inputs positive; otherwise 50 labeled, 450 wrong labels.
    want = (500, 0) if protocol == "supervised" else (50, 450)
    assert (r["num_positive"], r["num_negative"]) == ([want[0]] * 2, [want[1]] * 2)


def test_hierarchical_head_runs_every_regime(tmp_path):
  workdir = tmp_path / "hierarchical"
  assert (
    run.main(
      [
        f"--config={CONFIG}:hierarchical",
        f"--workdir={workdir}",
        *TINY,
        "--config.steps=200",
        "--config.initial_steps=200",
        "--config.learning_rate=0.01",
      ]
    )
    == 0
  )
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"]["head"] == "hierarchical"
  assert (
    "Model mlp with a hierarchical softmax head, 2 seeds" in (workdir / "summary.md").read_text()
  )
  assert sorted(results["regimes"]) == sorted(config_lib.REGIMES)
  for regime in ("positive_only", "complement_likelihood"):
    accuracy = results["regimes"][regime]["test_accuracy"]
    assert all(a > 0.6 for a in accuracy), (regime, accuracy)  # chance on synthetic is 0.2


@pytest.mark.parametrize("tree, branching", [("huffman", 2), ("balanced", 3)])
def test_tree_head_runs_every_regime_and_sets_of_wrong_labels(tmp_path, tree, branching):
  workdir = tmp_path / "tree"
  assert (
    run.main(
      [
        f"--config={CONFIG}:tree",
        f"--workdir={workdir}",
        *TINY,
        "--config.steps=200",
        "--config.initial_steps=200",
        "--config.learning_rate=0.01",
        f"--config.tree={tree}",
        f"--config.branching={branching}",
      ]
    )
    == 0
  )
  results = json.loads((workdir / "results.json").read_text())
  assert (results["config"]["head"], results["config"]["tree"]) == ("tree", tree)
  assert (
    f"Model mlp with a {tree} tree head of branching {branching}, 2 seeds"
    in (workdir / "summary.md").read_text()
  )
  assert sorted(results["regimes"]) == sorted(config_lib.REGIMES)
  for regime in ("positive_only", "complement_likelihood"):
    accuracy = results["regimes"][regime]["test_accuracy"]
    assert all(a > 0.6 for a in accuracy), (regime, accuracy)  # chance on synthetic is 0.2
  # Two wrong labels per input: the tree's set losses.
  sets = tmp_path / "sets"
  assert (
    run.main(
      [
        f"--config={CONFIG}:tree",
        f"--workdir={sets}",
        *TINY,
        "--config.protocol=uniform",
        "--config.num_negatives=2",
        "--config.steps=200",
        "--config.learning_rate=0.01",
        f"--config.tree={tree}",
        f"--config.branching={branching}",
      ]
    )
    == 0
  )
  regimes = json.loads((sets / "results.json").read_text())["regimes"]
  assert all(a > 0.4 for a in regimes["complement_likelihood"]["test_accuracy"])


def test_the_fused_head_trains_the_classifier_as_the_softmax_head_does(tmp_path, capsys):
  runs = {}
  for head in ("softmax", "fused"):
    workdir = tmp_path / head
    assert (
      run.main(
        [
          f"--config={CONFIG}",
          f"--workdir={workdir}",
          *TINY,
          f"--config.head={head}",
          "--config.protocol=uniform",
          "--config.num_negatives=2",
        ]
      )
      == 0
    )
    runs[head] = json.loads((workdir / "results.json").read_text())["regimes"]
  # The same losses by another kernel: the same models up to float32 rounding (the
  # negated gradient may freeze at another step: the fused head reads an upper bound).
  for regime in ("positive_only", "complement_likelihood"):
    np.testing.assert_allclose(
      runs["fused"][regime]["test_nll"], runs["softmax"][regime]["test_nll"], rtol=1e-3
    )
  assert (
    run.main(
      [
        f"--config={CONFIG}",
        f"--workdir={tmp_path / 'no'}",
        *TINY,
        "--config.head=fused",
        "--config.protocol=uniform",
        "--config.regimes=('pc',)",
      ]
    )
    == 2
  )
  assert "'pc' needs the softmax head's logits" in capsys.readouterr().err


def test_two_feedback_rounds_add_examples_only_for_unresolved_inputs(tmp_path):
  workdir = tmp_path / "rounds"
  assert (
    run.main([f"--config={CONFIG}", f"--workdir={workdir}", *TINY, "--config.feedback_rounds=2"])
    == 0
  )
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert sorted({(l["round"], l["step"]) for l in lines}) == [
    (0, 0),
    (1, 10),
    (1, 20),
    (2, 30),
    (2, 40),
  ]
  for r in json.loads((workdir / "results.json").read_text())["regimes"].values():
    for p, n in zip(r["num_positive"], r["num_negative"]):
      assert p <= 500 and 500 <= p + n <= 1000


def test_console_script_is_installed():
  scripts = importlib.metadata.entry_points(group="console_scripts")
  assert scripts["jaxsoftmax-run"].value == "jaxsoftmax_experiments.run:cli"


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  path.write_text("old")
  monkeypatch.setattr(report.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError, match="disk full"):
    report.write_atomic(path, "new")
  assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_to_json_refuses_nan():
  with pytest.raises(ValueError):
    report.to_json({"loss": float("nan")})


def test_best_test_accuracy_is_the_best_evaluation_per_seed(feedback_run):
  workdir, results = feedback_run
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  for regime, r in results["regimes"].items():
    for seed, best in enumerate(r["best_test_accuracy"]):
      # Expected: the maximum over that run's lines in metrics.jsonl.
      assert best == max(
        l["test_accuracy"] for l in lines if l["regime"] == regime and l["seed"] == seed
      )


def test_write_atomic_gives_the_umask_permissions(tmp_path):
  old = os.umask(0o022)
  try:
    report.write_atomic(tmp_path / "results.json", "{}")
  finally:
    os.umask(old)
  # Expected: 0o666 & ~0o022, as open() would give; mkstemp alone gives 0o600.
  assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644


def test_twelve_regimes_get_twelve_colours():
  # Before: matplotlib's ten colours, so mcl_mae and positive_only shared one.
  assert len({str(c) for c in report.colours(12)}) == 12
  assert report.colours(3) == ["C0", "C1", "C2"]  # the default table keeps its colours


def test_an_override_given_twice_takes_its_last_value_for_tuples_as_for_scalars(tmp_path):
  # absl appends a tuple override's values to an earlier one's; a command line's later
  # override replaces the earlier one, as it does for a scalar key.
  fv, config = run.parse(
    [
      f"--config={CONFIG}",
      f"--workdir={tmp_path}",
      "--config.regimes=('positive_only','negated_gradient')",
      "--config.steps=7",
      "--config.regimes=('complement_likelihood',)",
      "--config.steps=9",
    ]
  )
  assert tuple(config.regimes) == ("complement_likelihood",)
  assert config.steps == 9
