"""Runs an experiment config from the command line and writes its results to a workdir.

    python -m experiments.run --config=configs/feedback_digits.py --workdir=runs/feedback_digits
    python -m experiments.run --config=configs/feedback_digits.py --workdir=runs/short \\
        --config.steps=200 --config.regimes="('positive_only', 'complement_likelihood')"

Also installed as ``jaxsoftmax-run``. A bad flag, an unknown config key or a value
out of range exits with status 2 and a message naming it, before anything is written.
A workdir that already holds a run is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from experiments import config as config_lib
from experiments import data, report

OUTPUTS = ("config.json", "metrics.jsonl", "results.json", "summary.md", "curves.png")


def _flags(argv: list[str]) -> flags.FlagValues:
  fv = flags.FlagValues()
  # sys_argv: the overrides to define come from argv, not from the process's sys.argv.
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Folder for the run's outputs.", flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "Replace the outputs of a run already in --workdir.",
                       flag_values=fv)
  flags.DEFINE_boolean("progress", True, "Show a progress bar.", flag_values=fv)
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
  existing = [name for name in OUTPUTS if (workdir / name).exists()]
  if existing and not fv.overwrite:
    return _error(f"--workdir {workdir} already holds a run ({', '.join(existing)}); "
                  "choose another folder or pass --overwrite to replace it.")
  return _run(config, dataset, workdir, progress=fv.progress)


def _run(config, dataset, workdir: Path, *, progress: bool) -> int:
  import jax  # after flag parsing, so that --help and bad flags answer at once

  from experiments.experiment import run_experiment

  workdir.mkdir(parents=True, exist_ok=True)
  resolved = config.to_dict()
  report.write_atomic(workdir / "config.json", report.to_json(resolved))
  start = time.perf_counter()
  records = []
  with open(workdir / "metrics.jsonl", "w") as metrics:
    def on_eval(new):
      records.extend(new)
      for record in new:
        metrics.write(json.dumps(record, allow_nan=False) + "\n")
      metrics.flush()
    results = run_experiment(config, dataset, on_eval=on_eval, progress=progress)
  results["config"] = resolved
  results["num_devices"] = jax.device_count()
  results["wall_seconds"] = time.perf_counter() - start
  report.write_atomic(workdir / "results.json", report.to_json(results))
  summary = report.summary_markdown(results)
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
