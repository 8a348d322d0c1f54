"""A workdir nothing can corrupt: each case asserts the data (files byte for byte, the
foreign file still there, the refused process), not only the exit status."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxsoftmax_experiments import run
from jaxsoftmax_experiments.checkpoint import Checkpointer, CheckpointError

ROOT = Path(__file__).resolve().parents[2]
TINY = [
  "--config=feedback_digits",
  "--config.dataset=synthetic",
  "--config.steps=40",
  "--config.eval_every=10",
  "--config.checkpoint_every=10",
  "--config.num_seeds=2",
  "--config.initial_steps=20",
  "--config.num_labeled=50",
  "--config.hidden=(8,)",
  "--progress=false",
  "--compilation_cache=",
]


def _files(folder):
  return {
    p.relative_to(folder): p.read_bytes()
    for p in sorted(folder.rglob("*"))
    if p.is_file() and p.name != ".lock"
  }


def _steps(folder):
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One uninterrupted tiny run: its workdir and files."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  assert run.main([*TINY, f"--workdir={workdir}"]) == 0
  return workdir, _files(workdir)


def _copy(source, destination):
  import shutil

  shutil.copytree(source, destination, symlinks=True)
  return destination


# --- data lost or mixed -------------------------------------------------------------------


def test_a_second_run_on_a_workdir_in_use_is_refused_at_once_and_writes_nothing(tmp_path):
  workdir = tmp_path / "busy"
  first = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "jaxsoftmax_experiments.run",
      *TINY,
      "--config.steps=200",
      f"--workdir={workdir}",
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 60
  while not (workdir / "config.json").exists():
    assert first.poll() is None and time.monotonic() < deadline
    time.sleep(0.01)
  before = _files(workdir)
  start = time.monotonic()
  second = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxsoftmax_experiments.run",
      *TINY,
      "--config.seed=7",
      f"--workdir={workdir}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert second.returncode == 2
  assert f"is in use by process {first.pid}" in second.stderr
  assert time.monotonic() - start < 30  # refused before any JAX work
  assert json.loads((workdir / "config.json").read_text())["seed"] == 0
  first.communicate(timeout=300)
  assert first.returncode == 0
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"]["seed"] == 0
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == (1 + 200 // 10) * 3 * 2  # every evaluation of the first run, once
  assert before[Path("config.json")] == (workdir / "config.json").read_bytes()


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(
    [sys.executable, "-m", "jaxsoftmax_experiments.run", *TINY, f"--workdir={workdir}"],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 60
  while not (workdir / "config.json").exists():
    assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (workdir / ".lock").exists()  # the file stays; the OS released the lock
  assert run.main([*TINY, f"--workdir={workdir}"]) == 0


def test_checkpoints_of_another_config_are_refused_not_resumed(finished, tmp_path, capsys):
  source, _ = finished
  workdir = _copy(source, tmp_path / "mixed")
  # As if --overwrite could not delete seed 0's checkpoints before seed 1 started.
  (workdir / "results.json").unlink()
  config = json.loads((workdir / "config.json").read_text())
  config["seed"] = 1
  (workdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  before = _files(workdir)
  assert run.main([*TINY, "--config.seed=1", f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err
  assert "belongs to another config or dataset" in err and "--overwrite" in err
  assert _files(workdir) == before


def test_a_save_that_does_not_happen_is_an_error(tmp_path):
  import jax.numpy as jnp

  ckpt = Checkpointer(tmp_path / "c")
  ckpt.save(20, {"w": jnp.ones(2)}, {"fingerprint": "x"})
  with pytest.raises(CheckpointError, match=r"checkpoint 10 was not written .* steps \[20\]"):
    ckpt.save(10, {"w": jnp.ones(2)}, {"fingerprint": "x"})  # Orbax skips older steps
  ckpt.close()


def test_restarting_from_an_older_checkpoint_drops_the_stale_newer_ones(finished, tmp_path):
  source, files = finished
  workdir = _copy(source, tmp_path / "stale")
  (workdir / "results.json").unlink()
  # The log lost its last evaluation: the newest checkpoint (step 40) is not usable, the
  # one at 30 is. Before, the saves at 40 were skipped while 40 was stale.
  lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
  (workdir / "metrics.jsonl").write_text("".join(lines[:-6]))
  assert run.main([*TINY, f"--workdir={workdir}"]) == 0
  assert json.loads((workdir / "timing.json").read_text())["resumed_from_step"] == 30
  assert _steps(workdir / "checkpoints") == _steps(source / "checkpoints") == [20, 30, 40]
  assert (workdir / "results.json").read_bytes() == files[Path("results.json")]
  assert (workdir / "metrics.jsonl").read_bytes() == files[Path("metrics.jsonl")]


def test_a_symlinked_checkpoints_folder_is_used_but_never_removed_through(tmp_path):
  disk = tmp_path / "bigger_disk"
  disk.mkdir()
  (disk / "someone_elses.txt").write_text("keep me")
  workdir = tmp_path / "linked"
  workdir.mkdir()
  (workdir / "checkpoints").symlink_to(disk)
  assert run.main([*TINY, f"--workdir={workdir}"]) == 0
  assert _steps(disk) == [20, 30, 40]  # the checkpoints went to the bigger disk
  assert run.main([*TINY, "--config.seed=3", "--overwrite", f"--workdir={workdir}"]) == 0
  assert (workdir / "checkpoints").is_symlink() and (
    disk / "someone_elses.txt"
  ).read_text() == "keep me"
  assert json.loads((workdir / "results.json").read_text())["config"]["seed"] == 3


def test_folders_named_like_steps_behind_a_linked_checkpoints_are_never_moved(
  finished, tmp_path, capsys
):
  # The trap: a finished run, then checkpoints/ replaced by a link to a folder that
  # holds thesis.tex and 20/ 40/ 60/ 600/ with a data.bin each; then --overwrite with
  # another seed. Before: exit 0, the four folders taken for damaged checkpoints, moved
  # into checkpoints-damaged/ (four CheckpointWarnings), and deleted by the next
  # --overwrite. Now the run refuses, naming the folder, and moves nothing.
  source, _ = finished
  workdir = _copy(source, tmp_path / "trap_run")
  shutil.rmtree(workdir / "checkpoints")
  trap = tmp_path / "elsewhere" / "trap"
  trap.mkdir(parents=True)
  (trap / "thesis.tex").write_text("\\documentclass{article}")
  for name in ("20", "40", "60", "600"):
    (trap / name).mkdir()
    (trap / name / "data.bin").write_bytes(name.encode() * 100)
  (workdir / "checkpoints").symlink_to(trap)
  before = sorted(str(p.relative_to(trap)) for p in trap.rglob("*"))
  for _ in range(2):
    code = run.main([*TINY, "--config.seed=1", "--overwrite", f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{workdir / 'checkpoints' / '600'} is not a checkpoint this project wrote" in err
    assert "Traceback" not in err and "--overwrite" not in err
  assert sorted(str(p.relative_to(trap)) for p in trap.rglob("*")) == before
  assert (trap / "600" / "data.bin").read_bytes() == b"600" * 100
  assert not (workdir / "checkpoints-damaged").exists()


def test_a_run_whose_first_save_fails_leaves_a_clean_folder(tmp_path, capsys, monkeypatch):
  # Before: a first save that failed (a 300 KiB disk) said "no checkpoint was taken" but
  # left config.json, metrics.jsonl and Orbax's checkpoints/N.orbax-checkpoint-tmp/, since
  # the clean-up counted the temporary folder as a checkpoint.
  import errno

  from jaxsoftmax_experiments import checkpoint as checkpoint_lib

  workdir = tmp_path / "first_save"
  real = checkpoint_lib.Checkpointer.save

  def save(self, step, tree, meta):
    temporary = self.directory / f"{step}.orbax-checkpoint-tmp-1234"
    (temporary / "arrays").mkdir(parents=True)  # what Orbax leaves when a write fails
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save)
  assert run.main([*TINY, f"--workdir={workdir}"]) == 1
  err = capsys.readouterr().err
  assert "No space left on device" in err
  assert sorted(p.name for p in workdir.iterdir() if not p.name.startswith(".")) == []
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", real)
  assert run.main([*TINY, "--config.seed=4", f"--workdir={workdir}"]) == 0


def test_fewer_steps_and_overwrite_say_what_they_mean(finished, tmp_path, capsys):
  # Before: asking for fewer steps was refused as "cannot be continued with more steps",
  # and --overwrite deleted the earlier run without a word.
  source, _ = finished
  workdir = _copy(source, tmp_path / "fewer")
  steps = next(a for a in TINY if a.startswith("--config.steps="))
  fewer = [a for a in TINY if a != steps] + ["--config.steps=20"]
  assert run.main([*fewer, f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err
  assert "A run is not cut short" in err and "more steps" not in err
  assert run.main([*fewer, "--overwrite", f"--workdir={workdir}"]) == 0
  out = capsys.readouterr().out
  assert f"--overwrite deleted the earlier run in {workdir}: " in out
  assert "results.json" in out and "checkpoints/" in out


def test_a_damaged_checkpoint_is_never_moved_into_a_symlinked_folder(finished, tmp_path, capsys):
  source, _ = finished
  workdir = _copy(source, tmp_path / "damaged_link")
  (workdir / "results.json").unlink()
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "foreign.txt").write_text("foreign")
  (workdir / "checkpoints-damaged").symlink_to(outside)
  for path in (workdir / "checkpoints" / "40").rglob("*"):
    if path.is_file():
      os.truncate(path, path.stat().st_size // 2)
  assert run.main([*TINY, f"--workdir={workdir}"]) == 2
  assert "is a symbolic link" in capsys.readouterr().err
  assert sorted(p.name for p in outside.iterdir()) == ["foreign.txt"]
  assert (workdir / "checkpoints" / "40").is_dir()  # left where it was


def test_temporary_files_of_a_killed_write_are_removed(finished, tmp_path):
  source, files = finished
  workdir = _copy(source, tmp_path / "leftovers")
  (workdir / "results.json").unlink()
  (workdir / ".results.json.x1y2.tmp").write_text("half")
  (workdir / ".summary.md.abc.tmp").write_text("half")
  (workdir / "mine.tmp").write_text("not ours")
  assert run.main([*TINY, f"--workdir={workdir}"]) == 0
  assert not list(workdir.glob(".*.tmp"))
  assert (workdir / "mine.tmp").read_text() == "not ours"
  assert (workdir / "results.json").read_bytes() == files[Path("results.json")]


# --- every failure a message ----------------------------------------------------------------


@pytest.mark.parametrize(
  "body, message",
  [
    ("def get_config(:\n", "cannot load --config: SyntaxError"),
    (
      "def get_config():\n  raise RuntimeError('boom')\n",
      "cannot load --config: RuntimeError: boom",
    ),
    ("def get_config():\n  return 3\n", "must be an ml_collections.ConfigDict"),
    (
      "import ml_collections\n"
      "def get_config():\n  return ml_collections.ConfigDict({'steps': 3})\n",
      "config.dataset: missing",
    ),
  ],
)
def test_a_bad_config_file_is_one_line_and_nothing_is_written(tmp_path, capsys, body, message):
  path = tmp_path / "mine.py"
  path.write_text(body)
  workdir = tmp_path / "out"
  assert run.main([f"--config={path}", f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert not workdir.exists()


def test_overrides_without_a_config_or_of_keys_it_lacks(tmp_path, capsys):
  assert run.main(["--config.steps=3", f"--workdir={tmp_path / 'a'}"]) == 2
  assert "overrides need a config" in capsys.readouterr().err
  path = tmp_path / "partial.py"
  path.write_text(
    "import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict({'steps': 3})\n"
  )
  assert (
    run.main([f"--config={path}", "--config.protocol=uniform", f"--workdir={tmp_path / 'a'}"]) == 2
  )
  assert "--config.protocol: the config has no such key" in capsys.readouterr().err
  assert not (tmp_path / "a").exists()


def test_an_unusable_workdir_is_a_message(tmp_path, capsys):
  dangling = tmp_path / "dangling"
  dangling.symlink_to(tmp_path / "nowhere")
  assert run.main([*TINY, f"--workdir={dangling}"]) == 2
  assert "symbolic link to a folder that does not exist" in capsys.readouterr().err
  a_file = tmp_path / "file"
  a_file.write_text("x")
  assert run.main([*TINY, f"--workdir={a_file / 'sub'}"]) == 2
  assert "cannot be written" in capsys.readouterr().err
  assert a_file.read_text() == "x"


def test_a_full_disk_mid_run_is_a_message_and_keeps_the_last_good_checkpoint(
  tmp_path, capsys, monkeypatch
):
  import errno

  from jaxsoftmax_experiments import workdir as workdir_lib

  workdir = tmp_path / "full"
  calls = []
  real = workdir_lib.Workdir.append_metrics

  def append(self, log, records):
    calls.append(1)
    if len(calls) == 4:  # the evaluation at step 30
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, log, records)

  monkeypatch.setattr(workdir_lib.Workdir, "append_metrics", append)
  assert run.main([*TINY, f"--workdir={workdir}"]) == 1
  err = capsys.readouterr().err
  assert "No space left on device" in err and "the checkpoint at step 20 is kept" in err
  assert _steps(workdir / "checkpoints") == [10, 20]
  monkeypatch.undo()
  assert run.main([*TINY, f"--workdir={workdir}"]) == 0  # resumes once there is room
  assert json.loads((workdir / "timing.json").read_text())["resumed_from_step"] == 20


FULL_DISK_RUN = [
  "--config=feedback_digits",
  "--config.steps=60",
  "--config.eval_every=30",
  "--config.num_seeds=2",
  "--config.initial_steps=30",
]


@pytest.mark.parametrize("size", ["40k", "300k"])
def test_a_full_disk_through_the_command_is_one_line(tmp_path, size):
  # The reproduction on a real full disk (a tmpfs; needs root, else skipped: the
  # next test patches the write instead). Before: about 800 lines of Orbax's tracebacks
  # (RESOURCE_EXHAUSTED, "Event loop is closed", "sys.meta_path is None") and exit 1.
  mount = tmp_path / "mnt"
  mount.mkdir()
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)])
  if made.returncode != 0:
    pytest.skip("cannot mount a tmpfs here (not root)")
  try:
    out = subprocess.run(
      [
        sys.executable,
        "-m",
        "jaxsoftmax_experiments.run",
        *FULL_DISK_RUN,
        f"--workdir={mount}/run",
      ],
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 1
    lines = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith("step ")]
    assert lines == [
      f"error: writing to {mount}/run failed at step 60 (No space left on device); no "
      "checkpoint was taken. Rerun the same command once the problem is fixed."
    ], out.stderr[-3000:]
    # The failed start is forgotten: nothing but the lock is left for the rerun to meet.
    assert sorted(p.name for p in (mount / "run").iterdir()) == [".lock"]
  finally:
    subprocess.run(["umount", str(mount)])


def test_a_checkpoint_write_that_fails_inside_orbax_is_an_oserror(tmp_path, capsys, monkeypatch):
  # Orbax reports a full disk as a ValueError (RESOURCE_EXHAUSTED ... No space left on
  # device), which the run did not take for a write failure: it ended in a traceback.
  import orbax.checkpoint as ocp

  def save(self, step, *args, **kwargs):
    print("E orbax writer thread: Traceback ... Event loop is closed", file=sys.stderr)
    raise ValueError(
      "RESOURCE_EXHAUSTED: Error writing local file: Failed to write 207 bytes to file 25: "
      "No space left on device [os_error_code='28']"
    )

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  workdir = tmp_path / "patched"
  assert run.main([*TINY, f"--workdir={workdir}"]) == 1
  err = capsys.readouterr().err
  assert "No space left on device" in err and "Traceback" not in err, err
  assert not (workdir / "config.json").exists()


def test_checkpoint_metadata_that_does_not_parse_is_set_aside(finished, tmp_path):
  from jaxsoftmax_experiments.checkpoint import CheckpointWarning

  source, files = finished
  workdir = _copy(source, tmp_path / "badmeta")
  (workdir / "results.json").unlink()
  (workdir / "checkpoints" / "40" / "meta" / "metadata").write_text("{not json")
  with pytest.warns(CheckpointWarning, match="checkpoint 40"):
    assert run.main([*TINY, f"--workdir={workdir}"]) == 0
  assert (workdir / "results.json").read_bytes() == files[Path("results.json")]


# --- configs that cannot work are refused before anything is written -------------------------


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config.schedule=cosine", "--config.warmup_steps=20"],
      "config.warmup_steps: a cosine schedule needs its warmup below the steps of every phase, "
      "but config.initial_steps is 20",
    ),
    (["--config.hidden=(100000000000,)"], "config.hidden: the runs need about"),
    (["--config.batch_size=100000000"], "config.batch_size: the runs need about"),
    (
      ["--config.dataset=digits", "--config.model=cnn", "--config.kernel_size=9"],
      "config.kernel_size: the kernel (9) is larger than the input (8, 8)",
    ),
  ],
)
def test_configs_that_cannot_work_are_refused(tmp_path, capsys, args, message):
  workdir = tmp_path / "out"
  start = time.monotonic()
  assert run.main([*TINY, *args, f"--workdir={workdir}"]) == 2
  assert message in capsys.readouterr().err
  assert time.monotonic() - start < 20 and not workdir.exists()


def test_a_run_that_fails_after_claiming_the_workdir_does_not_block_the_corrected_one(
  tmp_path, monkeypatch
):
  from jaxsoftmax_experiments import loop

  workdir = tmp_path / "failed"
  monkeypatch.setattr(loop, "make_plan", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
  with pytest.raises(RuntimeError, match="bug"):
    run.main([*TINY, f"--workdir={workdir}"])
  assert not (workdir / "config.json").exists()
  monkeypatch.undo()
  assert run.main([*TINY, "--config.seed=5", f"--workdir={workdir}"]) == 0
