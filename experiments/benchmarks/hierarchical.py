"""Times a training step's loss through a hierarchical head against the flat softmax.

For K classes and features of size D, each function is ``jit(value_and_grad)`` of
the batch's mean loss with respect to the output layer's parameters and the
features:

- flat: logits ``h @ W + b`` (``W`` is ``[D, K]``), then ``nll``;
- hierarchical: a balanced tree (``ceil(sqrt K)`` clusters), the cluster logits and
  only the label's cluster row (:meth:`HierarchicalSoftmax.target_logits`), then
  ``hierarchical_nll`` or ``hierarchical_complement_nll``;
- tree: a balanced binary tree (``ceil(log2 K)`` levels), only the logits of the nodes
  on the label's path (:meth:`TreeSoftmax.path_logits`), then ``tree_nll`` or
  ``tree_complement_nll``.

They run interleaved in one process, the order rotating each round; the table reports the
median per example, the flat NLL's time divided by each (speed-up), and the compiled
program's temporary memory per example, measured as the growth of ``memory_analysis()``'s temp size
from batch B to 2B divided by B (parameter-sized buffers such as the gradient
cancel out). Run:

    python -m experiments.benchmarks.hierarchical [--rounds 10] [--dim 64] [--batch 256]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks import timer
from jaxsoftmax import losses
from jaxsoftmax.models import HierarchicalSoftmax, TreeSoftmax
from jaxsoftmax.tree import Tree, balanced_tree

CLASSES = (1024, 32768, 262144, 1048576)


def _flat(k, dim):
  head = nnx.Linear(dim, k, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(head)

  def loss(params, h, y):
    return jnp.mean(losses.nll(nnx.merge(graphdef, params)(h), y))

  return loss, params


def _hierarchical(k, dim, fn):
  head = HierarchicalSoftmax(dim, balanced_tree(k), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(head)

  def loss(params, h, y):
    head = nnx.merge(graphdef, params)
    return jnp.mean(fn(*head.target_logits(h, y), y, head.tree))

  return loss, params


def _tree(tree, dim, fn):
  head = TreeSoftmax(dim, tree, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(head)

  def loss(params, h, y):
    head = nnx.merge(graphdef, params)
    return jnp.mean(fn(head.path_logits(h, y), y, head.tree, layout="paths"))

  return loss, params


def functions(k: int, dim: int, tree: Tree | None = None):
  """name -> (loss(params, features, labels), params), the flat NLL first."""
  tree = tree or Tree.balanced(k, 2)
  return {
    "flat nll": _flat(k, dim),
    "hierarchical_nll": _hierarchical(k, dim, losses.hierarchical_nll),
    "hierarchical_complement_nll": _hierarchical(k, dim, losses.hierarchical_complement_nll),
    "tree_nll (binary)": _tree(tree, dim, losses.tree_nll),
    "tree_complement_nll (binary)": _tree(tree, dim, losses.tree_complement_nll),
  }


def _inputs(k, dim, batch, seed=0):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.normal(0, 1, (batch, dim)), jnp.float32),
    jnp.asarray(rng.integers(0, k, batch), jnp.int32),
  )


def _compile(loss, params, h, y):
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, h, y).compile()


def _temp_bytes(compiled) -> float:
  stats = compiled.memory_analysis()
  return float("nan") if stats is None else float(stats.temp_size_in_bytes)


def bench(k: int, dim: int, batch: int, rounds: int, tree: Tree | None = None):
  """Returns {name: (median seconds per example, temp bytes per example)} for one K."""
  h, y = _inputs(k, dim, batch)
  h2, y2 = _inputs(k, dim, 2 * batch)
  compiled, memory = {}, {}
  for name, (loss, params) in functions(k, dim, tree).items():
    compiled[name] = (_compile(loss, params, h, y), params)
    memory[name] = (
      _temp_bytes(_compile(loss, params, h2, y2)) - _temp_bytes(compiled[name][0])
    ) / batch
    jax.block_until_ready(compiled[name][0](params, h, y))  # warm up
  times = timer.interleaved(
    {name: functools.partial(c, params, h, y) for name, (c, params) in compiled.items()},
    rounds,
    warmup=0,
  )
  return {name: (float(np.median(t)) / batch, memory[name]) for name, t in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--dim", type=int, default=64, help="feature size D")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--classes", type=int, nargs="+", default=list(CLASSES))
  args = parser.parse_args(argv)
  print(
    f"{timer.machine()}; D = {args.dim}, batch {args.batch}, median of {args.rounds} "
    "interleaved rounds (call order rotated), float32"
  )
  print()
  print(
    "| K | function | tree | logits per example | us per example "
    "| speed-up over flat | temp KiB per example | parameters |"
  )
  print("|---:|---|---|---:|---:|---:|---:|---:|")
  for k in args.classes:
    two_level, binary = balanced_tree(k), Tree.balanced(k, 2)
    results = bench(k, args.dim, args.batch, args.rounds, binary)
    base = results["flat nll"][0]
    for name, (seconds, memory) in results.items():
      if name.startswith("flat"):
        shape, width, params = "", k, (args.dim + 1) * k
      elif name.startswith("hierarchical"):
        shape = f"{two_level.num_clusters} clusters x {two_level.max_size}"
        width = two_level.num_clusters + two_level.max_size
        params = (args.dim + 1) * two_level.num_clusters * (1 + two_level.max_size)
      else:
        shape, width = f"binary, {binary.max_depth} levels", 2 * binary.max_depth
        params = (args.dim + 1) * 2 * binary.num_nodes
      print(
        f"| {k} | {name} | {shape} | {width} | {seconds * 1e6:.2f} | {base / seconds:.1f} "
        f"| {memory / 2**10:.1f} | {params / 1e6:.2f} M |",
        flush=True,
      )


if __name__ == "__main__":
  main()
