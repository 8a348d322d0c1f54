"""Times the losses against optax's cross-entropy, in training and in evaluation.

For each shape, every call below is compiled once and timed in the same interleaved
rounds (:func:`experiments.benchmarks.timer.interleaved`, order rotated each round),
and each row's ratio is to the optax call of its own group measured in those rounds:

- ``value_and_grad``: ``jit(value_and_grad)`` of the summed loss (training);
  ``value``: ``jit`` of the per-example loss alone (evaluation);
- float32 and bfloat16 logits;
- plain calls, a ``where`` mask over classes (optax's ``where``), and padding labels
  (``ignore_index=-100`` against ``jnp.where`` around optax on clipped labels);
- losses that read K numbers per example besides the logits, against optax's
  ``softmax_cross_entropy`` on the same dense input: ``soft_cross_entropy`` on a target
  distribution (group ``soft``), and the set losses on a boolean mask of 5% of the
  classes, optax reading the mask over its size (group ``set``, float32 only).

Memory is the compiled program's temp and output size (``memory_analysis()``). Run:

    python -m experiments.benchmarks.losses [--rounds 30] [--shapes 8192x16 1024x32768]

``--summarize FILE`` prints the speed guide's three summary tables (the ratios of the
label, soft and set losses, with their temporaries) from a saved output of that command.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmarks import timer
from jaxsoftmax import losses

SHAPES = ((8192, 16), (8192, 128), (8192, 1000), (65536, 1000), (1024, 32768), (64, 262144))
PAD = -100


def _optax_padded(z, y):
  keep = y != PAD
  return jnp.where(
    keep, optax.softmax_cross_entropy_with_integer_labels(z, jnp.where(keep, y, 0)), 0.0
  )


# (group, name) -> loss(logits, labels, where); the first name of a group is its peer.
FUNCTIONS = {
  ("plain", "optax CE"): lambda z, y, w: optax.softmax_cross_entropy_with_integer_labels(z, y),
  ("plain", "nll"): lambda z, y, w: losses.nll(z, y),
  ("plain", "complement_nll"): lambda z, y, w: losses.complement_nll(z, y),
  ("plain", "negated_nll"): lambda z, y, w: losses.negated_nll(z, y),
  ("where", "optax CE"): lambda z, y, w: optax.softmax_cross_entropy_with_integer_labels(
    z, y, where=w
  ),
  ("where", "nll"): lambda z, y, w: losses.nll(z, y, where=w),
  ("ignore_index", "optax CE"): lambda z, y, w: _optax_padded(z, y),
  ("ignore_index", "nll"): lambda z, y, w: losses.nll(z, y, ignore_index=PAD),
  ("soft", "optax CE"): lambda z, q, w: optax.softmax_cross_entropy(z, q),
  ("soft", "soft_cross_entropy"): lambda z, q, w: losses.soft_cross_entropy(z, q),
  ("set", "optax CE"): lambda z, m, w: optax.softmax_cross_entropy(
    z, m / jnp.sum(m, axis=-1, keepdims=True)
  ),
  ("set", "set_nll"): lambda z, m, w: losses.set_nll(z, m),
  ("set", "complement_set_nll"): lambda z, m, w: losses.complement_set_nll(z, m),
  ("set", "multilabel_softmax_cross_entropy"): lambda z, m, w: (
    losses.multilabel_softmax_cross_entropy(z, m)
  ),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODES = ("value_and_grad", "value")


def _program(fn, mode):
  if mode == "value":
    return jax.jit(fn)
  return jax.jit(jax.value_and_grad(lambda z, y, w: jnp.sum(fn(z, y, w))))


def _memory(compiled) -> str:
  stats = compiled.memory_analysis()
  if stats is None:
    return "n/a"
  return f"{stats.temp_size_in_bytes / 2**20:.1f} + {stats.output_size_in_bytes / 2**20:.1f}"


def _inputs(shape, dtype, group, seed=0):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(0, 3, shape), dtype)
  labels = rng.integers(0, shape[1] - 1, shape[0])
  if group == "soft":  # a target distribution per example
    targets = np.exp(rng.normal(0, 1, shape))
    labels = jnp.asarray(targets / targets.sum(-1, keepdims=True), jnp.float32)
    return logits, labels, None
  if group == "set":  # 5% of the classes, the first always in
    return logits, jnp.asarray((rng.random(shape) < 0.05) | (np.arange(shape[1]) == 0)), None
  if group == "ignore_index":
    labels[rng.random(shape[0]) < 0.1] = PAD  # 10% padding
  where = (jnp.arange(shape[1]) < shape[1] - 1)[None]  # the last class excluded
  return logits, jnp.asarray(labels, jnp.int32), where


def cases(dtypes=tuple(DTYPES)):
  """(mode, dtype, group, name) of every timed call, in table order."""
  out = []
  for mode in MODES:
    for dtype in dtypes:
      for group, name in FUNCTIONS:
        if dtype == "bfloat16" and group not in ("plain", "soft"):
          continue
        out.append((mode, dtype, group, name))
  return out


def bench(shape, rounds: int, dtypes=tuple(DTYPES)):
  """{(mode, dtype, group, name): (median seconds, ratio to the group's optax, memory)}."""
  calls, memory = {}, {}
  for case in cases(dtypes):
    mode, dtype, group, name = case
    args = _inputs(shape, DTYPES[dtype], group)
    compiled = _program(FUNCTIONS[group, name], mode).lower(*args).compile()
    calls[case] = functools.partial(compiled, *args)
    memory[case] = _memory(compiled)
  times = timer.interleaved(calls, rounds)
  medians = {case: float(np.median(t)) for case, t in times.items()}
  return {
    (mode, dtype, group, name): (
      seconds,
      seconds / medians[mode, dtype, group, "optax CE"],
      memory[mode, dtype, group, name],
    )
    for (mode, dtype, group, name), seconds in medians.items()
  }


def _rows(lines):
  """``{(shape, call, dtype, variant, function): (ratio, temp MiB)}`` of an output."""
  rows = {}
  for line in lines:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 8 and "x" in cells[0] and cells[0].replace("x", "").isdigit():
      rows[tuple(cells[:5])] = (cells[6], cells[7].split(" + ")[0])
  return rows


def _table(keys, columns, rows) -> str:
  """A markdown table: the key columns left-aligned, the figures right-aligned."""
  lines = ["| " + " | ".join((*keys, *columns)) + " |"]
  lines.append("|" + "---|" * len(keys) + "---:|" * len(columns))
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def summary(lines) -> str:
  """The speed guide's summary tables from the lines of this benchmark's output."""
  rows = _rows(lines)
  shapes = list(dict.fromkeys(key[0] for key in rows))
  dtypes = list(dict.fromkeys(key[2] for key in rows))
  ratio = lambda s, call, d, group, name: rows[(s, call, d, group, name)][0]
  temp = lambda s, call, d, group, name: rows[(s, call, d, group, name)][1]
  # A loss's temporary and, in parentheses, its group's optax call's.
  temps = lambda s, call, d, group, name: (
    f"{temp(s, call, d, group, name)} ({temp(s, call, d, group, 'optax CE')})"
  )
  calls = ("value_and_grad", "value")
  labels = ("nll", "complement_nll", "negated_nll")
  plain = _table(
    ("shape", "dtype"),
    ("training: nll", "complement_nll", "negated_nll", "evaluation: nll", "complement_nll")
    + ("negated_nll", "evaluation temp MiB (optax)"),
    (
      (s, d, *(ratio(s, c, d, "plain", n) for c in calls for n in labels))
      + (temps(s, "value", d, "plain", "nll"),)
      for s in shapes
      for d in dtypes
    ),
  )
  soft = _table(
    ("shape", "dtype"),
    ("training", "evaluation", "training temp MiB (optax)", "evaluation temp MiB (optax)"),
    (
      (s, d, *(ratio(s, c, d, "soft", "soft_cross_entropy") for c in calls))
      + tuple(temps(s, c, d, "soft", "soft_cross_entropy") for c in calls)
      for s in shapes
      for d in dtypes
    ),
  )
  sets = ("set_nll", "complement_set_nll", "multilabel_softmax_cross_entropy")
  set_table = _table(
    ("shape",),
    ("training: set_nll", "complement_set_nll", "multilabel", "evaluation: set_nll")
    + ("complement_set_nll", "multilabel", "evaluation temp MiB (optax)"),
    (
      (s, *(ratio(s, c, "float32", "set", n) for c in calls for n in sets))
      + (temps(s, "value", "float32", "set", "set_nll"),)
      for s in shapes
    ),
  )
  return "\n\n".join((plain, soft, set_table))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--summarize", metavar="FILE", help="a saved output to summarise")
  parser.add_argument(
    "--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES], help="NxK shapes of the logits"
  )
  parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
  args = parser.parse_args(argv)
  if args.summarize:
    with open(args.summarize) as f:
      print(summary(f))
    return
  print(
    f"{timer.machine()}; optax {optax.__version__}; median of {args.rounds} interleaved "
    "rounds, call order rotated each round"
  )
  print()
  print(
    "| shape | call | dtype | variant | function | median ms | ratio to optax | temp + output MiB |"
  )
  print("|---|---|---|---|---|---:|---:|---:|")
  for text in args.shapes:
    shape = tuple(int(v) for v in text.split("x"))
    for (mode, dtype, group, name), (seconds, ratio, memory) in bench(
      shape, args.rounds, tuple(args.dtypes)
    ).items():
      print(
        f"| {text} | {mode} | {dtype} | {group} | {name} | {seconds * 1e3:.2f} | {ratio:.2f} "
        f"| {memory} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
