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

from experiments import run
from experiments.checkpoint import CheckpointWarning

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/feedback_digits.py"
# Uniform protocol on digits, 2 seeds x 3 regimes: about 6 s, a checkpoint every 100 steps.
ARGS = ["--config.protocol=uniform", "--config.num_seeds=2", "--config.hidden=(32,)",
        "--config.steps=800", "--config.eval_every=50", "--config.checkpoint_every=100",
        "--progress=false"]


def _command(workdir):
  return [sys.executable, "-m", "experiments.run", f"--config={CONFIG}", f"--workdir={workdir}", *ARGS]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run: its workdir, results.json and metrics.jsonl text."""
  workdir = tmp_path_factory.mktemp("reference")
  assert run.main(_command(workdir)[3:]) == 0
  return workdir, (workdir / "results.json").read_text(), (workdir / "metrics.jsonl").read_text()


def _checkpoint_steps(workdir):
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _start_and_wait_for_a_checkpoint(workdir):
  proc = subprocess.Popen(_command(workdir), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while not _checkpoint_steps(workdir):
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline, "no checkpoint within 120 s"
    time.sleep(0.05)
  return proc


def _keys(metrics_text):
  return [(r["round"], r["step"], r["regime"], r["seed"])
          for r in map(json.loads, metrics_text.splitlines())]


def test_sigkill_then_rerun_gives_the_uninterrupted_results(reference, tmp_path):
  _, results, metrics = reference
  workdir = tmp_path / "killed"
  proc = _start_and_wait_for_a_checkpoint(workdir)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "results.json").exists()  # it really stopped part-way
  steps = _checkpoint_steps(workdir)
  assert steps and steps[-1] < 800
  assert run.main(_command(workdir)[3:]) == 0
  assert (workdir / "results.json").read_text() == results
  # metrics.jsonl: every evaluation once, in order, byte for byte.
  resumed = (workdir / "metrics.jsonl").read_text()
  assert len(set(_keys(resumed))) == len(_keys(resumed))
  assert resumed == metrics
  assert json.loads((workdir / "timing.json").read_text())["resumed_from_step"] >= steps[-1]


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(reference, tmp_path):
  _, results, metrics = reference
  workdir = tmp_path / "interrupted"
  proc = _start_and_wait_for_a_checkpoint(workdir)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == run.INTERRUPTED, err
  stopped = int(re.search(r"Stopped at step (\d+) of 800", err).group(1))
  assert "Resume with the same command" in err and str(workdir) in err
  assert _checkpoint_steps(workdir)[-1] == stopped
  assert not (workdir / "results.json").exists()
  assert run.main(_command(workdir)[3:]) == 0
  assert (workdir / "results.json").read_text() == results
  assert (workdir / "metrics.jsonl").read_text() == metrics


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
  source, results, metrics = reference
  workdir = tmp_path / "damaged"
  shutil.copytree(source, workdir)
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
  assert "differing keys: seed (0 -> 7), steps (800 -> 1000)" in err and "--overwrite" in err
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before  # untouched
  assert run.main([*args, "--config.steps=200", "--overwrite"]) == 0
  assert json.loads((workdir / "results.json").read_text())["config"]["steps"] == 200
  assert _checkpoint_steps(workdir) == [100, 200]  # the old run's checkpoints are gone
