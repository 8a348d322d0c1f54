"""Runs an experiment config from the command line and writes its results to a workdir.

    python -m experiments.run --config=configs/feedback_digits.py --workdir=runs/feedback_digits
    python -m experiments.run --config=configs/feedback_digits.py --workdir=runs/short \\
        --config.steps=200 --config.regimes="('positive_only', 'complement_likelihood')"

Also installed as ``jaxsoftmax-run``. A bad flag, an unknown config key or a value
out of range exits with status 2 and a message naming it, before anything is written.

The run trains on every visible device (:mod:`experiments.parallel`) and saves an
Orbax checkpoint in ``<workdir>/checkpoints`` every ``config.checkpoint_every`` steps.
Rerunning the same command resumes from the newest checkpoint that restores, keeping
``metrics.jsonl`` up to that checkpoint and appending to it; Ctrl-C saves a
checkpoint and exits with status 130. A workdir holding a run of another config is
refused, naming the keys that differ, unless ``--overwrite`` is given.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from experiments import config as config_lib
from experiments import data, report

OUTPUTS = ("config.json", "metrics.jsonl", "results.json", "timing.json", "summary.md", "curves.png")
CHECKPOINTS = "checkpoints"
INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def _flags(argv: list[str]) -> flags.FlagValues:
  fv = flags.FlagValues()
  # sys_argv: the overrides to define come from argv, not from the process's sys.argv.
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Folder for the run's outputs.", flag_values=fv)
  flags.DEFINE_boolean("overwrite", False,
                       "Delete the run already in --workdir (outputs and checkpoints) and start afresh.",
                       flag_values=fv)
  flags.DEFINE_boolean("progress", True, "Show a progress bar.", flag_values=fv)
  flags.DEFINE_integer("num_devices", 0, "Train on the first N devices; 0: all.", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_boolean("distributed", False,
                       "Call jax.distributed.initialize first (one process per host).", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "With --distributed: process 0's host:port, "
                      "where the cluster does not provide it.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes.",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.",
                       flag_values=fv)
  return fv


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs the experiment; returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  for arg in argv:
    if arg.startswith("--config."):
      key = arg[len("--config."):].split("=")[0].split(".")[0]
      if key not in config_lib.KEYS:
        return _error(f"config.{key}: unknown key; the keys are {', '.join(config_lib.KEYS)}.")
  argv = ["experiments.run", *argv]
  fv = _flags(argv)
  try:
    fv(argv)
  except (flags.Error, ValueError, TypeError, AttributeError, KeyError) as e:
    return _error(str(e))
  if not fv["config"].present and fv["config"].value is None:
    return _error("--config is required, e.g. --config=configs/feedback_digits.py.")
  if not fv.workdir:
    return _error("--workdir is required, e.g. --workdir=runs/feedback_digits.")
  try:
    config = fv.config
    config.to_dict()
  except Exception as e:  # a missing config file, or one that raises  # noqa: BLE001
    return _error(f"cannot load --config: {e}")
  try:
    config_lib.validate(config)
    dataset = data.load(config.dataset)
    config_lib.validate(config, len(dataset.y_train), dataset.num_classes)
  except config_lib.ConfigError as e:
    return _error(str(e))

  workdir = Path(fv.workdir)
  if workdir.exists() and not workdir.is_dir():
    return _error(f"--workdir {workdir} exists and is not a folder.")
  resolved = json.loads(report.to_json(config.to_dict()))
  if fv.overwrite:
    _clear(workdir)
  else:
    problem = _check_resumable(workdir, resolved)
    if problem:
      return _error(problem)
  if fv.distributed:
    from experiments import parallel
    parallel.initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
  return _run(config, resolved, dataset, workdir, progress=fv.progress,
              num_devices=fv.num_devices, command=argv[1:])


def _clear(workdir: Path) -> None:
  """Deletes a run's outputs and checkpoints from ``workdir``, nothing else."""
  for name in OUTPUTS:
    (workdir / name).unlink(missing_ok=True)
  for name in (CHECKPOINTS, CHECKPOINTS + "-damaged"):
    shutil.rmtree(workdir / name, ignore_errors=True)


def _check_resumable(workdir: Path, resolved: dict) -> str | None:
  """Why the run in ``workdir`` cannot be resumed with ``resolved``; None if it can."""
  existing = [name for name in (*OUTPUTS, CHECKPOINTS) if (workdir / name).exists()]
  if not existing:
    return None
  try:
    earlier = json.loads((workdir / "config.json").read_text())
  except (OSError, ValueError) as e:
    return (f"--workdir {workdir} holds a run ({', '.join(existing)}) whose config.json cannot be "
            f"read ({e}); choose another folder or pass --overwrite to start afresh.")
  missing = object()
  differ = sorted(k for k in set(earlier) | set(resolved)
                  if earlier.get(k, missing) != resolved.get(k, missing))
  if differ:
    changes = ", ".join(f"{k} ({earlier.get(k, 'unset')!r} -> {resolved.get(k, 'unset')!r})"
                        for k in differ)
    return (f"--workdir {workdir} holds a run of a different config; differing keys: {changes}. "
            "Rerun with the same config to resume it, choose another folder, or pass "
            "--overwrite to start afresh.")
  return None


