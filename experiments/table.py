"""Every regime under every protocol of a config, from one command: one table per dataset.

    jaxsoftmax-table --config=feedback_digits --workdir=runs/table_digits
    jaxsoftmax-table --config=feedback_digits --config.dataset=mnist1d --workdir=runs/table_mnist1d
    jaxsoftmax-table --config=feedback_digits --config.dataset=npz:my_data.npz --workdir=runs/mine

For each protocol (``--protocols``, default ``uniform,biased,feedback``) it runs the config
through ``jaxsoftmax-run`` into ``WORKDIR/PROTOCOL`` with every regime that protocol can
train (``--config.regimes`` narrows the list; ``forward`` needs the transition matrix
that ``feedback`` has not). Each protocol is one run: all its regimes x seeds in one
compiled program, grouped by regime, resumable, refused or skipped as ``jaxsoftmax-run``
refuses or skips it. Rerunning the same command resumes where it stopped.

It then writes ``WORKDIR/table.md`` and ``WORKDIR/table.json``: per regime and protocol the
mean ± sample standard deviation over seeds of the test accuracy and test NLL at the last
step, and how many seeds diverged, at which steps; and each protocol's wall time.
Every other flag (``--config.KEY=VALUE``, ``--overwrite``, ``--progress``, ...) is passed
to each run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROTOCOLS = ("uniform", "biased", "feedback")
TABLE_MD, TABLE_JSON = "table.md", "table.json"


def _usage() -> str:
  return (
    "usage: jaxsoftmax-table --config=NAME|PATH --workdir=DIR [--protocols=P,...] "
    "[--config.KEY=VALUE ...] [jaxsoftmax-run flags]\n\n" + __doc__
  )


def regimes_for(config, protocol: str, wanted: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """The regimes of ``wanted`` that ``config`` can train under ``protocol``, and for each
  one left out the config check's reason."""
  from jaxsoftmax_experiments import config as config_lib

  kept, left_out = [], {}
  for name in wanted:
    trial = config.copy_and_resolve_references()
    with trial.unlocked():
      trial.protocol, trial.regimes = protocol, (name,)
    try:
      config_lib.validate(trial)
      kept.append(name)
    except config_lib.ConfigError as e:
      left_out[name] = str(e)
  return kept, left_out


def _cell(r: dict[str, Any]) -> str:
  from jaxsoftmax_experiments.report import mean_std

  diverged = sum(r["diverged"])
  steps = [s for s in r["diverged_at_step"] if s is not None]
  text = f"{mean_std(r['test_accuracy'])}<br>NLL {mean_std(r['test_nll'])}"
  if diverged:
    at = f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"
    text += f"<br>{diverged}/{len(r['diverged'])} diverged (steps {at})"
  return text


