"""A run's folder: every file name, the config check, the metrics log, results, checkpoints.

    config.json     the resolved config, written when the run starts
    metrics.jsonl   the log: one line per evaluation per (regime, seed)
    results.json    the final evaluation of every run (from the final state)
    timing.json     this invocation's wall time and the step it resumed from
    summary.md      the regime table
    curves.png      test accuracy and training loss against step, from the log
    checkpoints/    Orbax checkpoints of the whole state, the newest 3

Whole files are written atomically (:func:`jaxsoftmax_experiments.report.write_atomic`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from jaxsoftmax_experiments import report

CONFIG, METRICS, RESULTS, TIMING, SUMMARY, CURVES = (
    "config.json", "metrics.jsonl", "results.json", "timing.json", "summary.md", "curves.png")
OUTPUTS = (CONFIG, METRICS, RESULTS, TIMING, SUMMARY, CURVES)
CHECKPOINTS = "checkpoints"
DAMAGED = CHECKPOINTS + "-damaged"


class Workdir:
  """The files of one run in ``path``."""

  def __init__(self, path: str | Path):
    self.path = Path(path)

  def __truediv__(self, name: str) -> Path:
    return self.path / name

  @property
  def checkpoints(self) -> Path:
    return self.path / CHECKPOINTS

  def holds_a_run(self) -> list[str]:
    """The run files already here (outputs and checkpoints)."""
    return [name for name in (*OUTPUTS, CHECKPOINTS) if (self.path / name).exists()]

  def clear(self) -> None:
    """Deletes a run's outputs and checkpoints from the folder, nothing else."""
    for name in OUTPUTS:
      (self.path / name).unlink(missing_ok=True)
    for name in (CHECKPOINTS, DAMAGED):
      shutil.rmtree(self.path / name, ignore_errors=True)

  def config_problem(self, resolved: dict) -> str | None:
    """Why the run here cannot be resumed with the config ``resolved``; None if it can."""
    existing = self.holds_a_run()
    if not existing:
      return None
    try:
      earlier = json.loads((self.path / CONFIG).read_text())
    except (OSError, ValueError) as e:
      return (f"--workdir {self.path} holds a run ({', '.join(existing)}) whose config.json cannot "
              f"be read ({e}); choose another folder or pass --overwrite to start afresh.")
    missing = object()
    differ = sorted(k for k in set(earlier) | set(resolved)
                    if earlier.get(k, missing) != resolved.get(k, missing))
    if not differ:
      return None
    changes = ", ".join(f"{k} ({earlier.get(k, 'unset')!r} -> {resolved.get(k, 'unset')!r})"
                        for k in differ)
    more = (" A finished or started run cannot be continued with more steps." if "steps" in differ
            else "")
    return (f"--workdir {self.path} holds a run of a different config; differing keys: {changes}."
            f"{more} Rerun with the same config to resume it, choose another folder, or pass "
            "--overwrite to start afresh.")

  def is_complete(self) -> bool:
    """A finished run is here: its results were written (after its config was checked)."""
    return (self.path / RESULTS).exists()

  def write_config(self, resolved: dict) -> None:
    self.path.mkdir(parents=True, exist_ok=True)
    report.write_atomic(self.path / CONFIG, report.to_json(resolved))

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

  def write_results(self, results: dict[str, Any], records: list[dict], wall: float,
                    resumed_from: int | None, title: str) -> str:
    """results.json, timing.json, summary.md and curves.png; returns the summary."""
    report.write_atomic(self.path / RESULTS, report.to_json(results))
    report.write_atomic(self.path / TIMING, report.to_json(
        {"wall_seconds": wall, "resumed_from_step": resumed_from,
         "num_devices": results["num_devices"]}))
    summary = report.summary_markdown(results, wall, resumed_from)
    report.write_atomic(self.path / SUMMARY, summary)
    report.plot_curves(records, self.path / CURVES, title=title)
    return summary
