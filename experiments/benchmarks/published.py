"""Reruns the command behind each published table and compares the table with its output.

Each table in the README and the guides that a command produces is marked, on the line
before it, with ``<!-- published: NAME -->``; :data:`PUBLISHED` says which command NAME
is and which of its output files holds the table. For every row of a published table
whose first cell names a regime in backticks, every ``mean ± std`` figure must equal
(at the precision printed) one of the output row's figures, in order; a percentage is
compared with the output's fraction. Run from the repository's root:

    python -m experiments.benchmarks.published [--only NAME ...] [--workdir DIR]

A run already complete in ``--workdir`` (the default ``runs/published``) is not
repeated: the command itself returns at once. Exit status 1 when any figure differs.
The figures depend on the CPU model (see the runs guide); on another CPU this script
shows by how much.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Published:
  command: tuple[str, ...]  # the console script and its arguments, less --workdir
  output: str  # the file in the workdir that holds the table
  # For a table of several commands: the first cell's start of this command's row, and
  # the output row (regime) it shows; None: every row names its regime.
  row: tuple[str, str] | None = None
  # (a figure the command writes, the committed copy that must equal it byte for byte)
  image: tuple[str, str] | None = None
  prepare: str | None = None  # Python code that writes the command's input first
  table: int = 0  # which table of the output file (0: the first), beside its text
  run: str | None = None  # the NAME whose run folder holds this one's output (the same command)


def output_table(lines: list[str], index: int) -> list[str]:
  """The output's lines less the rows of every table but the ``index``-th (a table is a
  run of lines that start with ``|``): its text stays, for rows it gives in prose."""
  out, table, inside = [], -1, False
  for line in lines:
    row = line.startswith("|")
    if row and not inside:
      table += 1
    inside = row
    if not row or table == index:
      out.append(line)
  return out


PUBLISHED = {
  "feedback_digits": Published(
    ("jaxsoftmax-run", "--config=feedback_digits"),
    "summary.md",
    image=("curves.png", "docs/images/feedback_digits_curves.png"),
  ),
  "table_digits": Published(("jaxsoftmax-table", "--config=feedback_digits"), "table.md"),
  "table_mnist1d": Published(
    ("jaxsoftmax-table", "--config=feedback_digits", "--config.dataset=mnist1d"), "table.md"
  ),
  "table_npz": Published(
    (
      "jaxsoftmax-table",
      "--config=feedback_digits",
      "--config.dataset=npz:runs/classification5.npz",
    ),
    "table.md",
    # The literature guide's command for the file.
    prepare=(
      "import numpy as np; from sklearn.datasets import make_classification as m; "
      "from sklearn.model_selection import train_test_split as s\n"
      "x, y = m(n_samples=3000, n_features=20, n_informative=10, n_classes=5, "
      "n_clusters_per_class=2, random_state=0)\n"
      "a, b, c, d = s(x, y, test_size=0.25, random_state=0, stratify=y); "
      "np.savez('runs/classification5.npz', x_train=a, y_train=c, x_test=b, y_test=d)"
    ),
  ),
  "lm_repetition": Published(("jaxsoftmax-run", "--config=lm_repetition"), "summary.md"),
  "lm_unlearning": Published(("jaxsoftmax-run", "--config=lm_unlearning"), "summary.md"),
  "lm_feedback": Published(
    ("jaxsoftmax-run", "--config=lm_feedback"),
    "summary.md",
    image=("curves.png", "docs/images/lm_feedback_curves.png"),
  ),
  "lm_feedback_rounds": Published(
    ("jaxsoftmax-run", "--config=lm_feedback"), "summary.md", table=1, run="lm_feedback"
  ),
  "mnist1d_mlp": Published(
    ("jaxsoftmax-run", "--config=mnist1d_supervised:mlp"), "summary.md", ("MLP", "positive_only")
  ),
  "mnist1d_cnn": Published(
    ("jaxsoftmax-run", "--config=mnist1d_supervised:cnn"), "summary.md", ("CNN", "positive_only")
  ),
}
_MARK = re.compile(r"<!-- published: ([\w ]+?) -->")
_NUMBER = r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?"
_PAIR = re.compile(rf"({_NUMBER})(%?) ± ({_NUMBER})")


def published_tables(pages) -> dict[str, list[tuple[Path, list[str]]]]:
  """NAME -> the (page, table rows) marked with it."""
  out: dict[str, list] = {}
  for page in pages:
    lines = page.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
      mark = _MARK.fullmatch(line.strip())  # a line of its own, not one quoted in prose
      if mark:
        rows = []
        for row in lines[i + 1 :]:
          if not row.startswith("|"):
            if rows:
              break
            continue
          rows.append(row)
        for name in mark.group(1).split():
          out.setdefault(name, []).append((page, rows))
  return out


def _regime(row: str) -> str | None:
  """The regime a row is of: its first cell's first word in backticks, or the whole
  first cell when that is a name (as summary.md writes it); None for another row."""
  first = row.split("|")[1].strip()
  quoted = re.match(r"`([a-z][a-z0-9_]*)`", first)
  if quoted:
    return quoted.group(1)
  bare = re.match(r"([a-z][a-z0-9_]*)(?: \(.*\))?$", first)
  return bare.group(1) if bare else None


def _pairs(row: str) -> list[tuple[str, bool, str]]:
  return [(m, bool(pct), s) for m, pct, s in _PAIR.findall(row)]


def _half_unit(text: str) -> float:
  """Half a unit in the last place printed: 0.005 for '0.27', 5e15 for '7.7e17'."""
  mantissa, _, exponent = text.lower().partition("e")
  decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
  return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def _close(shown: str, got: str, scale: float) -> bool:
  """The published figure is the output's, each rounded where it was printed."""
  value, other = float(shown), float(got) * scale
  return abs(value - other) <= _half_unit(shown) + _half_unit(got) * scale


