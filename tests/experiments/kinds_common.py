"""What every kind must do through the one command line, as tests a kind's module imports
(``test_kind_classifier.py`` and the others set ``KIND`` and import these), so that the
kinds run in parallel: resume, refusal, completion, a failed start. Each is a
reproduction of what a user met when the language model and the multi-label study had
command lines of their own."""

import json
import os
import tempfile
from pathlib import Path

import pytest

from jaxsoftmax_experiments import run
from jaxsoftmax_experiments import workdir as workdir_lib

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--progress=false", "--compilation_cache="]


def small_text() -> Path:
  """The first 20 of CPython's help topics as a user's text file (``dataset=text:PATH``):
  what these tests ask of the language model needs a corpus, not all of help_topics,
  whose evaluation windows would be most of each run's time. Written once per machine
  and user, atomically, so that parallel workers and subprocesses read the same file."""
  from pydoc_data.topics import topics

  text = "\n\n".join(topics[name] for name in sorted(topics)[:20])
  path = Path(tempfile.gettempdir()) / f"jaxsoftmax-tests-{os.getuid()}" / "help_topics_20.txt"
  if not path.exists() or path.read_text(encoding="utf-8") != text:
    path.parent.mkdir(exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
  return path


# The classifier's tiny run (feedback_digits shrunk), shared by the tests of the command line.
TINY_CLASSIFIER = [
  "--config.dataset=synthetic",
  "--config.steps=20",
  "--config.eval_every=10",
  "--config.num_seeds=2",
  "--config.initial_steps=20",
  "--config.num_labeled=50",
  "--config.hidden=(8,)",
]
# The language model's feedback experiment shrunk: a start of 40 steps, rounds of 10.
TINY_FEEDBACK = [
  "--config=lm_feedback",
  "--config.num_seeds=2",
  "--config.num_labeled=60",
  "--config.num_unlabeled=24",
  "--config.num_validation=16",
  "--config.num_test=16",
  "--config.samples=3",
  "--config.eval_samples=4",
  "--config.initial_steps=40",
  "--config.select_every=20",
  "--config.steps=10",
  "--config.batch_size=8",
  "--config.width=16",
  "--config.depth=1",
  "--config.heads=2",
  "--config.learning_rate=1e-2",
]
# One tiny command per kind; each evaluates at steps 0, 10 and 20 and checkpoints at each.
KINDS = {
  "classifier": ["--config=feedback_digits", *TINY_CLASSIFIER, "--config.checkpoint_every=10"],
  "lm": [
    "--config=lm_unlearning",
    f"--config.dataset=text:{small_text()}",
    "--config.forget=2",
    "--config.num_seeds=2",
    "--config.steps=20",
    "--config.eval_every=10",
    "--config.checkpoint_every=10",
    "--config.batch_size=4",
    "--config.length=8",
    "--config.width=16",
    "--config.depth=1",
    "--config.heads=2",
    "--config.vocab_chunk=256",
    "--config.initial_steps=20",
    "--config.learning_rate=1e-2",
    "--config.regimes=('complement_likelihood', 'npo')",
  ],
  # The language model's feedback experiment: 2 rounds of 10 steps.
  "lm_feedback": [
    *TINY_FEEDBACK,
    "--config.eval_every=10",
    "--config.checkpoint_every=10",
    "--config.regimes=('labeled_only', 'nft')",
  ],
  "multilabel": [
    "--config=multilabel_generated",
    "--config.steps=20",
    "--config.eval_every=10",
    "--config.checkpoint_every=10",
    "--config.num_seeds=2",
    "--config.hidden=(8,)",
    "--config.regimes=('sigmoid', 'clipped_softmax')",
  ],
}


# The kind of each entry of KINDS that is a config of another kind.
KIND_OF = {"lm_feedback": "lm"}


def _files(workdir):
  return {
    p.relative_to(workdir): p.read_bytes()
    for p in sorted(workdir.rglob("*"))
    if p.is_file() and "checkpoints" not in p.parts and p.name != ".lock"
  }


@pytest.fixture(scope="module")
def finished(request, tmp_path_factory):
  kind = request.module.KIND
  workdir = tmp_path_factory.mktemp(kind)
  args = [*KINDS[kind], f"--workdir={workdir}", *QUIET]
  assert run.main(args) == 0
  return kind, args, workdir, _files(workdir)


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


def test_every_kind_refuses_another_config_naming_the_key_and_overwrite_works(
  finished, capsys, tmp_path
):
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


def test_every_kind_rewrites_a_damaged_or_missing_output_of_a_finished_run(
  finished, tmp_path, capsys
):
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
      path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
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
  finished, tmp_path, monkeypatch
):
  import shutil

  kind, args, source, files = finished
  workdir = tmp_path / "killed"
  shutil.copytree(source, workdir)
  # As SIGKILL right after results.json: the later outputs and the record never came.
  for name in ("summary.md", "timing.json", "curves.png", workdir_lib.RECORD):
    (workdir / name).unlink()
  assert run.main(_again(args, workdir)) == 0
  assert {"summary.md", "timing.json", "curves.png", workdir_lib.RECORD} <= set(
    p.name for p in workdir.iterdir()
  )