def table_markdown(table: dict[str, Any]) -> str:
  """``table.md`` from ``table.json``'s contents."""
  protocols = list(table["protocols"])
  regimes: list[str] = []
  for p in protocols:
    regimes += [r for r in table["protocols"][p]["regimes"] if r not in regimes]
  c = table["config"]
  lines = [
    f"# Every regime x protocol on {c['dataset']}",
    "",
    f"Model {c['model']}, {c['num_labeled']} true labels, {c['num_seeds']} seeds, "
    f"{c['steps']} steps, batch {c['batch_size']}, {c['optimizer']} at learning rate "
    f"{c['learning_rate']:g}. Each cell: test accuracy, test NLL (mean ± sample standard "
    "deviation over seeds, last step) and the seeds that diverged.",
    "",
    "| regime | " + " | ".join(protocols) + " |",
    "|---|" + "---|" * len(protocols),
  ]
  for regime in regimes:
    cells = [
      _cell(table["protocols"][p]["regimes"][regime])
      if regime in table["protocols"][p]["regimes"]
      else "n/a"
      for p in protocols
    ]
    lines.append(f"| {regime} | " + " | ".join(cells) + " |")
  lines += ["", "| protocol | runs | wall seconds | seconds per run |", "|---|---:|---:|---:|"]
  for p in protocols:
    entry = table["protocols"][p]
    runs = len(entry["regimes"]) * c["num_seeds"]
    wall = entry["wall_seconds"]
    resumed = " (resumed)" if entry.get("resumed_from_step") is not None else ""
    lines.append(f"| {p} | {runs} | {wall:.1f}{resumed} | {wall / runs:.2f} |")
  lines += [
    "",
    f"All protocols: {table['wall_seconds']:.1f} s (the sum of their wall times; a "
    "rerun of a finished table trains nothing and writes the same table).",
  ]
  left = {p: e["left_out"] for p, e in table["protocols"].items() if e["left_out"]}
  if left:
    lines += ["", "Left out (the config check's reason):"]
    lines += [f"- {p}, {r}: {why}" for p, reasons in left.items() for r, why in reasons.items()]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs every protocol; the exit status."""
  from jaxsoftmax_experiments import regimes as regimes_lib
  from jaxsoftmax_experiments import report, run

  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv):
    print(_usage())
    return 0
  protocols = list(PROTOCOLS)
  rest = []
  for arg in argv:
    if arg.startswith("--protocols="):
      protocols = [p for p in arg.split("=", 1)[1].split(",") if p]
      bad = [p for p in protocols if p not in PROTOCOLS]
      if bad or not protocols:
        return run._error(
          f"--protocols: must be a comma-separated list of {', '.join(PROTOCOLS)}, "
          f"got {arg.split('=', 1)[1]!r}."
        )
    elif arg.startswith(("--config.protocol=", "--config.protocol ")):
      return run._error(
        "--config.protocol: the table runs every protocol; choose them with "
        "--protocols=uniform,biased,feedback."
      )
    else:
      rest.append(arg)
  parsed = run.parse(rest, program="jaxsoftmax-table")
  if isinstance(parsed, int):
    return parsed
  fv, config = parsed
  root = Path(fv.workdir)
  given = any(a.startswith("--config.regimes=") for a in rest)
  wanted = list(config.regimes) if given else list(regimes_lib.NAMES)
  passed = [a for a in rest if not a.startswith(("--workdir=", "--config.regimes="))]
  entries = {}
  for protocol in protocols:
    kept, left_out = regimes_for(config, protocol, wanted)
    if not kept:
      return run._error(
        f"no regime of {', '.join(wanted)} can train under protocol "
        f"{protocol!r}: {next(iter(left_out.values()))}"
      )
    workdir = root / protocol
    print(f"== {protocol}: {len(kept)} regimes x {config.num_seeds} seeds in {workdir}", flush=True)
    status = run.main(
      [
        *passed,
        f"--workdir={workdir}",
        f"--config.protocol={protocol}",
        f"--config.regimes=({', '.join(repr(r) for r in kept)},)",
      ]
    )
    if status != 0:
      return status
    results = json.loads((workdir / "results.json").read_text())
    timing = json.loads((workdir / "timing.json").read_text())
    entries[protocol] = {
      "regimes": results["regimes"],
      "wall_seconds": timing["wall_seconds"],
      "resumed_from_step": timing["resumed_from_step"],
      "left_out": left_out,
      "config": results["config"],
    }
  table = {
    "config": entries[protocols[0]]["config"],
    "protocols": entries,
    "wall_seconds": sum(e["wall_seconds"] for e in entries.values()),
  }
  report.write_atomic(root / TABLE_JSON, report.to_json(table))
  text = table_markdown(table)
  report.write_atomic(root / TABLE_MD, text)
  print(text)
  print(f"Wrote {TABLE_MD} and {TABLE_JSON} to {root}/")
  return 0


def cli() -> None:
  """The ``jaxsoftmax-table`` console script."""
  sys.exit(main())


if __name__ == "__main__":
  cli()
