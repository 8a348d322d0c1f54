"""One driver for every kind: a config and a workdir in, a finished (or resumable) run out.

:func:`execute` claims the workdir (an OS lock), refuses a folder holding another
config's run (naming the keys that differ) unless asked to overwrite it, recognises a
finished run by the record of its outputs, resumes from the newest checkpoint that
restores, checkpoints every ``config.checkpoint_every`` steps (at evaluations) and at
the end, logs every evaluation to ``metrics.jsonl``, stops cleanly on Ctrl-C, and
writes the outputs and then their record. A start that fails before its first
checkpoint is forgotten, so the corrected command is not refused. The kind
(:mod:`jaxsoftmax_experiments.kinds`) brings only its data, state, loop and metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


@dataclasses.dataclass
class Options:
  """How to run, beside the config: the command line's flags."""

  overwrite: bool = False
  progress: bool = True
  num_devices: int = 0
  compilation_cache: str = ""
  distributed: bool = False
  distributed_args: tuple = (None, None, None)  # coordinator_address, num_processes, process_id
  command: Sequence[str] = ()  # the command as typed, for the resume hint
  program: str = "jaxsoftmax-run"
  stop_after: int | None = None  # evaluations after which to stop as Ctrl-C would (tests)


class Interrupt:
  """Ctrl-C: before the run has started, stop at once; after, finish the evaluation,
  checkpoint and stop; a second Ctrl-C stops at once.

  Stopping at once raises KeyboardInterrupt in whatever Python code runs when the
  signal arrives. Where that is a callback whose exceptions Python drops (JAX's garbage
  collector callback, a ``__del__``), the interrupt would be lost and the run would go
  on: while :meth:`installed`, the process's ``sys.unraisablehook`` keeps it silent and
  sends the signal again from another thread, to be raised once the callback has
  returned."""

  def __init__(self):
    self.started = False
    self.requested = False
    self.dropped = False  # a KeyboardInterrupt that Python dropped, sent again
    self.stop_now = False  # one was dropped: stop at the next check, even if the resent one is lost
    self.active = False  # installed: a dropped interrupt is sent again only while it is
    self._sending = threading.Lock()  # held while a dropped interrupt is sent again
    self.next_stop = None  # the step of the next evaluation, where a first Ctrl-C stops

  @contextlib.contextmanager
  def installed(self):
    """This object as the process's SIGINT handler, with its ``sys.unraisablehook``,
    for the duration of a command; the previous ones afterwards."""
    self.active = True
    previous = signal.signal(signal.SIGINT, self)
    previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable(sys.unraisablehook)
    try:
      yield self
    finally:
      self.active = False  # from here on, a SIGINT this object handles is ignored
      with self._sending:  # a signal being sent again is sent, to this object, not previous
        pass
      signal.signal(signal.SIGINT, previous)  # handles a pending SIGINT first, with this object
      sys.unraisablehook = previous_hook

  def __call__(self, signum, frame):
    if not self.active:  # the command has returned: its interrupt, sent again late
      return
    if not self.started or self.requested or self.dropped:
      self.dropped = False
      raise KeyboardInterrupt
    self.requested = True
    at = f", step {self.next_stop}" if self.next_stop is not None else ""
    print(
      f"\nInterrupted: the run stops at the next evaluation{at} (the steps between two "
      "evaluations run as one compiled program) and saves a checkpoint there; Ctrl-C again "
      "to stop now and resume from the last checkpoint.",
      file=sys.stderr,
    )

  def _unraisable(self, previous):
    """A ``sys.unraisablehook`` that sends a dropped KeyboardInterrupt's signal again and
    passes every other exception on to ``previous``."""

    def hook(info):
      if isinstance(info.exc_value, KeyboardInterrupt):
        self.dropped = self.stop_now = True
        threading.Timer(0.01, self._send_again).start()
      else:
        previous(info)

    return hook

  def check(self) -> None:
    """Raises KeyboardInterrupt where a dropped one is pending: the signal sent again can
    itself land where it is lost (a library's broad ``except``), so the loop asks too."""
    if self.stop_now:
      raise KeyboardInterrupt

  def _send_again(self) -> None:
    with self._sending:
      if self.active:  # not once the command has returned: nothing would catch it
        signal.raise_signal(signal.SIGINT)


def error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def memory_bytes() -> int:
  """What the runs may use: the accelerator's memory, or the machine's for the CPU."""
  import jax

  from jaxsoftmax_experiments import config as config_lib

  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit") or config_lib.available_memory()


def enable_cache(directory: str) -> None:
  import jax

  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