def test_a_start_that_fails_is_forgotten_for_every_kind(finished, tmp_path, monkeypatch):
  from jaxsoftmax_experiments import kinds

  kind, args, _, _ = finished
  workdir = tmp_path / "failed"
  module = kinds.get(KIND_OF.get(kind, kind))
  monkeypatch.setattr(module, "plan", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
  with pytest.raises(RuntimeError, match="bug"):
    run.main(_again(args, workdir))
  assert not (workdir / "config.json").exists() and not (workdir / "metrics.jsonl").exists()
  monkeypatch.undo()
  assert run.main(_again(args, workdir, "--config.seed=5")) == 0  # the corrected command


def test_every_kind_keeps_its_runs_in_the_one_run_state(finished):
  # One state of a run and one optimizer step under one divergence rule for every kind
  # (training.RunState, training.apply_update): a kind brings no state type of its own.
  from jaxsoftmax_experiments import kinds, training

  kind, args, workdir, _ = finished
  parsed = run.parse(_again(args, workdir))
  assert not isinstance(parsed, int)
  _, config = parsed
  module = kinds.get(KIND_OF.get(kind, kind))
  template = module.template(module.plan(config, module.load(config), None))
  assert template.runs and all(isinstance(g, training.RunState) for g in template.runs)
  assert template.step.shape == () and template.runs[0].alive.shape == (2,)  # 2 seeds


# The value each kind's results report per regime and seed: compared across layouts.
VALUES = {
  "classifier": ("regimes", "test_accuracy"),
  "lm": ("regimes", "forget_nll"),
  "lm_feedback": ("regimes", "answer_nll"),
  "multilabel": ("objectives", "mAP"),
}


def _free_port():
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_every_kind_through_jax_distributed_matches_one_process(finished, tmp_path):
  """--distributed with two local CPU processes (one device each) against the one-process
  run. Before, the language model and the multi-label study read their evaluations
  from arrays spread over both processes and stopped with JAX's "spans non-addressable
  devices" error."""
  import os
  import subprocess
  import sys

  kind, args, source, _ = finished
  command = [
    sys.executable,
    "-m",
    "jaxsoftmax_experiments.run",
    *_again(args, tmp_path / "two"),
    "--distributed",
    f"--coordinator_address=localhost:{_free_port()}",
    "--num_processes=2",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [
    subprocess.Popen(
      [*command, f"--process_id={i}"],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  one = json.loads((source / "results.json").read_text())
  two = json.loads((tmp_path / "two" / "results.json").read_text())
  assert one["num_devices"] == 1 and two["num_devices"] == 2
  group, key = VALUES[kind]
  assert list(two[group]) == list(one[group])
  for regime, r in one[group].items():
    assert two[group][regime][key] == pytest.approx(r[key], rel=1e-6, abs=1e-6), (kind, regime)
