"""Every kind through the one command line: resume, refusal, completion and the up-front
checks, each a reproduction of what a user met when the language model and the multi-label
study had command lines of their own."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxsoftmax_experiments import run
from jaxsoftmax_experiments import workdir as workdir_lib

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--progress=false", "--compilation_cache="]
# One tiny command per kind; each evaluates at steps 0, 10 and 20 and checkpoints at each.
KINDS = {
    "classifier": ["--config=feedback_digits", "--config.dataset=synthetic", "--config.steps=20",
                   "--config.eval_every=10", "--config.num_seeds=2", "--config.initial_steps=20",
                   "--config.num_labeled=50", "--config.hidden=(8,)", "--config.checkpoint_every=10"],
    "lm": ["--config=lm_unlearning", "--config.num_seeds=2", "--config.steps=20",
           "--config.eval_every=10", "--config.checkpoint_every=10", "--config.batch_size=4",
           "--config.length=8", "--config.width=16", "--config.depth=1", "--config.heads=2",
           "--config.vocab_chunk=256", "--config.initial_steps=20", "--config.learning_rate=1e-2"],
    "multilabel": ["--config=multilabel_generated", "--config.steps=20", "--config.eval_every=10",
                   "--config.checkpoint_every=10", "--config.num_seeds=2", "--config.hidden=(8,)"],
}


def _files(workdir):
  return {p.relative_to(workdir): p.read_bytes() for p in sorted(workdir.rglob("*"))
          if p.is_file() and "checkpoints" not in p.parts and p.name != ".lock"}


@pytest.fixture(scope="module", params=list(KINDS))
def finished(request, tmp_path_factory):
  workdir = tmp_path_factory.mktemp(request.param)
  args = [*KINDS[request.param], f"--workdir={workdir}", *QUIET]
  assert run.main(args) == 0
  return request.param, args, workdir, _files(workdir)


def _again(args, workdir, *extra):
  return [a for a in args if not a.startswith("--workdir=")] + [f"--workdir={workdir}", *extra]


def test_every_kind_writes_every_output_and_its_record(finished):
  _, _, workdir, files = finished
  assert set(workdir_lib.OUTPUTS) | {workdir_lib.RECORD} <= {str(p) for p in files}
  record = json.loads(files[Path(workdir_lib.RECORD)])["files"]
  assert set(record) == set(workdir_lib.OUTPUTS)
  lines = files[Path("metrics.jsonl")].decode().splitlines()
  assert {json.loads(l)["step"] for l in lines} == {0, 10, 20}


def test_every_kind_stopped_part_way_resumes_to_the_same_files(finished, tmp_path, monkeypatch):
  from jaxsoftmax_experiments import execute
  kind, args, source, files = finished
  workdir = tmp_path / "stopped"
  real = execute.Options
  monkeypatch.setattr(execute, "Options", lambda **k: real(**k, stop_after=2))
  assert run.main(_again(args, workdir)) == run.INTERRUPTED  # as Ctrl-C after step 10
  assert not (workdir / "results.json").exists()
  monkeypatch.undo()
  assert run.main(_again(args, workdir)) == 0
  resumed = _files(workdir)
  for name in ("results.json", "metrics.jsonl", "config.json", "summary.md"):
    if kind == "classifier" and name == "summary.md":
      continue  # the classifier's summary states this invocation's wall time
    assert resumed[Path(name)] == files[Path(name)], (kind, name)
  assert json.loads(resumed[Path("timing.json")])["resumed_from_step"] == 10


def test_every_kind_refuses_another_config_naming_the_key_and_overwrite_works(finished, capsys,
                                                                             tmp_path):
  import shutil
  kind, args, source, files = finished
  workdir = tmp_path / "copy"
  shutil.copytree(source, workdir)
  before = _files(workdir)
  assert run.main(_again(args, workdir, "--config.seed=7")) == 2
  err = capsys.readouterr().err
  assert "differing keys: seed (0 -> 7)" in err and "--overwrite" in err
  assert _files(workdir) == before
  # Before: jaxsoftmax-lm named --overwrite and then refused it as an unknown argument.
  assert run.main(_again(args, workdir, "--config.seed=7", "--overwrite")) == 0
  assert json.loads((workdir / "results.json").read_text())["config"]["seed"] == 7


def test_every_kind_rewrites_a_damaged_or_missing_output_of_a_finished_run(finished, tmp_path,
                                                                          capsys):
  import shutil
  kind, args, source, files = finished
  for damage in ("truncate metrics.jsonl", "garble results.json", "delete curves.png"):
    workdir = tmp_path / damage.replace(" ", "_")
    shutil.copytree(source, workdir)
    verb, name = damage.split(" ", 1)
    path = workdir / (workdir_lib.RECORD if name == "the record" else name)
    if verb == "delete":
      path.unlink()
    elif verb == "truncate":
      path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif verb == "garble":
      text = path.read_bytes()
      path.write_bytes(text[:10] + b"#" + text[11:])
    else:
      path.write_bytes(b"")
    capsys.readouterr()
    assert run.main(_again(args, workdir)) == 0, damage
    assert "nothing to do" not in capsys.readouterr().out, damage  # before: "complete"
    now = _files(workdir)
    for name in ("results.json", "metrics.jsonl", "config.json"):
      assert now[Path(name)] == files[Path(name)], (kind, damage, name)
    assert now[Path("curves.png")], damage
  # And now it is complete: the next rerun changes nothing.
  assert run.main(_again(args, workdir)) == 0 and _files(workdir) == now


def test_a_kill_while_the_outputs_are_written_leaves_a_run_that_finishes_them(
    finished, tmp_path, monkeypatch):
  import shutil
  kind, args, source, files = finished
  workdir = tmp_path / "killed"
  shutil.copytree(source, workdir)
  # As SIGKILL right after results.json: the later outputs and the record never came.
  for name in ("summary.md", "timing.json", "curves.png", workdir_lib.RECORD):
    (workdir / name).unlink()
  assert run.main(_again(args, workdir)) == 0
  assert {"summary.md", "timing.json", "curves.png", workdir_lib.RECORD} <= set(
      p.name for p in workdir.iterdir())


def test_a_start_that_fails_is_forgotten_for_every_kind(finished, tmp_path, monkeypatch):
  from jaxsoftmax_experiments import kinds
  kind, args, _, _ = finished
  workdir = tmp_path / "failed"
  module = kinds.get(kind)
  monkeypatch.setattr(module, "plan", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
  with pytest.raises(RuntimeError, match="bug"):
    run.main(_again(args, workdir))
  assert not (workdir / "config.json").exists() and not (workdir / "metrics.jsonl").exists()
  monkeypatch.undo()
  assert run.main(_again(args, workdir, "--config.seed=5")) == 0  # the corrected command


# --- up-front refusals: a message naming the key, nothing written ---------------------------


@pytest.mark.parametrize("kind, extra, message", [
    ("lm", ["--config.prompt=4", "--config.generate=2", "--config.length=8",
            "--config.experiment=repetition", "--config.regimes=('mle',)",
            "--config.num_prompts=400"], "config.num_prompts: the validation text has"),
    ("lm", ["--config.forget=64"], "config.forget: must leave a training topic to retain"),
    ("lm", ["--config.length=3000"], "config.length: every split needs a window"),
    ("lm", ["--config.seed=18446744073709551616"], "config.seed"),
    ("lm", ["--config.batch_size=100000000"], "config.batch_size: the runs need about"),
    ("lm", ["--config.width=4194304", "--config.heads=1"], "config.width: the runs need about"),
    ("lm", ["--config.num_seeds=100000", "--config.width=512", "--config.heads=4"],
     "config.num_seeds: the runs need about"),
    ("lm", ["--config.step=20"], "config.step: unknown key"),
    ("lm", ["--config.head=maybe"], "config.head: must be one of fused, softmax"),
    ("lm", ["--config.protocol=uniform"], "--config.protocol: a key of kind classifier"),
    ("lm", ["--config.regimes=('npo', 'mle')"], "'mle' is not a regime of experiment 'unlearning'"),
    ("multilabel", ["--config.hidden=(0,)"], "config.hidden: must be a tuple of positive ints"),
    ("multilabel", ["--config.alpha=2.0"], "--config.alpha: a key of kind lm"),
    ("classifier", ["--config.alpha=2.0"], "--config.alpha: a key of kind lm"),
])
def test_bad_configs_of_every_kind_are_refused_naming_the_key(kind, extra, message, tmp_path,
                                                             capsys):
  workdir = tmp_path / "out"
  assert run.main([*KINDS[kind], *extra, f"--workdir={workdir}", *QUIET]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err, err
  assert not workdir.exists()


def _multilabel_npz(path, **arrays):
  rng = np.random.default_rng(0)
  base = {f"x_{s}": rng.normal(size=(n, 4)).astype(np.float32)
          for s, n in (("train", 60), ("val", 20), ("test", 20))}
  base.update({f"y_{s}": rng.random((n, 3)) < 0.4 for s, n in (("train", 60), ("val", 20),
                                                                 ("test", 20))})
  base.update(arrays)
  np.savez(path, **base)
  return f"--config.dataset=npz:{path}"


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.where(np.eye(60, 4, 2) > 0, np.nan, 0).astype(np.float32)},
     "x_train[0, 2] = nan is not finite"),
    ({"x_test": np.full((20, 4), np.inf, np.float32)}, "x_test[0, 0] = inf is not finite"),
    ({"y_train": np.zeros((60, 0), bool)}, "y_train: a label mask needs at least one class"),
    ({"y_test": np.zeros((20, 3), bool)}, "y_test has no positive label"),
])
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
  assert run.main([*KINDS["lm"], f"--config.dataset=text:{path}", "--config.forget=2",
                   f"--workdir={workdir}", *QUIET]) == 0
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"]["dataset"] == f"text:{path}"
  assert results["data"]["train_windows"] > 0 and len(results["data"]["forget_topics"]) == 2
  short = tmp_path / "short.txt"
  short.write_text("one paragraph\n\nand another", encoding="utf-8")
  assert run.main([*KINDS["lm"], f"--config.dataset=text:{short}",
                   f"--workdir={tmp_path / 'no'}", *QUIET]) == 2


def test_overwrite_through_a_linked_checkpoints_folder_keeps_folders_it_did_not_write(
    finished, tmp_path):
  import shutil
  _, _, source, _ = finished
  outside = tmp_path / "outside"
  shutil.copytree(source / "checkpoints", outside)  # this project's checkpoints, 10 and 20
  for step in ("40", "60", "80"):
    (outside / step).mkdir()
    (outside / step / "data.bin").write_bytes(b"not ours")
  workdir = tmp_path / "linked"
  workdir.mkdir()
  (workdir / "checkpoints").symlink_to(outside)
  (workdir / "results.json").write_text("{}")
  workdir_lib.Workdir(workdir).clear()  # what --overwrite does first
  assert (workdir / "checkpoints").is_symlink() and not (workdir / "results.json").exists()
  assert sorted(p.name for p in outside.iterdir()) == ["40", "60", "80"]  # before: all deleted
  assert all((outside / s / "data.bin").read_bytes() == b"not ours" for s in ("40", "60", "80"))


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
  for name in ("lm_repetition", "lm_unlearning", "multilabel_canvases", "multilabel_generated",
               "feedback_digits", "feedback_digits:head", "hierarchical", "mnist1d_supervised:model"):
    assert name in out, name
  assert "--config.alpha" in out and "--config.collapse" in out
  assert run.main(["--config=lm_unlearning", "--help"]) == 0
  only_lm = capsys.readouterr().out
  assert "--config.alpha" in only_lm and "--config.protocol" not in only_lm


def test_an_unknown_config_name_lists_the_packaged_ones(tmp_path, capsys):
  assert run.main(["--config=nonexistent", f"--workdir={tmp_path / 'x'}"]) == 2
  err = capsys.readouterr().err
  assert "lm_repetition" in err and "feedback_digits" in err


@pytest.mark.parametrize("script, config", [("jaxsoftmax-lm", "lm_repetition"),
                                            ("jaxsoftmax-multilabel", "multilabel_canvases")])
def test_the_aliases_default_their_config(script, config):
  path = Path(sys.executable).with_name(script)
  out = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and f"usage: {script}" in out.stdout
  assert "--config.experiment" in out.stdout if script == "jaxsoftmax-lm" else (
      "--config.protocol" not in out.stdout)


def test_distributed_without_a_cluster_is_one_message(tmp_path):
  out = subprocess.run([sys.executable, "-m", "jaxsoftmax_experiments.run", *KINDS["classifier"],
                        f"--workdir={tmp_path / 'd'}", "--distributed", *QUIET], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "--distributed" in out.stderr and len(out.stderr.strip().splitlines()) == 1
