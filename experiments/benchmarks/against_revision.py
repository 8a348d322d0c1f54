"""Times this checkout's losses against those of an earlier git revision, and optax.

The earlier ``jaxsoftmax`` package is taken from the repository with ``git archive``
into a temporary folder and imported under another name, so both kernels run in one
process, compiled once each and timed in the same rotated rounds
(:func:`experiments.benchmarks.timer.interleaved`). Float32; ``jit(value_and_grad)``
of the summed loss by default, or ``--call value``, the per-example loss alone; with
``--vmap N``, ``N`` instances of the shape under ``jax.vmap`` (as the experiments run
their seeds). The label losses are timed against optax's cross-entropy on integer
labels, ``soft_cross_entropy`` against its ``softmax_cross_entropy`` on the same target
distributions, and the set losses against its ``softmax_cross_entropy`` on the mask over
its size (5% of the classes, the first always in, as in the loss benchmark). Run from
the repository:

    python -m experiments.benchmarks.against_revision --rev d274042 [--rounds 30]
    python -m experiments.benchmarks.against_revision --rev 9331e52 --call value \
      --losses soft_cross_entropy --shapes 8192x1000 1024x32768
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

SHAPES = ("8192x16", "65536x1000", "1024x32768", "64x262144")
LABEL_LOSSES = ("nll", "complement_nll", "negated_nll")
SET_LOSSES = ("set_nll", "complement_set_nll", "multilabel_softmax_cross_entropy")
# kind -> (its losses, optax's peer on that kind's inputs)
KINDS = {
  "labels": (LABEL_LOSSES, optax.softmax_cross_entropy_with_integer_labels),
  "soft": (("soft_cross_entropy",), optax.softmax_cross_entropy),
  "sets": (SET_LOSSES, lambda z, m: optax.softmax_cross_entropy(z, m / m.sum(-1, keepdims=True))),
}


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


def _inputs(shape, kind, rng):
  """Logits, and labels, target distributions or masks as ``kind`` takes them."""
  z = jnp.asarray(rng.normal(0, 3, shape), jnp.float32)
  if kind == "soft":
    q = np.exp(rng.normal(0, 1, shape))
    return z, jnp.asarray(q / q.sum(-1, keepdims=True), jnp.float32)
  if kind == "sets":
    return z, jnp.asarray((rng.random(shape) < 0.05) | (np.arange(shape[-1]) == 0))
  return z, jnp.asarray(rng.integers(0, shape[-1], shape[:-1]), jnp.int32)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rev", required=True, help="the earlier git revision")
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--call", choices=("value_and_grad", "value"), default="value_and_grad")
  parser.add_argument(
    "--losses",
    nargs="+",
    choices=[name for names, _ in KINDS.values() for name in names],
    default=["nll", "complement_nll"],
    help="losses of one kind: label losses, soft_cross_entropy, or set losses",
  )
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="NxK shapes")
  parser.add_argument("--vmap", type=int, default=0, help="instances under jax.vmap")
  args = parser.parse_args(argv)
  kinds = {kind for kind, (names, _) in KINDS.items() if set(args.losses) & set(names)}
  if len(kinds) > 1:
    parser.error(
      f"the losses take different inputs ({', '.join(sorted(kinds))}): time each kind alone"
    )
  (kind,) = kinds
  with tempfile.TemporaryDirectory() as folder:
    old = import_revision(args.rev, Path(folder))
    fns = {"optax": KINDS[kind][1]}
    for name in args.losses:
      fns[f"{name}, this checkout"] = getattr(losses, name)
      fns[f"{name} at {args.rev}"] = getattr(old, name)
    call = "jit(value_and_grad)" if args.call == "value_and_grad" else "jit (value)"
    under = f", vmap over {args.vmap}" if args.vmap else ""
    print(f"{timer.machine()}; median of {args.rounds} rotated rounds; {call}, float32{under}")
    print()
    print("| shape | function | median ms | ratio to optax |")
    print("|---|---|---:|---:|")
    for text in args.shapes:
      shape = tuple(int(v) for v in text.split("x"))
      if args.vmap:
        shape = (args.vmap, *shape)
      z, y = _inputs(shape, kind, np.random.default_rng(0))
      calls = {}
      for name, f in fns.items():
        g = jax.vmap(f) if args.vmap else f
        if args.call == "value":
          step = jax.jit(g)
        else:
          step = jax.jit(jax.value_and_grad(lambda z, y, g=g: jnp.sum(g(z, y))))
        calls[name] = functools.partial(step.lower(z, y).compile(), z, y)
      medians = {k: float(np.median(v)) for k, v in timer.interleaved(calls, args.rounds).items()}
      for name, seconds in medians.items():
        print(
          f"| {text} | {name} | {seconds * 1e3:.2f} | {seconds / medians['optax']:.3f} |",
          flush=True,
        )


if __name__ == "__main__":
  main()