def _read_metrics(path: Path) -> tuple[list[str], list[dict]]:
  """The complete lines of ``metrics.jsonl`` and their records (a line cut short by a
  kill, and anything after it, is dropped)."""
  lines, records = [], []
  if path.exists():
    for line in path.read_text().splitlines(keepends=True):
      try:
        record = json.loads(line)
      except ValueError:
        break
      if not line.endswith("\n"):
        break
      lines.append(line)
      records.append(record)
  return lines, records


def _run(config, resolved: dict, dataset, workdir: Path, *, progress: bool, num_devices: int,
         command: list[str]) -> int:
  import jax  # after flag parsing, so that --help and bad flags answer at once

  from experiments import experiment
  from experiments.checkpoint import Checkpointer

  devices = jax.devices()[:num_devices] if num_devices else None
  primary = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  if primary:
    report.write_atomic(workdir / "config.json", report.to_json(resolved))
  checkpoints = Checkpointer(workdir / CHECKPOINTS)
  lines, records = _read_metrics(workdir / "metrics.jsonl")
  state, examples = experiment.snapshot_template(config, dataset, devices)
  found = checkpoints.restore_latest((state, examples),
                                     usable=lambda meta: meta["num_records"] <= len(lines))
  resume = None
  if found:
    _, (state, examples), meta = found
    resume = experiment.Snapshot(meta["step"], state, examples, meta["notes"], meta["num_records"])
    print(f"Resuming from the checkpoint at step {resume.step} in {checkpoints.directory}.")
  kept = resume.num_records if resume else 0
  lines, records = lines[:kept], records[:kept]
  if primary:  # keep exactly the evaluations the checkpoint had seen
    report.write_atomic(workdir / "metrics.jsonl", "".join(lines))
  saved = []

  def on_snapshot(snapshot):
    if primary:  # the lines a checkpoint counts are on disk before it is
      metrics.flush()
      os.fsync(metrics.fileno())
    checkpoints.save(snapshot.step, (snapshot.state, snapshot.examples),
                     {"step": snapshot.step, "notes": snapshot.notes,
                      "num_records": snapshot.num_records})
    saved.append(snapshot.step)

  interrupted = []

  def on_sigint(signum, frame):
    interrupted.append(True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
    print("\nInterrupted: saving a checkpoint at the next evaluation (Ctrl-C again to stop now).",
          file=sys.stderr)

  start = time.perf_counter()
  previous = signal.signal(signal.SIGINT, on_sigint)
  try:
    with open(workdir / "metrics.jsonl", "a") if primary else open(os.devnull, "w") as metrics:
      def on_eval(new):
        records.extend(new)
        for record in new:
          metrics.write(json.dumps(record, allow_nan=False) + "\n")
        metrics.flush()
      results = experiment.run_experiment(
          config, dataset, on_eval=on_eval, progress=progress, devices=devices,
          resume=resume, records=records[:], on_snapshot=on_snapshot,
          snapshot_every=config.checkpoint_every, stop=lambda: bool(interrupted))
  finally:
    signal.signal(signal.SIGINT, previous)
    checkpoints.close()
  if results is None:
    again = " ".join(shlex.quote(a) for a in ["python", "-m", "experiments.run", *command])
    print(f"Stopped at step {saved[-1]} of {config.steps * config.feedback_rounds}; the checkpoint "
          f"is in {checkpoints.directory}. Resume with the same command:\n  {again}",
          file=sys.stderr)
    return INTERRUPTED
  results["config"] = resolved
  wall = time.perf_counter() - start
  if primary:
    report.write_atomic(workdir / "results.json", report.to_json(results))
    report.write_atomic(workdir / "timing.json", report.to_json(
        {"wall_seconds": wall, "resumed_from_step": resume.step if resume else None,
         "num_devices": results["num_devices"]}))
    summary = report.summary_markdown(results, wall, resume.step if resume else None)
    report.write_atomic(workdir / "summary.md", summary)
    report.plot_curves(records, workdir / "curves.png",
                       title=f"{config.protocol} protocol on {config.dataset}, {config.num_seeds} seeds")
    print(summary)
    print(f"Wrote {', '.join(OUTPUTS)} to {workdir}/")
  return 0


def cli() -> None:
  """The ``jaxsoftmax-run`` console script."""
  sys.exit(main())


if __name__ == "__main__":
  cli()
