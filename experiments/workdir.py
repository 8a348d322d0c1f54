"""A run's folder: every file name, the config check, the metrics log, results, checkpoints::

    config.json     the resolved config, written when the run starts
    metrics.jsonl   the log: one line per evaluation per (regime, seed)
    results.json    the final evaluation of every run (from the final state)
    timing.json     this invocation's wall time and the step it resumed from
    summary.md      the regime table
    curves.png      test accuracy and training loss against step, from the log
    outputs.json    the record of the finished outputs: each file's name and SHA-256,
                    written last; a run is complete when every file matches it
    checkpoints/    Orbax checkpoints of the whole state, the newest 3

Whole files are written atomically (:func:`jaxsoftmax_experiments.report.write_atomic`).

Guarantees, each tested (``tests/experiments/test_workdir.py``):

- One run at a time: :meth:`Workdir.lock` takes an OS file lock (``fcntl.flock``) on
  ``.lock`` before anything is checked or written; a second command on the same folder
  is refused at once, naming the process that holds it. The OS releases the lock when
  that process ends, however it ends.
- The project deletes or moves only what it created inside the folder. A
  ``checkpoints`` folder that is a symbolic link (to a bigger disk) is used, but
  ``--overwrite`` removes only the checkpoint folders inside it, never the link or
  the folder it points to, and nothing is moved into a linked ``checkpoints-damaged``.
- Temporary files left by a kill before an atomic rename are removed when the next
  run starts.
- A run is complete only when every output is: ``outputs.json``, written after the
  others, records each one's SHA-256. A finished run whose record is missing (killed
  while writing its outputs) or whose outputs no longer match it (deleted, truncated,
  garbled) is resumed from its checkpoints, which writes the outputs again, the same
  byte for byte.
- ``--overwrite`` deletes only checkpoints this project wrote (an Orbax folder with its
  ``arrays`` and ``meta`` items), never another folder that happens to be named like a
  step.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxsoftmax_experiments import report
from jaxsoftmax_experiments.checkpoint import is_ours

CONFIG, METRICS, RESULTS, TIMING, SUMMARY, CURVES = (
  "config.json",
  "metrics.jsonl",
  "results.json",
  "timing.json",
  "summary.md",
  "curves.png",
)
OUTPUTS = (CONFIG, METRICS, RESULTS, TIMING, SUMMARY, CURVES)
RECORD = "outputs.json"
_LARGEST_CONFIG = 1 << 20  # a config.json larger than this is not one this project wrote
CHECKPOINTS = "checkpoints"
DAMAGED = CHECKPOINTS + "-damaged"
LOCK = ".lock"
_TEMPORARY = re.compile(
  r"^\.(" + "|".join(re.escape(n) for n in (*OUTPUTS, RECORD)) + r")\..*\.tmp$"
)
_STEP = re.compile(r"^\d+$|\.orbax-checkpoint-tmp")


class WorkdirError(RuntimeError):
  """The folder cannot be used as asked; the message says why and what to do."""


def fingerprint(resolved: dict, arrays) -> str:
  """A hash of the resolved config and of the data's arrays: what a checkpoint belongs to.

  ``arrays``: the data's arrays, followed by anything else that defines the data
  (a class count), hashed by its text."""
  h = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode())
  for a in arrays:
    if hasattr(a, "tobytes"):
      h.update(str(a.shape).encode() + str(a.dtype).encode())
      h.update(a.tobytes())
    else:
      h.update(str(a).encode())
  return h.hexdigest()


def _sha256(path: Path) -> str | None:
  try:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
  except OSError:
    return None


class Workdir:
  """The files of one run in ``path``."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self._lock = None

  def lock(self) -> None:
    """Claims the folder for this process (creating it), or raises :class:`WorkdirError`.

    Taking the lock writes nothing; :meth:`claim` records who holds it once the run
    goes ahead, so a refused or finished command leaves every file as it was.
    """
    if self.path.is_symlink() and not self.path.exists():
      raise WorkdirError(
        f"--workdir {self.path} is a symbolic link to a folder that does not "
        "exist; create the folder it points to or choose another."
      )
    try:
      self.path.mkdir(parents=True, exist_ok=True)
      handle = open(self.path / LOCK, "a+")
    except OSError as e:
      raise WorkdirError(
        f"--workdir {self.path} cannot be written ({e.strerror}); choose a folder you can write to."
      ) from None
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      handle.close()
      raise WorkdirError(
        f"--workdir {self.path} is in use by {holder}; wait for it to finish "
        "or choose another folder."
      ) from None
    self._lock = handle

  def claim(self, command: str) -> None:
    """Records this process as the lock's holder, for the message a second command gets."""
    self._lock.seek(0)
    self._lock.truncate()
    self._lock.write(f"process {os.getpid()} ({command})\n")
    self._lock.flush()

  def unlock(self) -> None:
    if self._lock is not None:
      self._lock.close()  # closing the file releases the lock
      self._lock = None

  def remove_temporary_files(self) -> list[str]:
    """Deletes temporary files an interrupted atomic write left here; returns their names."""
    names = [p.name for p in self.path.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    for name in names:
      (self.path / name).unlink()
    return names

  def __truediv__(self, name: str) -> Path:
    return self.path / name

  @property
  def checkpoints(self) -> Path:
    return self.path / CHECKPOINTS

  def holds_a_run(self) -> list[str]:
    """The run files already here (outputs, and a checkpoints folder holding checkpoints)."""
    found = [name for name in OUTPUTS if (self.path / name).exists()]
    checkpoints = self.path / CHECKPOINTS
    if checkpoints.is_dir() and any(_STEP.search(p.name) for p in checkpoints.iterdir()):
      found.append(CHECKPOINTS)
    return found

  def clear(self) -> list[str]:
    """Deletes a run's outputs and checkpoints from the folder, nothing else.

    Through a symbolic link it deletes only checkpoint folders (step numbers), never
    the link or what else the folder it points to holds. Any failure raises. Returns
    what it deleted, as paths relative to the folder.
    """
    deleted = []
    for name in (RECORD, *OUTPUTS):
      path = self.path / name
      if path.is_symlink() or path.is_file():
        path.unlink()
        deleted.append(name)
    for name in (CHECKPOINTS, DAMAGED):
      folder = self.path / name
      if folder.is_symlink():
        if folder.is_dir():
          for entry in folder.iterdir():
            if (
              _STEP.search(entry.name)
              and entry.is_dir()
              and not entry.is_symlink()
              and is_ours(entry)
            ):
              shutil.rmtree(entry)
              deleted.append(f"{name}/{entry.name}")
      elif folder.is_dir():
        shutil.rmtree(folder)
        deleted.append(f"{name}/")
    return deleted

  def config_problem(self, resolved: dict) -> str | None:
    """Why the run here cannot be resumed with the config ``resolved``; None if it can."""
    existing = self.holds_a_run()
    if not existing:
      return None
    path = self.path / CONFIG
    try:
      if path.exists() and not path.is_file():
        raise ValueError("it is not a regular file")
      if path.exists() and path.stat().st_size > _LARGEST_CONFIG:
        raise ValueError(f"it holds {path.stat().st_size} bytes, more than a config")
      earlier = json.loads(path.read_text())
      if not isinstance(earlier, dict):
        raise ValueError("it holds no JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
      return (
        f"--workdir {self.path} holds a run ({', '.join(existing)}) whose config.json cannot "
        f"be read ({e}); choose another folder or pass --overwrite to start afresh."
      )
    missing = object()
    differ = sorted(
      k for k in set(earlier) | set(resolved) if earlier.get(k, missing) != resolved.get(k, missing)
    )
    if not differ:
      return None
    changes = ", ".join(
      f"{k} ({earlier.get(k, 'unset')!r} -> {resolved.get(k, 'unset')!r})" for k in differ
    )
    more = ""
    if "steps" in differ:
      before, after = earlier.get("steps"), resolved.get("steps")
      fewer = isinstance(before, int) and isinstance(after, int) and after < before
      more = (
        f" A run is not cut short: its checkpoints and curves are of a {before}-step run."
        if fewer
        else " A finished or started run cannot be continued with more steps."
      )
    return (
      f"--workdir {self.path} holds a run of a different config; differing keys: {changes}."
      f"{more} Rerun with the same config to resume it, choose another folder, or pass "
      "--overwrite to start afresh."
    )

  def is_complete(self) -> bool:
    """A finished run is here: every output was written and matches the record of them
    (checked after the config was)."""
    path = self.path / RECORD
    try:
      if not path.is_file() or path.stat().st_size > _LARGEST_CONFIG:
        return False
      record = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
      return False
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or set(files) != set(OUTPUTS):
      return False
    return all(_sha256(self.path / name) == digest for name, digest in files.items())

  def write_config(self, resolved: dict) -> None:
    report.write_atomic(self.path / CONFIG, report.to_json(resolved))

  def forget_start(self) -> None:
    """Removes what a run that failed before its first checkpoint wrote (config.json, the
    log, an Orbax temporary folder of a save that did not finish, and the checkpoints
    folder if that leaves it empty), so that the corrected command is not refused as
    another config and meets a clean folder. A run with a finished checkpoint is kept:
    it can be resumed. Nothing that this project did not write is touched."""
    checkpoints = self.path / CHECKPOINTS
    entries = list(checkpoints.iterdir()) if checkpoints.is_dir() else []
    if any(p.name.isdigit() and is_ours(p) for p in entries):
      return
    for entry in entries:
      if ".orbax-checkpoint-tmp" in entry.name and entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    if checkpoints.is_dir() and not checkpoints.is_symlink() and not any(checkpoints.iterdir()):
      checkpoints.rmdir()
    for name in (CONFIG, METRICS):
      (self.path / name).unlink(missing_ok=True)

  def read_metrics(self) -> tuple[list[str], list[dict]]:
    """The complete lines of ``metrics.jsonl`` and their records (a line cut short by a
    kill, and anything after it, is dropped)."""
    lines, records = [], []
    path = self.path / METRICS
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

  def keep_metrics(self, lines: list[str]) -> None:
    """Rewrites the log as exactly ``lines`` (the evaluations a checkpoint has seen)."""
    report.write_atomic(self.path / METRICS, "".join(lines))

  def append_metrics(self, log, records: list[dict]) -> None:
    """Appends ``records`` to the open log and puts them on disk before a checkpoint counts them."""
    for record in records:
      log.write(json.dumps(record, allow_nan=False) + "\n")
    log.flush()
    os.fsync(log.fileno())

  def write_outputs(
    self,
    results: dict[str, Any],
    summary: str,
    plot: Callable[[Path], None],
    wall: float,
    resumed_from: int | None,
  ) -> None:
    """results.json, timing.json, summary.md and curves.png (``plot`` writes it), then the
    record of every output, last: the run is complete from that moment on."""
    report.write_atomic(self.path / RESULTS, report.to_json(results))
    timing = {"wall_seconds": wall, "resumed_from_step": resumed_from}
    if "num_devices" in results:
      timing["num_devices"] = results["num_devices"]
    report.write_atomic(self.path / TIMING, report.to_json(timing))
    report.write_atomic(self.path / SUMMARY, summary)
    plot(self.path / CURVES)
    files = {name: _sha256(self.path / name) for name in OUTPUTS}
    report.write_atomic(self.path / RECORD, report.to_json({"files": files}))
