"""Runs an experiment config from the command line and writes its results to a workdir.

    jaxsoftmax-run --config=feedback_digits --workdir=runs/feedback_digits
    python -m jaxsoftmax_experiments.run --config=feedback_digits --workdir=runs/short \\
        --config.steps=200 --config.regimes="('positive_only', 'complement_likelihood')"

``--config`` takes a config by name (``feedback_digits``, ``feedback_digits:hierarchical``,
from any directory) or a path to a config file. ``--help`` lists the flags and every
config key. A bad flag, an unknown config key or a value out of range exits with
status 2 and a message naming it, before anything is written.

The loop (:mod:`jaxsoftmax_experiments.loop`) yields the experiment's state after every
evaluation; this module logs it, checkpoints it every ``config.checkpoint_every`` steps
and stops on Ctrl-C (a checkpoint, then exit status 130). Rerunning the same command
resumes from the newest checkpoint that restores; rerunning a finished one says so and
changes nothing. A workdir holding a run of another config is refused, naming the keys
that differ, unless ``--overwrite`` is given.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT
_FLAGS = """\
  --config=NAME|PATH     a packaged config by name (feedback_digits, mnist1d_supervised:cnn)
                         or a config file; NAME:ARG passes ARG to its get_config
  --workdir=DIR          folder for the run's outputs (required)
  --overwrite            delete the run already in --workdir and start afresh
  --progress=false       no progress bar (one line per evaluation is printed instead
                         when the output is not a terminal)
  --num_devices=N        train on the first N devices; 0: all
  --compilation_cache=DIR  where compiled programs are kept for reruns (default:
                         $XDG_CACHE_HOME/jaxsoftmax/xla or ~/.cache/jaxsoftmax/xla);
                         --compilation_cache= turns it off
  --distributed          call jax.distributed.initialize first (one process per host), with
                         --coordinator_address, --num_processes and --process_id where the
                         cluster does not provide them
  --help                 this text"""


def _usage() -> str:
  from jaxsoftmax_experiments import config as config_lib
  from jaxsoftmax_experiments import configs
  names = configs.names()
  return (f"usage: jaxsoftmax-run --config=NAME|PATH --workdir=DIR [--config.KEY=VALUE ...]\n\n"
          f"Trains every regime x seed of an experiment config and writes config.json, "
          f"metrics.jsonl, results.json, summary.md and curves.png to --workdir.\n\n"
          f"flags:\n{_FLAGS}\n\npackaged configs: {', '.join(names)}\n\n"
          f"config keys (override any as --config.KEY=VALUE):\n{config_lib.describe()}\n")


def _default_cache() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxsoftmax", "xla")


def _flags(argv: list[str]):
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  # sys_argv: the overrides to define come from argv, not from the process's sys.argv.
  config_flags.DEFINE_config_file("config", None, "Experiment config.", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Folder for the run's outputs.", flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "Start afresh.", flag_values=fv)
  flags.DEFINE_boolean("progress", True, "Show a progress bar.", flag_values=fv)
  flags.DEFINE_integer("num_devices", 0, "Devices to use; 0: all.", lower_bound=0, flag_values=fv)
  flags.DEFINE_string("compilation_cache", _default_cache(), "Persistent compilation cache.",
                      flag_values=fv)
  flags.DEFINE_boolean("distributed", False, "jax.distributed.initialize first.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "Process 0's host:port.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=fv)
  return fv


def resolve_config_arg(arg: str) -> str:
  """``--config=NAME[:ARG]`` names a packaged config; anything else is taken as a path."""
  from jaxsoftmax_experiments import configs
  name, colon, rest = arg.partition(":")
  packaged = None if "/" in name or name.endswith(".py") else configs.path(name)
  return packaged + colon + rest if packaged else arg


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


class _Interrupt:
  """Ctrl-C: before the run has started, stop at once; after, finish the evaluation,
  checkpoint and stop; a second Ctrl-C stops at once."""

  def __init__(self):
    self.started = False
    self.requested = False

  def __call__(self, signum, frame):
    if not self.started or self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print("\nInterrupted: saving a checkpoint at the next evaluation (Ctrl-C again to stop now).",
          file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs the experiment; returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv):
    print(_usage())
    return 0
  interrupt = _Interrupt()
  previous = signal.signal(signal.SIGINT, interrupt)
  try:
    return _main(argv, interrupt)
  except KeyboardInterrupt:
    print("\nInterrupted before the next checkpoint; rerun the same command to resume from the "
          "last one (if any).", file=sys.stderr)
    return INTERRUPTED
  finally:
    signal.signal(signal.SIGINT, previous)


def parse(argv: list[str], program: str = "jaxsoftmax-run"):
  """The parsed flags and the config of a command line, or the exit status of an error
  (printed, naming the flag or key)."""
  from absl import flags

  from jaxsoftmax_experiments import config as config_lib

  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config."):
      key = arg[len("--config."):].split("=")[0].split(".")[0]
      if key not in config_lib.KEYS:
        return _error(f"config.{key}: unknown key; the keys are {', '.join(config_lib.KEYS)} "
                      "(--help describes each).")
    elif arg.startswith("--config="):
      argv[i] = "--config=" + resolve_config_arg(arg[len("--config="):])
  argv = [program, *argv]
  fv = _flags(argv)
  if not any(a.startswith("--config=") for a in argv) and any(a.startswith("--config.") for a in argv):
    return _error("--config.KEY=VALUE overrides need a config: add --config=NAME or "
                  "--config=PATH (e.g. --config=feedback_digits).")
  try:
    fv(argv)
  except (flags.Error, ValueError, TypeError, AttributeError, KeyError) as e:
    missing = re.fullmatch(r"\"?'([\w.]+)'\"?", str(e))
    if missing:  # an override of a key that the config file does not hold
      return _error(f"--config.{missing.group(1)}: the config has no such key; a config file "
                    "starts from jaxsoftmax_experiments.config.defaults(), which holds every key.")
    return _error(f"{e} (--help lists the flags and config keys).")
  except Exception as e:  # the config file itself: a syntax error, or get_config raising  # noqa: BLE001
    return _error(f"cannot load --config: {type(e).__name__}: {e}")
  if not fv["config"].present and fv["config"].value is None:
    return _error("--config is required, e.g. --config=feedback_digits.")
  if not fv.workdir:
    return _error("--workdir is required, e.g. --workdir=runs/feedback_digits.")
  try:
    config = fv.config
    if type(config).__name__ == "_ErrorConfig":  # absl's stand-in for a file that failed
      config.to_dict()                            # to load raises that failure here
  except Exception as e:  # a missing config file, or one that raises  # noqa: BLE001
    return _error(f"cannot load --config: {type(e).__name__}: {e}")
  return fv, config


def _main(argv: list[str], interrupt: _Interrupt) -> int:
  from jaxsoftmax_experiments import config as config_lib
  from jaxsoftmax_experiments import data, report
  from jaxsoftmax_experiments.workdir import Workdir, WorkdirError

  command = list(argv)  # as the user typed it, for the resume hint
  parsed = parse(argv)
  if isinstance(parsed, int):
    return parsed
  fv, config = parsed
  try:
    config_lib.validate(config)
    dataset = data.load(config.dataset)
    # Before jax.distributed.initialize nothing may start a JAX backend: no estimate then.
    config_lib.validate(config, len(dataset.y_train), dataset.num_classes, dataset.input_shape,
                        None if fv.distributed else _memory_bytes())
  except (config_lib.ConfigError, data.DataError) as e:
    return _error(str(e))

  workdir = Workdir(fv.workdir)
  if workdir.path.exists() and not workdir.path.is_dir():
    return _error(f"--workdir {workdir.path} exists and is not a folder.")
  resolved = json.loads(report.to_json(config.to_dict()))
  primary = True
  if fv.distributed:
    import jax

    from jaxsoftmax_experiments import parallel
    parallel.initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
    primary = jax.process_index() == 0
  if not primary:  # process 0 claims, checks and writes the folder
    return _run(config, resolved, dataset, workdir, progress=False, num_devices=fv.num_devices,
                cache=fv.compilation_cache, command=command, interrupt=interrupt)
  try:
    workdir.lock()
  except WorkdirError as e:
    return _error(str(e))
  try:
    workdir.remove_temporary_files()
    if fv.overwrite:
      try:
        workdir.clear()
      except OSError as e:
        return _error(f"--overwrite could not delete the earlier run in {workdir.path}: {e}")
    else:
      problem = workdir.config_problem(resolved)
      if problem:
        return _error(problem)
      if workdir.is_complete():
        print(f"The run in {workdir.path} is complete ({config.steps * config.feedback_rounds} "
              "steps); nothing to do. Its results are in results.json and summary.md; pass "
              "--overwrite to run it afresh.")
        return 0
    return _run(config, resolved, dataset, workdir, progress=fv.progress,
                num_devices=fv.num_devices, cache=fv.compilation_cache, command=command,
                interrupt=interrupt)
  finally:
    workdir.unlock()


def _memory_bytes() -> int:
  """What the runs may use: the accelerator's memory, or the machine's for the CPU."""
  import jax

  from jaxsoftmax_experiments import config as config_lib
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit") or config_lib.available_memory()


def _enable_cache(directory: str) -> None:
  import jax
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


class _Progress:
  """A progress bar over the steps asked for, or one line per evaluation in a log."""

  def __init__(self, total: int, done: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    self.lines = enabled and not sys.stderr.isatty()
    self.total = total
    self.bar = tqdm(total=total, initial=done, desc=desc, unit="step", dynamic_ncols=True,
                    disable=not enabled or self.lines)

  def update(self, step: int, accuracy: dict[str, float]) -> None:
    text = ", ".join(f"{r} {a:.3f}" for r, a in accuracy.items())
    if self.lines:
      print(f"step {step}/{self.total}: mean test accuracy {text}", file=sys.stderr, flush=True)
    else:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix({r.split("_")[0]: f"{a:.3f}" for r, a in accuracy.items()})

  def close(self) -> None:
    self.bar.close()


def _run(config, resolved: dict, dataset, workdir, *, progress: bool, num_devices: int,
         cache: str, command: list[str], interrupt: _Interrupt) -> int:
  import jax  # after flag parsing, so that --help and bad flags answer at once
  import numpy as np

  from jaxsoftmax_experiments import loop, parallel
  from jaxsoftmax_experiments import workdir as workdir_lib
  from jaxsoftmax_experiments.checkpoint import Checkpointer, CheckpointError

  _enable_cache(cache)
  start_time = time.perf_counter()
  devices = jax.devices()[:num_devices] if num_devices else None
  primary = jax.process_index() == 0
  if primary:
    workdir.claim(" ".join(["jaxsoftmax-run", *command]))
    workdir.write_config(resolved)
  saved, resumed_from, step, checkpoints = [], None, 0, None
  try:
    plan = loop.make_plan(config, dataset, devices)
    checkpoints = Checkpointer(workdir.checkpoints)
    fingerprint = workdir_lib.fingerprint(resolved, dataset)
    lines, records = workdir.read_metrics()
    found = checkpoints.restore_latest(loop.template(plan), fingerprint=fingerprint,
                                       usable=lambda meta: meta["num_records"] <= len(lines))
    state = None
    if found:
      resumed_from, state, _ = found
      print(f"Resuming from the checkpoint at step {resumed_from} in {checkpoints.directory}.")
    if primary:  # newer ones are stale now: the run goes on from the one restored
      checkpoints.drop_after(resumed_from if found else -1)
    kept = int(found[2]["num_records"]) if found else 0
    lines, records = lines[:kept], records[:kept]
    if primary:  # keep exactly the evaluations the checkpoint had seen
      workdir.keep_metrics(lines)
    total = plan.total_steps
    bar = _Progress(total, resumed_from or 0, f"{config.dataset}/{config.protocol}", progress)
    every = config.checkpoint_every
    next_save = ((resumed_from or 0) // every + 1) * every if every else None
    try:
      with open(workdir / "metrics.jsonl", "a") if primary else open(os.devnull, "w") as log:
        for state in loop.run(plan, state):
          host = parallel.fetch(loop.light(state))
          step = int(host.step)
          if step != resumed_from:  # a restored state's evaluation is in the log already
            new = loop.records(plan, host)
            records.extend(new)
            if primary:
              workdir.append_metrics(log, new)
          accuracy = {r: float(np.mean(m["test_accuracy"]))
                      for r, m in zip(plan.setup.regimes, host.metrics)}
          bar.update(step, accuracy)
          due = next_save is not None and step >= next_save
          if step > 0 and step != resumed_from and (due or step == total or interrupt.requested):
            checkpoints.save(step, state, {"step": step, "num_records": len(records),
                                           "fingerprint": fingerprint})
            saved.append(step)
            if every:
              next_save = (step // every + 1) * every
          if interrupt.requested:
            break
          interrupt.started = True  # from now on, Ctrl-C stops at the next evaluation
    finally:
      bar.close()
  except CheckpointError as e:
    return _error(f"{e} Pass --overwrite to start afresh, or choose another --workdir.")
  except OSError as e:  # a full disk, a folder that became unwritable
    last = saved[-1] if saved else resumed_from
    kept = f"the checkpoint at step {last} is kept" if last else "no checkpoint was taken"
    print(f"error: writing to {workdir.path} failed at step {step} ({e.strerror or e}); {kept}. "
          "Rerun the same command once the problem is fixed.", file=sys.stderr)
    if primary and not last:
      workdir.forget_start()
    return 1
  except BaseException:
    if checkpoints is not None:
      checkpoints.close()
      checkpoints = None
    if primary and not saved and resumed_from is None:
      workdir.forget_start()  # nothing to resume: the corrected command must not be refused
    raise
  finally:
    if checkpoints is not None:
      checkpoints.close()
  if step < total:
    again = " ".join(shlex.quote(a) for a in ["jaxsoftmax-run", *command])
    where = (f"the checkpoint is in {checkpoints.directory}" if saved
             else "no checkpoint was taken yet")
    print(f"Stopped at step {saved[-1] if saved else step} of {total}; {where}. Resume with the "
          f"same command:\n  {again}", file=sys.stderr)
    return INTERRUPTED
  results = loop.results(plan, parallel.fetch(loop.light(state, examples=True)))
  results["config"] = resolved
  wall = time.perf_counter() - start_time
  if primary:
    summary = workdir.write_results(
        results, records, wall, resumed_from,
        title=f"{config.protocol} protocol on {config.dataset}, {config.num_seeds} seeds")
    print(summary)
    print(f"Wrote config.json, metrics.jsonl, results.json, timing.json, summary.md and "
          f"curves.png to {workdir.path}/")
  return 0


def cli() -> None:
  """The ``jaxsoftmax-run`` console script."""
  sys.exit(main())


if __name__ == "__main__":
  cli()