def _same(shown: tuple[str, bool, str], got: tuple[str, bool, str]) -> bool:
  scale = 100.0 if shown[1] and not got[1] else 1.0
  return _close(shown[0], got[0], scale) and _close(shown[2], got[2], scale)


def compare(rows: list[str], output_rows: list[str], only=None) -> list[str]:
  """The differences: one line per published figure that the output does not hold.
  ``only``: (the start of the published row's first cell, the output's regime)."""
  by_regime = {_regime(r): r for r in output_rows if r.startswith("|") and "---" not in r}
  problems = []
  for row in rows:
    regime = _regime(row)
    if only is not None:
      if not row.split("|")[1].strip().startswith(only[0]):
        continue
      regime = only[1]
    shown = _pairs(row)
    if not shown or regime is None:
      continue
    got = by_regime.get(regime)
    if got is None:  # a row the output gives in its text, e.g. the start of an unlearning run
      got = next((r for r in output_rows if re.search(rf"\b{regime}\b", r, re.I)), None)
    if got is None:
      problems.append(f"{regime}: no such row in the output")
      continue
    figures, at = _pairs(got), 0
    for pair in shown:
      while at < len(figures) and not _same(pair, figures[at]):
        at += 1
      if at == len(figures):
        problems.append(
          f"{regime}: published {pair[0]}{'%' if pair[1] else ''} ± {pair[2]}, output row: "
          f"{' | '.join(f'{m} ± {s}' for m, _, s in _pairs(got))}"
        )
        break
      at += 1
  return problems


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="+", choices=list(PUBLISHED), default=list(PUBLISHED))
  parser.add_argument("--workdir", default=str(ROOT / "runs" / "published"))
  args = parser.parse_args(argv)
  pages = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
  tables = published_tables(pages)
  failed = False
  for name in args.only:
    spec = PUBLISHED[name]
    workdir = Path(args.workdir) / (spec.run or name)
    if spec.prepare is not None:
      (ROOT / "runs").mkdir(exist_ok=True)
      subprocess.run([sys.executable, "-c", spec.prepare], cwd=ROOT, check=True)
    start = time.perf_counter()
    # The console script of this interpreter's environment, activated or not.
    script = Path(sys.executable).parent / spec.command[0]
    program = str(script) if script.exists() else spec.command[0]
    done = subprocess.run(
      # As the pages' commands: no compilation cache, so the times are a first run's.
      [
        program,
        *spec.command[1:],
        f"--workdir={workdir}",
        "--progress=false",
        "--compilation_cache=",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
      print(f"{name}: the command failed ({done.returncode}): {done.stderr[-500:]}")
      failed = True
      continue
    output = output_table(
      (workdir / spec.output).read_text(encoding="utf-8").splitlines(), spec.table
    )
    for page, rows in tables.get(name, []):
      problems = compare(rows, output, spec.row)
      where = page.relative_to(ROOT)
      status = "equal" if not problems else f"{len(problems)} rows differ"
      print(f"{name} ({where}, {len(rows) - 2} rows, {seconds:.0f} s): {status}")
      for problem in problems:
        print(f"  {problem}")
      failed |= bool(problems)
    if spec.image is not None:
      written, committed = workdir / spec.image[0], ROOT / spec.image[1]
      same = written.read_bytes() == committed.read_bytes()
      print(f"{name}: {spec.image[1]} {'equals' if same else 'differs from'} {spec.image[0]}")
      failed |= not same
    if name not in tables:
      print(f"{name}: no table in the pages is marked <!-- published: {name} -->")
      failed = True
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