class Progress:
  """A progress bar over the steps asked for, or one line per evaluation in a log."""

  def __init__(self, total: int, done: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    self.lines = enabled and not sys.stderr.isatty()
    self.total = total
    self.bar = tqdm(
      total=total,
      initial=done,
      desc=desc,
      unit="step",
      dynamic_ncols=True,
      disable=not enabled or self.lines,
    )

  def update(self, step: int, values: dict[str, float], what: str) -> None:
    text = ", ".join(f"{r} {a:.3f}" for r, a in values.items())
    if self.lines:
      print(f"step {step}/{self.total}: mean {what} {text}", file=sys.stderr, flush=True)
    else:
      self.bar.update(step - self.bar.n)
      short = short_names(list(values))
      self.bar.set_postfix({short[r]: f"{a:.3f}" for r, a in values.items()})

  def close(self) -> None:
    self.bar.close()


def short_names(names: list[str]) -> dict[str, str]:
  """Each regime's name cut to its fewest leading words (``_``-separated) that no other
  name shares: ``softmax_y_over_size`` and ``softmax_plus_complement`` are ``softmax_y``
  and ``softmax_plus``, not one ``softmax``."""
  short = {}
  for name in names:
    words = name.split("_")
    for n in range(1, len(words) + 1):
      prefix = "_".join(words[:n])
      if not any(o != name and (o == prefix or o.startswith(prefix + "_")) for o in names):
        break
    short[name] = prefix
  return short


def prepare(config, distributed: bool = False):
  """The kind, its data and the resolved config of a validated config, or the exit status
  of a refusal (printed, naming the key or the data's problem)."""
  import json

  from jaxsoftmax_experiments import config as config_lib
  from jaxsoftmax_experiments import data as data_lib
  from jaxsoftmax_experiments import kinds, report

  try:
    config_lib.validate(config)
    kind = kinds.get(config_lib.kind_of(config))
    data = kind.load(config)
    # Before jax.distributed.initialize nothing may start a JAX backend: no estimate then.
    kind.check(config, data, None if distributed else memory_bytes())
  except (config_lib.ConfigError, data_lib.DataError) as e:
    return error(str(e))
  return kind, data, json.loads(report.to_json(config_lib.recorded(config.to_dict())))


def execute(config, workdir_path, options: Options, interrupt: Interrupt | None = None) -> int:
  """Runs (or resumes, or recognises as finished) ``config`` in ``workdir_path``; returns
  the exit status: 0 done, 2 refused (a message names why), 1 a write failed, 130 stopped."""
  global WRITE_FAILED
  WRITE_FAILED = False  # this command's own, not an earlier in-process call's
  from jaxsoftmax_experiments.workdir import Workdir, WorkdirError

  interrupt = interrupt or Interrupt()
  prepared = prepare(config, options.distributed)
  if isinstance(prepared, int):
    return prepared
  kind, data, resolved = prepared
  workdir = Workdir(workdir_path)
  if workdir.path.exists() and not workdir.path.is_dir():
    return error(f"--workdir {workdir.path} exists and is not a folder.")
  primary = True
  if options.distributed:
    import jax

    from jaxsoftmax_experiments import parallel

    try:
      parallel.initialize_distributed(*options.distributed_args)
    except (ValueError, RuntimeError) as e:
      return error(
        f"--distributed: jax.distributed.initialize failed: {e} Run one process per "
        "host under a cluster that JAX detects, or pass --coordinator_address, "
        "--num_processes and --process_id."
      )
    primary = jax.process_index() == 0
  if not primary:  # process 0 claims, checks and writes the folder
    return _run(kind, config, resolved, data, workdir, options, interrupt, primary=False)
  try:
    workdir.lock()
  except WorkdirError as e:
    return error(str(e))
  try:
    workdir.remove_temporary_files()
    if options.overwrite:
      try:
        deleted = workdir.clear()
      except OSError as e:
        return error(f"--overwrite could not delete the earlier run in {workdir.path}: {e}")
      if deleted:
        print(f"--overwrite deleted the earlier run in {workdir.path}: {', '.join(deleted)}.")
    else:
      problem = workdir.config_problem(resolved)
      if problem:
        return error(problem)
      if workdir.is_complete():
        print(
          f"The run in {workdir.path} is complete ({kind.total_steps(config)} steps); "
          "nothing to do. Its results are in results.json and summary.md; pass "
          "--overwrite to run it afresh."
        )
        return 0
    return _run(kind, config, resolved, data, workdir, options, interrupt, primary=True)
  except OSError as e:  # a full disk, a folder that became unwritable, before the run began
    return _write_failed(workdir, e, step=0, last=None)
  finally:
    workdir.unlock()


def _write_failed(workdir, e: OSError, step: int, last: int | None) -> int:
  kept = f"the checkpoint at step {last} is kept" if last else "no checkpoint was taken"
  print(
    f"error: writing to {workdir.path} failed at step {step} ({e.strerror or e}); {kept}. "
    "Rerun the same command once the problem is fixed.",
    file=sys.stderr,
  )
  if not last:
    try:
      workdir.forget_start()
    except OSError:
      pass
  global WRITE_FAILED
  WRITE_FAILED = True
  return 1


# Set when a command ended on a failed write: the console scripts then silence what
# Orbax's writer threads still print as the interpreter shuts down.
WRITE_FAILED = False


def _run(
  kind, config, resolved: dict, data, workdir, options: Options, interrupt: Interrupt, primary: bool
) -> int:
  import jax  # after flag parsing, so that --help and bad flags answer at once

  from jaxsoftmax_experiments import workdir as workdir_lib
  from jaxsoftmax_experiments.checkpoint import Checkpointer, CheckpointError

  enable_cache(options.compilation_cache)
  start_time = time.perf_counter()
  devices = jax.devices()[: options.num_devices] if options.num_devices else None
  if primary:
    workdir.claim(" ".join([options.program, *options.command]))
    workdir.write_config(resolved)
  saved, resumed_from, step, checkpoints = [], None, 0, None
  try:
    plan = kind.plan(config, data, devices)
    checkpoints = Checkpointer(workdir.checkpoints)
    fingerprint = workdir_lib.fingerprint(resolved, kind.arrays(data))
    lines, records = workdir.read_metrics()
    found = checkpoints.restore_latest(
      kind.template(plan),
      fingerprint=fingerprint,
      usable=lambda meta: meta["num_records"] <= len(lines),
    )
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
    total = kind.total_steps(config)
    bar = Progress(total, resumed_from or 0, kind.title(config), options.progress)
    every = config.checkpoint_every
    next_save = ((resumed_from or 0) // every + 1) * every if every else None
    evaluations = 0
    try:
      with open(workdir / workdir_lib.METRICS, "a") if primary else open(os.devnull, "w") as log:
        interrupt.check()
        for state in kind.run(plan, state):
          interrupt.check()
          host = kind.host(plan, state)
          step = kind.step(host)
          if step != resumed_from:  # a restored state's evaluation is in the log already
            new = kind.records(plan, host, records)
            records.extend(new)
            if primary:
              workdir.append_metrics(log, new)
            evaluations += 1
          else:
            new = [r for r in records if r["step"] == step]
          what, values = kind.progress(plan, new)
          bar.update(step, values, what)
          if options.stop_after is not None and evaluations >= options.stop_after:
            interrupt.requested = True
          due = next_save is not None and step >= next_save
          if step > 0 and step != resumed_from and (due or step == total or interrupt.requested):
            checkpoints.save(
              step, state, {"step": step, "num_records": len(records), "fingerprint": fingerprint}
            )
            saved.append(step)
            if every:
              next_save = (step // every + 1) * every
          if interrupt.requested and step < total:
            break
          interrupt.next_stop = min(total, (step // config.eval_every + 1) * config.eval_every)
          interrupt.started = True  # from now on, Ctrl-C stops at the next evaluation
    finally:
      bar.close()
    if step < total:
      again = " ".join(shlex.quote(a) for a in [options.program, *options.command])
      where = (
        f"the checkpoint is in {checkpoints.directory}" if saved else "no checkpoint was taken yet"
      )
      print(
        f"Stopped at step {saved[-1] if saved else step} of {total}; {where}. Resume with "
        f"the same command:\n  {again}",
        file=sys.stderr,
      )
      return INTERRUPTED
    wall = time.perf_counter() - start_time
    results, summary, plot = kind.outputs(plan, state, records, resolved, wall, resumed_from)
    if primary:
      workdir.write_outputs(results, summary, plot, wall, resumed_from)
      print(summary)
      print(f"Wrote {', '.join(workdir_lib.OUTPUTS)} to {workdir.path}/")
    return 0
  except CheckpointError as e:
    if not e.overwrite_helps:
      return error(str(e))
    return error(f"{e} Pass --overwrite to start afresh, or choose another --workdir.")
  except OSError as e:  # a full disk, a folder that became unwritable
    last = saved[-1] if saved else resumed_from
    return _write_failed(workdir, e, step, last) if primary else 1
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
