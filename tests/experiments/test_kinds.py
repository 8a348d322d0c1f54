"""The one command line's up-front checks for every kind, each a reproduction of what a
user met when the language model and the multi-label study had command lines of their
own (the per-kind resume and completion tests: ``test_kind_*.py``)."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kinds_common import KINDS, QUIET

from jaxsoftmax_experiments import run
from jaxsoftmax_experiments import workdir as workdir_lib

ROOT = Path(__file__).resolve().parents[2]


# --- up-front refusals: a message naming the key, nothing written ---------------------------


@pytest.mark.parametrize(
  "kind, extra, message",
  [
    (
      "lm",
      [
        "--config.prompt=4",
        "--config.generate=4",
        "--config.length=8",
        "--config.experiment=repetition",
        "--config.regimes=('positive_only',)",
        "--config.num_prompts=400",
      ],
      "config.num_prompts: the validation text has",
    ),
    ("lm", ["--config.forget=64"], "config.forget: must leave a training topic to retain"),
    ("lm", ["--config.length=3000"], "config.length: every split needs a window"),
    ("lm", ["--config.seed=18446744073709551616"], "config.seed"),
    ("lm", ["--config.batch_size=100000000"], "config.batch_size: the runs need about"),
    ("lm", ["--config.width=4194304", "--config.heads=1"], "config.width: the runs need about"),
    (
      "lm",
      ["--config.num_seeds=100000", "--config.width=512", "--config.heads=4"],
      "config.num_seeds: the runs need about",
    ),
    ("lm", ["--config.step=20"], "config.step: unknown key"),
    ("lm", ["--config.head=maybe"], "config.head: must be one of fused, softmax"),
    ("lm", ["--config.protocol=uniform"], "--config.protocol: a key of kind classifier"),
    (
      "lm",
      ["--config.regimes=('npo', 'mle')"],
      "config.regimes: must be a non-empty tuple of distinct names from positive_only",
    ),
    (
      "lm",
      ["--config.experiment=repetition", "--config.regimes=('npo',)", "--config.prompt=4"],
      "'npo' needs a reference model, which repetition has not (unlearning and feedback have)",
    ),
    ("multilabel", ["--config.hidden=(0,)"], "config.hidden: must be a tuple of positive ints"),
    ("lm", ["--config.regimes=('sigmoid',)"], "'sigmoid' needs several true labels per example"),
    (
      "classifier",
      ["--config.regimes=('sigmoid',)"],
      "config.regimes: must be a non-empty tuple of distinct names from positive_only",
    ),
    ("multilabel", ["--config.regimes=('npo',)"], "config.regimes: must be a non-empty tuple"),
    ("multilabel", ["--config.alpha=2.0"], "--config.alpha: a key of kind lm"),
    ("classifier", ["--config.alpha=2.0"], "--config.alpha: a key of kind lm"),
  ],
)
def test_bad_configs_of_every_kind_are_refused_naming_the_key(
  kind, extra, message, tmp_path, capsys
):
  workdir = tmp_path / "out"
  # The language model's refusals are measured against help_topics' own sizes.
  data = ["--config.dataset=help_topics", "--config.forget=4"] if kind == "lm" else []
  assert run.main([*KINDS[kind], *data, *extra, f"--workdir={workdir}", *QUIET]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err, err
  assert not workdir.exists()


def _multilabel_npz(path, **arrays):
  rng = np.random.default_rng(0)
  base = {
    f"x_{s}": rng.normal(size=(n, 4)).astype(np.float32)
    for s, n in (("train", 60), ("val", 20), ("test", 20))
  }
  base.update(
    {f"y_{s}": rng.random((n, 3)) < 0.4 for s, n in (("train", 60), ("val", 20), ("test", 20))}
  )
  base.update(arrays)
  np.savez(path, **base)
  return f"--config.dataset=npz:{path}"


@pytest.mark.parametrize(
  "arrays, message",
  [
    (
      {"x_train": np.where(np.eye(60, 4, 2) > 0, np.nan, 0).astype(np.float32)},
      "x_train[0, 2] = nan is not finite",
    ),
    ({"x_test": np.full((20, 4), np.inf, np.float32)}, "x_test[0, 0] = inf is not finite"),
    ({"y_train": np.zeros((60, 0), bool)}, "y_train: a label mask needs at least one class"),
    ({"y_test": np.zeros((20, 3), bool)}, "y_test has no positive label"),
    (  # before: "cannot reshape array of size 0" in a traceback
      {"x_train": np.zeros((0, 4), np.float32), "y_train": np.zeros((0, 3), bool)},
      "x_train holds no examples (shape (0, 4)); every split needs one.",
    ),
  ],
)
def test_a_bad_multilabel_npz_is_named_before_anything_trains(arrays, message, tmp_path, capsys):
  flag = _multilabel_npz(tmp_path / "bad.npz", **arrays)
  workdir = tmp_path / "out"
  assert run.main([*KINDS["multilabel"], flag, f"--workdir={workdir}", *QUIET]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err, err
  assert not workdir.exists()


def test_a_users_text_file_trains_the_language_model(tmp_path):
  from pydoc_data.topics import topics

  text = "\n\n".join(topics[name] for name in sorted(topics)[:30])
  path = tmp_path / "notes.txt"
  path.write_text(text, encoding="utf-8")
  workdir = tmp_path / "mine"
  extra = ["--config.regimes=('complement_likelihood',)", "--config.steps=10"]
  assert (
    run.main(
      [
        *KINDS["lm"],
        f"--config.dataset=text:{path}",
        "--config.forget=2",
        *extra,
        f"--workdir={workdir}",
        *QUIET,
      ]
    )
    == 0
  )
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"]["dataset"] == f"text:{path}"
  assert results["data"]["train_windows"] > 0 and len(results["data"]["forget_topics"]) == 2
  short = tmp_path / "short.txt"
  short.write_text("one paragraph\n\nand another", encoding="utf-8")
  assert (
    run.main(
      [*KINDS["lm"], f"--config.dataset=text:{short}", f"--workdir={tmp_path / 'no'}", *QUIET]
    )
    == 2
  )


def test_a_config_json_that_is_no_file_is_refused_at_once(tmp_path, capsys):
  workdir = tmp_path / "zero"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("")
  (workdir / "config.json").symlink_to("/dev/zero")
  assert run.main([*KINDS["classifier"], f"--workdir={workdir}", *QUIET]) == 2
  assert "config.json cannot be read (it is not a regular file)" in capsys.readouterr().err


def test_a_disk_that_fills_before_the_first_write_is_a_message(tmp_path, capsys, monkeypatch):
  def full(self, resolved):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(workdir_lib.Workdir, "write_config", full)
  workdir = tmp_path / "full"
  assert run.main([*KINDS["lm"], f"--workdir={workdir}", *QUIET]) == 1
  err = capsys.readouterr().err
  assert "No space left on device" in err and "Traceback" not in err
  assert not (workdir / "config.json").exists()


def test_help_names_the_kinds_configs_and_variants(capsys):
  assert run.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name in (
    "lm_repetition",
    "lm_unlearning",
    "multilabel_canvases",
    "multilabel_generated",
    "feedback_digits",
    "feedback_digits:head",
    "hierarchical",
    "mnist1d_supervised:model",
  ):
    assert name in out, name
  assert "--config.alpha" in out and "--config.collapse" in out
  assert run.main(["--config=lm_unlearning", "--help"]) == 0
  only_lm = capsys.readouterr().out
  assert "--config.alpha" in only_lm and "--config.protocol" not in only_lm


def test_an_unknown_config_name_lists_the_packaged_ones(tmp_path, capsys):
  assert run.main(["--config=nonexistent", f"--workdir={tmp_path / 'x'}"]) == 2
  err = capsys.readouterr().err
  assert "lm_repetition" in err and "feedback_digits" in err


@pytest.mark.parametrize(
  "script, config",
  [("jaxsoftmax-lm", "lm_repetition"), ("jaxsoftmax-multilabel", "multilabel_canvases")],
)
def test_the_aliases_default_their_config(script, config):
  path = Path(sys.executable).with_name(script)
  out = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and f"usage: {script}" in out.stdout
  assert (
    "--config.experiment" in out.stdout
    if script == "jaxsoftmax-lm"
    else ("--config.protocol" not in out.stdout)
  )


def test_distributed_without_a_cluster_is_one_message(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxsoftmax_experiments.run",
      *KINDS["classifier"],
      f"--workdir={tmp_path / 'd'}",
      "--distributed",
      *QUIET,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "--distributed" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def _lm_tree(path, workdir):
  return [
    "--config=lm_unlearning",
    f"--config.dataset=text:{path}",
    "--config.head=tree",
    "--config.steps=20",
    "--config.eval_every=10",
    "--config.num_seeds=2",
    "--config.initial_steps=20",
    "--config.forget=2",
    f"--workdir={workdir}",
    *QUIET,
  ]


def test_the_language_models_tree_head_on_a_vocabulary_of_three_and_of_unk_alone(tmp_path, capsys):
  # A vocabulary of 3 (<unk>, a, b): a Huffman tree whose node count equals its depth,
  # whose path logits were read as the node table. <unk> alone: a one-class tree, refused.
  rng = np.random.default_rng(0)
  three = tmp_path / "ab.txt"
  three.write_text("\n\n".join(" ".join(rng.choice(["a", "b"], 60)) for _ in range(20)))
  assert run.main(_lm_tree(three, tmp_path / "three")) == 0
  assert "vocabulary 3" in (tmp_path / "three" / "summary.md").read_text()
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = ["".join(rng.choice(letters, 10)) for _ in range(800)]  # each word once
  alone = tmp_path / "unk.txt"
  alone.write_text("\n\n".join(" ".join(words[i * 40 : (i + 1) * 40]) for i in range(20)))
  assert run.main(_lm_tree(alone, tmp_path / "alone")) == 2
  err = capsys.readouterr().err
  assert "config.head: the tree head needs at least 2 classes" in err and "Traceback" not in err
  assert not (tmp_path / "alone").exists()
