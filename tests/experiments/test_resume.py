"""Checkpoint and resume through the command line: SIGKILL, SIGINT, damaged checkpoints and
config mismatches, each compared with one uninterrupted run of the same config."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxsoftmax_experiments import run
from jaxsoftmax_experiments.checkpoint import CheckpointWarning

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "feedback_digits"
# Uniform protocol on digits, 2 seeds x 3 regimes: a few seconds of training after
# compilation, a checkpoint every 50 steps.
ARGS = [
  "--config.protocol=uniform",
  "--config.num_seeds=2",
  "--config.hidden=(32,)",
  "--config.steps=500",
  "--config.eval_every=25",
  "--config.checkpoint_every=50",
  "--progress=false",
]


def _command(workdir):
  return [
    sys.executable,
    "-m",
    "jaxsoftmax_experiments.run",
    f"--config={CONFIG}",
    f"--workdir={workdir}",
    *ARGS,
  ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run: its workdir, results.json and metrics.jsonl text."""
  workdir = tmp_path_factory.mktemp("reference")
  assert run.main(_command(workdir)[3:]) == 0
  return workdir, (workdir / "results.json").read_text(), (workdir / "metrics.jsonl").read_text()


def _checkpoint_steps(workdir):
  folder = workdir / "checkpoints"
  return (
    sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
  )


def _start_and_wait_for_a_checkpoint(workdir):
  proc = subprocess.Popen(
    _command(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.monotonic() + 120
  while not _checkpoint_steps(workdir):
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline, "no checkpoint within 120 s"
    time.sleep(0.05)
  return proc


def _keys(metrics_text):
  return [
    (r["round"], r["step"], r["regime"], r["seed"])
    for r in map(json.loads, metrics_text.splitlines())
  ]


def test_sigint_then_sigkill_then_rerun_gives_the_uninterrupted_results(reference, tmp_path):
  _, results, metrics = reference
  workdir = tmp_path / "interrupted"
  # Ctrl-C: a checkpoint at the next evaluation, a message saying how to resume, status 130.
  proc = _start_and_wait_for_a_checkpoint(workdir)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == run.INTERRUPTED, err
  stopped = int(re.search(r"Stopped at step (\d+) of 500", err).group(1))
  assert "Resume with the same command" in err and str(workdir) in err
  # The first message says where the run will stop (before: "at the next evaluation",
  # while the runs guide promised it would finish the current one).
  assert f"the run stops at the next evaluation, step {stopped}" in err
  assert _checkpoint_steps(workdir)[-1] == stopped
  assert not (workdir / "results.json").exists()
  # Resumed, then killed outright once it has saved a newer checkpoint.
  proc = subprocess.Popen(
    _command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  deadline = time.monotonic() + 120
  while _checkpoint_steps(workdir)[-1] == stopped:
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline, "no new checkpoint within 120 s"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "results.json").exists()  # it really stopped part-way
  killed_at = _checkpoint_steps(workdir)[-1]
  assert stopped < killed_at < 500
  # The rerun finishes with the uninterrupted run's results and metrics, byte for byte.
  assert run.main(_command(workdir)[3:]) == 0
  assert (workdir / "results.json").read_text() == results
  resumed = (workdir / "metrics.jsonl").read_text()
  assert len(set(_keys(resumed))) == len(_keys(resumed))  # every evaluation once, in order
  assert resumed == metrics
  assert json.loads((workdir / "timing.json").read_text())["resumed_from_step"] >= killed_at


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
  source, results, metrics = reference
  workdir = tmp_path / "damaged"
  shutil.copytree(source, workdir)
  # As if killed after its last checkpoint and before writing its results (a finished run
  # is not run again: test_run).
  (workdir / "results.json").unlink()
  newest = _checkpoint_steps(workdir)[-1]
  for path in (workdir / "checkpoints" / str(newest)).rglob("*"):
    if path.is_file():
      os.truncate(path, path.stat().st_size // 2)
  with pytest.warns(CheckpointWarning, match=f"checkpoint {newest} .* could not be restored"):
    assert run.main(_command(workdir)[3:]) == 0
  assert (workdir / "checkpoints-damaged" / str(newest)).is_dir()  # kept for inspection
  assert json.loads((workdir / "timing.json").read_text())["resumed_from_step"] < newest
  assert (workdir / "results.json").read_text() == results
  assert (workdir / "metrics.jsonl").read_text() == metrics


def test_a_different_config_is_refused_naming_the_keys(reference, tmp_path, capsys):
  source, results, _ = reference
  workdir = tmp_path / "other"
  shutil.copytree(source, workdir)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  args = _command(workdir)[3:] + ["--config.steps=1000", "--config.seed=7"]
  assert run.main(args) == 2
  err = capsys.readouterr().err
  assert "differing keys: seed (0 -> 7), steps (500 -> 1000)" in err and "--overwrite" in err
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before  # untouched
  assert run.main([*args, "--config.steps=100", "--overwrite"]) == 0
  assert json.loads((workdir / "results.json").read_text())["config"]["steps"] == 100
  assert _checkpoint_steps(workdir) == [50, 100]  # the old run's checkpoints are gone


def _tiny_feedback(**overrides):
  from jaxsoftmax_experiments import config as config_lib
  from jaxsoftmax_experiments import data, loop

  c = config_lib.defaults()
  c.dataset, c.hidden, c.steps, c.eval_every, c.initial_steps = "synthetic", (8,), 30, 10, 20
  c.num_seeds, c.num_labeled = 2, 50
  for key, value in overrides.items():
    c[key] = value
  config_lib.validate(c)
  return loop.make_plan(c, data.load("synthetic"))


@pytest.mark.parametrize("head", ["softmax", "tree"])
def test_resuming_from_any_state_of_a_two_round_experiment_gives_the_same_results(head):
  """The loop itself: every yielded state resumes, across the round boundary."""
  import jax

  from jaxsoftmax_experiments import loop

  plan = _tiny_feedback(feedback_rounds=2, head=head)
  states = list(loop.run(plan))
  assert [int(s.step) for s in states] == [0, 10, 20, 30, 40, 50, 60]  # 30: the round boundary
  records = [r for s in states for r in loop.records(plan, jax.device_get(loop.light(s)))]
  full = loop.results(plan, jax.device_get(loop.light(states[-1], examples=True)))
  for i in (3, 4):  # at the round boundary, and after it
    tail = list(loop.run(plan, states[i]))[1:]
    resumed = loop.results(plan, jax.device_get(loop.light(tail[-1], examples=True)))
    assert resumed == full, i
    logged = [
      r for s in states[: i + 1] + tail for r in loop.records(plan, jax.device_get(loop.light(s)))
    ]
    assert logged == records


def test_the_loop_yields_after_every_evaluation_and_can_be_left_early():
  from jaxsoftmax_experiments import loop

  plan = _tiny_feedback(protocol="uniform", steps=50)
  steps = []
  for state in loop.run(plan):
    steps.append(int(state.step))
    if len(steps) == 3:
      break  # the caller decides to stop: nothing runs past this evaluation
  assert steps == [0, 10, 20]
  assert int(state.evaluations) == 3
