"""Times this checkout's label losses against those of an earlier git revision, and optax.

The earlier ``jaxsoftmax`` package is taken from the repository with ``git archive``
into a temporary folder and imported under another name, so both kernels run in one
process, compiled once each and timed in the same rotated rounds
(:func:`experiments.benchmarks.timer.interleaved`). ``jit(value_and_grad)``
of the summed loss, float32. Run from the repository:

    python -m experiments.benchmarks.against_revision --rev d274042 [--rounds 30]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmarks import timer
from jaxsoftmax import losses

SHAPES = ((8192, 16), (65536, 1000), (1024, 32768), (64, 262144))


def import_revision(rev: str, folder: Path):
  """``jaxsoftmax.losses`` as it was at ``rev``, imported as ``jaxsoftmax_at_rev.losses``."""
  archive = subprocess.run(
    ["git", "archive", rev, "jaxsoftmax"],
    check=True,
    capture_output=True,
    cwd=Path(__file__).resolve().parents[2],
  ).stdout
  with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
    tar.extractall(folder, filter="data")
  package = folder / "jaxsoftmax_at_rev"
  (folder / "jaxsoftmax").rename(package)
  for path in package.rglob("*.py"):
    path.write_text(re.sub(r"\bjaxsoftmax\b", "jaxsoftmax_at_rev", path.read_text()))
  sys.path.insert(0, str(folder))
  return importlib.import_module("jaxsoftmax_at_rev.losses")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rev", required=True, help="the earlier git revision")
  parser.add_argument("--rounds", type=int, default=30)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as folder:
    old = import_revision(args.rev, Path(folder))
    fns = {
      "optax": optax.softmax_cross_entropy_with_integer_labels,
      "nll, this checkout": losses.nll,
      f"nll at {args.rev}": old.nll,
      "complement_nll, this checkout": losses.complement_nll,
      f"complement_nll at {args.rev}": old.complement_nll,
    }
    print(
      f"{timer.machine()}; median of {args.rounds} rotated rounds; jit(value_and_grad), float32"
    )
    print()
    print("| shape | function | median ms | ratio to optax |")
    print("|---|---|---:|---:|")
    for shape in SHAPES:
      rng = np.random.default_rng(0)
      z = jnp.asarray(rng.normal(0, 3, shape), jnp.float32)
      y = jnp.asarray(rng.integers(0, shape[1], shape[0]), jnp.int32)
      calls = {}
      for name, f in fns.items():
        step = jax.jit(jax.value_and_grad(lambda z, y, f=f: jnp.sum(f(z, y))))
        calls[name] = functools.partial(step.lower(z, y).compile(), z, y)
      medians = {k: float(np.median(v)) for k, v in timer.interleaved(calls, args.rounds).items()}
      for name, seconds in medians.items():
        print(
          f"| {shape[0]}x{shape[1]} | {name} | {seconds * 1e3:.2f} | "
          f"{seconds / medians['optax']:.3f} |",
          flush=True,
        )


if __name__ == "__main__":
  main()
