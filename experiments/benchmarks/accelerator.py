"""What a TPU's compiler makes of the losses and the experiments, on a machine without one.

libtpu compiles for a TPU topology on a CPU-only machine (``jax.experimental.topologies``);
that compiler's ``memory_analysis()`` and HLO are the accelerator's own account of what a
program materialises. For each program this prints, from the TPU compiler:

- temporary, argument and output bytes (``memory_analysis``);
- bytes accessed (``cost_analysis``) and its ratio to optax's peer in the same run; for a
  program with a loop (the fused losses, the training programs) XLA counts a loop body
  once, not once per trip, so those rows print ``-`` there;
- the collectives in the optimised HLO (all-reduce, all-gather, reduce-scatter,
  all-to-all, collective-permute);
- an **estimate** of its time on one chip: ``max(bytes / HBM bandwidth, flops / peak)``
  from the chip's published figures (:data:`CHIPS`), not a measurement.

Sections: ``losses`` (every label, set and soft loss beside optax's cross-entropy, under
``value_and_grad`` and forward only, float32 and bfloat16, at the loss benchmark's shapes);
``fused`` (the fused losses beside optax on ``h @ w``); ``mesh`` (the fused losses under
``shard_map`` on a (data, vocab) mesh of the topology's chips); ``programs`` (the jitted
training programs of the classifier's default config, its fused head and the language
model, on a mesh of the topology's chips). Needs the ``accelerator`` extra::

    pip install ".[accelerator]"
    JAX_PLATFORMS=cpu python -m experiments.benchmarks.accelerator --topology=v5e:2x2
        [--sections losses fused mesh programs] [--shapes 8192x32768 ...] [--sizes N,D,V ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsoftmax import losses

# Published per-chip peaks: HBM bandwidth (GB/s) and dense bf16 matmul (TFLOP/s).
# Google Cloud TPU documentation, "TPU versions" (v4, v5e, v5p, v6e/Trillium).
CHIPS = {
  "v4": (1228, 275),
  "v5e": (819, 197),
  "v5litepod": (819, 197),
  "v5p": (2765, 459),
  "v6e": (1640, 918),
}
# The loss benchmark's shapes (benchmarks/losses.py) and the accelerator shapes.
SHAPES = ((8192, 32768), (1024, 262144), (65536, 1000), (1024, 32768))
FUSED_SIZES = ((8192, 1024, 32768), (4096, 1024, 131072), (2048, 1024, 262144))
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# Compiling for a topology claims no chip, so the compile-only paths share libtpu with any
# other process that has it loaded (libtpu otherwise takes a machine-wide lock as it loads
# and a second process fails with "ABORTED: ... libtpu multi-process lockfile"). Set before
# libtpu loads; a value the user set is kept.
SHARED_LIBTPU = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def topology(name: str):
  """The topology description of ``name`` (e.g. ``v5e:2x2``), or a clear error."""
  for key, value in SHARED_LIBTPU.items():
    os.environ.setdefault(key, value)
  try:
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # noqa: BLE001 -- libtpu missing, locked, or an unknown topology
    raise SystemExit(
      f"cannot compile for the TPU topology {name!r}: {type(e).__name__}: {e}\n{_cause(e)}"
    ) from None


def _cause(error: Exception) -> str:
  """What to do about a failed topology compile, from its message."""
  text = str(error)
  if "lockfile" in text:
    return (
      "Another process on this machine has libtpu loaded and holds its lock, and "
      f"ALLOW_MULTIPLE_LIBTPU_LOAD={os.environ.get('ALLOW_MULTIPLE_LIBTPU_LOAD')!r} here: "
      "compiling for a topology needs no chip, so run with ALLOW_MULTIPLE_LIBTPU_LOAD=1 "
      "(the default of this module), or end the other process."
    )
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return 'Install the TPU compiler with pip install ".[accelerator]" (libtpu).'
  return "libtpu is installed; run with JAX_PLATFORMS=cpu, and check the topology's name."


def chip_of(name: str) -> tuple[str, float, float]:
  kind = name.split(":")[0].lower()
  bandwidth, peak = CHIPS.get(kind, CHIPS["v5e"])
  return kind, bandwidth * 1e9, peak * 1e12


@dataclasses.dataclass(frozen=True)
class Stats:
  temp: int
  argument: int
  output: int
  bytes_accessed: float | None
  flops: float | None
  collectives: dict[str, int]
  hlo: str

  def estimate_us(self, bandwidth: float, peak: float) -> float | None:
    if self.bytes_accessed is None:
      return None
    return 1e6 * max(self.bytes_accessed / bandwidth, (self.flops or 0.0) / peak)


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def collectives(hlo: str) -> dict[str, int]:
  """How many of each collective the optimised HLO holds (async pairs counted once)."""
  found = {}
  for op in COLLECTIVES:
    count = len(re.findall(rf"[ )\]]{op}(?:-start)?\(", hlo))
    if count:
      found[op] = count
  return found


def compile_stats(fn: Callable, *args, loops: bool = False) -> Stats:
  """The TPU compiler's account of ``jax.jit(fn)`` on abstract ``args``."""
  compiled = jax.jit(fn).lower(*args).compile()
  memory = compiled.memory_analysis()
  cost = _cost(compiled)
  hlo = compiled.as_text()
  return Stats(
    int(memory.temp_size_in_bytes),
    int(memory.argument_size_in_bytes),
    int(memory.output_size_in_bytes),
    None if loops else float(cost.get("bytes accessed", 0.0)),
    None if loops else float(cost.get("flops", 0.0)),
    collectives(hlo),
    hlo,
  )


def large_arrays(hlo: str, min_elements: int) -> dict[str, int]:
  """``{"dtype[shape] op": count}`` of the HLO's instructions (parameters and the
  loops' tuple plumbing left out) whose array has at least ``min_elements`` elements:
  what a temporary of that size is made of."""
  found: dict[str, int] = {}
  for m in re.finditer(r"= (\w+)\[([\d,]+)\]\{[^}]*\}\S* ([\w-]+)\(", hlo):
    dtype, dims, op = m.groups()
    if op in ("parameter", "get-tuple-element", "tuple", "bitcast"):
      continue
    if math.prod(int(d) for d in dims.split(",")) >= min_elements:
      key = f"{dtype}[{dims}] {op}"
      found[key] = found.get(key, 0) + 1
  return found


def _mib(n: float) -> str:
  return f"{n / 2**20:.1f}"


def _abstract(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


# --- the losses ------------------------------------------------------------------------


def _set_members(labels, num_classes):
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_) | (jnp.arange(num_classes) == 0)


def _one_hot(y, z):
  return jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)


# name -> loss(logits, labels); the optax entries are the peers (PEERS).
LOSSES: dict[str, Callable] = {
  "optax CE": optax.softmax_cross_entropy_with_integer_labels,
  "optax CE, dense targets": lambda z, y: optax.softmax_cross_entropy(z, _one_hot(y, z)),
  # The same logits as answers of 8 tokens ([N / 8, 8, K]: the TPU tiles the last two axes,
  # so a 3-D layout moves about 1.2x the bytes of the 2-D one, for optax too).
  "optax CE, 8-token answers": lambda z, y: optax.softmax_cross_entropy_with_integer_labels(
    z.reshape(-1, 8, z.shape[-1]), y.reshape(-1, 8)
  ),
  "nll": losses.nll,
  "complement_nll": losses.complement_nll,
  "negated_nll": losses.negated_nll,
  "set_nll": lambda z, y: losses.set_nll(z, _set_members(y, z.shape[-1])),
  "complement_set_nll": lambda z, y: losses.complement_set_nll(z, _set_members(y, z.shape[-1])),
  "soft_cross_entropy": lambda z, y: losses.soft_cross_entropy(z, _one_hot(y, z)),
  # The logits as answers of 8 tokens: -log(1 - P(answer)) per answer.
  "sequence_complement_nll": lambda z, y: losses.sequence_complement_nll(
    z.reshape(-1, 8, z.shape[-1]), y.reshape(-1, 8)
  ),
}
# Each loss's peer: optax on integer labels, or on a dense target array for the loss that
# takes one (it reads K targets per example, and optax's dense form does too).
PEERS = {
  "soft_cross_entropy": "optax CE, dense targets",
  "sequence_complement_nll": "optax CE, 8-token answers",
}
MODES = {
  "value_and_grad": lambda fn: jax.value_and_grad(
    lambda z, y: jnp.sum(fn(z, y).astype(jnp.float32))
  ),
  "forward": lambda fn: fn,
}


def loss_rows(shapes, dtypes, sharding, names=tuple(LOSSES)):
  """One row per (shape, mode, dtype, loss): its Stats and optax's, as dicts."""
  rows = []
  for n, k in shapes:
    for mode, wrap in MODES.items():
      for dtype in dtypes:
        z = _abstract((n, k), DTYPES[dtype], sharding)
        y = _abstract((n,), jnp.int32, sharding)
        wanted = set(names) | {PEERS.get(name, "optax CE") for name in names}
        done = {}
        for name, fn in LOSSES.items():
          if name not in wanted:
            continue
          stats = done[name] = compile_stats(wrap(fn), z, y)
          peer = done.get(PEERS.get(name, "optax CE"), stats)
          rows.append(
            dict(
              shape=f"{n}x{k}",
              mode=mode,
              dtype=dtype,
              name=name,
              stats=stats,
              peer=peer,
              logits_bytes=n * k * jnp.dtype(DTYPES[dtype]).itemsize,
            )
          )
  return rows


def print_loss_rows(rows, bandwidth, peak):
  print(
    "| shape | call | dtype | loss | temp MiB | temp / logits | bytes accessed MiB | "
    "bytes vs optax peer | estimate us (roofline) |"
  )
  print("|---|---|---|---|---:|---:|---:|---:|---:|")
  for r in rows:
    s, p = r["stats"], r["peer"]
    print(
      f"| {r['shape']} | {r['mode']} | {r['dtype']} | {r['name']} | {_mib(s.temp)} | "
      f"{s.temp / r['logits_bytes']:.3f} | {_mib(s.bytes_accessed)} | "
      f"{s.bytes_accessed / p.bytes_accessed:.2f} | {s.estimate_us(bandwidth, peak):.0f} |",
      flush=True,
    )


# --- the fused losses ------------------------------------------------------------------


def fused_rows(sizes, dtypes, sharding, chunk=None, names=None):
  rows = []
  for n, d, v in sizes:
    for dtype in dtypes:
      h = _abstract((n, d), DTYPES[dtype], sharding)
      w = _abstract((d, v), DTYPES[dtype], sharding)
      y = _abstract((n,), jnp.int32, sharding)
      negatives = _abstract((n, 4), jnp.int32, sharding)
      chunks = {} if chunk is None else dict(vocab_chunk=chunk)
      calls = {
        "optax on h @ w": (
          lambda h, w, y: optax.softmax_cross_entropy_with_integer_labels(h @ w, y),
          y,
        ),
        "fused_nll": (lambda h, w, y: losses.fused_nll(h, w, y, **chunks), y),
        "fused_complement_nll": (lambda h, w, y: losses.fused_complement_nll(h, w, y, **chunks), y),
        "fused_complement_set_nll": (
          lambda h, w, m: losses.fused_complement_set_nll(h, w, m, **chunks),
          negatives,
        ),
      }
      peer = None
      for name, (fn, target) in calls.items():
        if names is not None and name not in names and name != "optax on h @ w":
          continue
        step = jax.value_and_grad(
          lambda h, w, t, fn=fn: jnp.sum(fn(h, w, t).astype(jnp.float32)), argnums=(0, 1)
        )
        stats = compile_stats(step, h, w, target, loops=name != "optax on h @ w")
        peer = peer or stats
        rows.append(
          dict(size=f"{n}x{d}x{v}", dtype=dtype, name=name, stats=stats, peer=peer, weights=d * v)
        )
  return rows


def print_fused_rows(rows):
  print(
    "| N x D x V | dtype | value_and_grad of | temp MiB | temp vs optax | argument + output MiB "
    "| HLO arrays of w's size or more |"
  )
  print("|---|---|---|---:|---:|---:|---|")
  for r in rows:
    s, p = r["stats"], r["peer"]
    arrays = (
      ""
      if r["name"].startswith("optax")
      else ", ".join(
        f"{k} x{c}" if c > 1 else k for k, c in large_arrays(s.hlo, r["weights"]).items()
      )
    )
    print(
      f"| {r['size']} | {r['dtype']} | {r['name']} | {_mib(s.temp)} | "
      f"{s.temp / max(p.temp, 1):.3f} | {_mib(s.argument + s.output)} | {arrays} |",
      flush=True,
    )


# --- the fused losses on a (data, vocab) mesh ------------------------------------------


def mesh_layouts(count: int) -> list[tuple[dict[str, int], tuple[str, ...]]]:
  """The meshes of ``count`` chips to compile on, each with the axes that split the tokens:
  (data, vocab) with 2 vocabulary chips, on 16 or more chips with 4 as well, and on 8 or
  more chips (data, fsdp, vocab) with the tokens split on data and fsdp, as
  language-model trainers lay them out."""
  vocab = 2 if count % 2 == 0 and count > 1 else 1
  layouts = [({"data": count // vocab, "vocab": vocab}, ("data",))]
  if count >= 16 and count % 16 == 0:
    layouts.append(({"data": count // 4, "vocab": 4}, ("data",)))
  if count >= 8 and count % 8 == 0:
    vocab = 4 if count % 16 == 0 else 2
    layouts.append(({"data": count // (2 * vocab), "fsdp": 2, "vocab": vocab}, ("data", "fsdp")))
  return layouts


def mesh_rows(devices, sizes, dtypes):
  """``fused_nll`` under shard_map: tokens on the data axes, ``w`` on ``vocab``, on each
  of :func:`mesh_layouts`."""
  rows = []
  for shape, tokens in mesh_layouts(len(devices)):
    mesh = Mesh(np.array(devices).reshape(tuple(shape.values())), tuple(shape))
    for n, d, v in sizes:
      for dtype in dtypes:
        h = _abstract((n, d), DTYPES[dtype], NamedSharding(mesh, P(tokens, None)))
        w = _abstract((d, v), DTYPES[dtype], NamedSharding(mesh, P(None, "vocab")))
        y = _abstract((n,), jnp.int32, NamedSharding(mesh, P(tokens)))

        def total(h, w, y):
          per_token = losses.fused_nll(h, w, y, vocab_axis_name="vocab")
          return jax.lax.psum(jnp.sum(per_token.astype(jnp.float32)), tokens)

        sharded = jax.shard_map(
          total, mesh=mesh, in_specs=(P(tokens, None), P(None, "vocab"), P(tokens)), out_specs=P()
        )
        step = jax.value_and_grad(sharded, argnums=(0, 1))
        stats = compile_stats(step, h, w, y, loops=True)
        rows.append(dict(size=f"{n}x{d}x{v}", dtype=dtype, mesh=dict(mesh.shape), stats=stats))
  return rows


def print_mesh_rows(rows):
  print(
    "| N x D x V | dtype | mesh | temp MiB per chip | argument + output MiB per chip | "
    "collectives |"
  )
  print("|---|---|---|---:|---:|---|")
  for r in rows:
    s = r["stats"]
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    ops = ", ".join(f"{k} {v}" for k, v in s.collectives.items()) or "none"
    print(
      f"| {r['size']} | {r['dtype']} | {mesh} | {_mib(s.temp)} | "
      f"{_mib(s.argument + s.output)} | {ops} |",
      flush=True,
    )


# --- the experiments' training programs ------------------------------------------------


@contextlib.contextmanager
def _abstract_puts():
  """Inside, ``parallel.put`` returns abstract arrays: a plan over a topology's devices
  (which this process cannot address) then holds shapes and shardings only."""
  from jaxsoftmax_experiments import parallel

  original = parallel.put
  parallel.put = lambda tree, sharding: jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=sharding), tree
  )
  try:
    yield
  finally:
    parallel.put = original


def classifier_program(devices, **overrides) -> Stats:
  """The classifier's jitted chunk of training steps and evaluation (``loop._advance``)."""
  from jaxsoftmax_experiments import config as config_lib
  from jaxsoftmax_experiments import data, loop

  config = config_lib.defaults()
  for key, value in overrides.items():
    setattr(config, key, value)
  config_lib.validate(config)
  with _abstract_puts():
    plan = loop.make_plan(config, data.load(config.dataset), devices)
    state = loop.template(plan)
  return compile_stats(
    lambda s, d: loop._advance(plan, s, d, config.eval_every), state, plan.data, loops=True
  )


def lm_program(devices, **overrides) -> Stats:
  """The language model's jitted chunk of training steps (``kinds.lm._train``)."""
  from jaxsoftmax_experiments import config as config_lib
  from jaxsoftmax_experiments import kinds, parallel
  from jaxsoftmax_experiments.kinds import lm

  config = config_lib.defaults("lm")
  for key, value in overrides.items():
    setattr(config, key, value)
  kind = kinds.get("lm")
  loaded = kind.load(config)
  plan = kind.plan(config, loaded, devices)
  state = kind.template(plan)
  s = plan.settings
  arrays = [
    jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=parallel.replicated(plan.mesh))
    for x in lm.training_windows(plan)
  ]
  return compile_stats(
    lambda runs, reference, train, forget: lm._train(
      plan, s.regimes, runs, reference, s.eval_every, train, forget
    ),
    state.runs,
    state.extra,
    *arrays,
    loops=True,
  )


PROGRAMS = {
  "classifier, feedback_digits (softmax head)": lambda devices: classifier_program(devices),
  "classifier, feedback_digits:fused": lambda devices: classifier_program(devices, head="fused"),
  "language model, lm_unlearning (fused head)": lambda devices: lm_program(devices),
}


def print_program_rows(devices):
  print("| program | chips | temp MiB per chip | argument + output MiB per chip | collectives |")
  print("|---|---:|---:|---:|---|")
  rows = {}
  for name, build in PROGRAMS.items():
    stats = build(devices)
    rows[name] = stats
    ops = ", ".join(f"{k} {v}" for k, v in stats.collectives.items()) or "none"
    print(
      f"| {name} | {len(devices)} | {_mib(stats.temp)} | {_mib(stats.argument + stats.output)} "
      f"| {ops} |",
      flush=True,
    )
  return rows


def versions() -> str:
  import importlib.metadata as md

  try:
    libtpu = md.version("libtpu")
  except md.PackageNotFoundError:
    libtpu = "?"
  return f"jax {jax.__version__}, libtpu {libtpu}, optax {optax.__version__}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2", help="a TPU topology, e.g. v5e:2x2, v5e:4x4")
  parser.add_argument(
    "--sections",
    nargs="+",
    default=["losses", "fused", "mesh", "programs"],
    choices=["losses", "fused", "mesh", "programs"],
  )
  parser.add_argument(
    "--shapes",
    nargs="+",
    default=[f"{n}x{k}" for n, k in SHAPES],
    help="NxK logits of the losses section",
  )
  parser.add_argument(
    "--sizes",
    nargs="+",
    default=[",".join(map(str, s)) for s in FUSED_SIZES],
    help="N,D,V of the fused and mesh sections",
  )
  parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
  args = parser.parse_args(argv)
  if os.environ.get("JAX_PLATFORMS", "") != "cpu":
    print(
      "(set JAX_PLATFORMS=cpu: compiling for the topology needs no TPU, and JAX then does "
      "not try to start one)"
    )
  topo = topology(args.topology)
  devices = list(topo.devices)
  kind, bandwidth, peak = chip_of(args.topology)
  one = jax.sharding.SingleDeviceSharding(devices[0])
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
  sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
  print(
    f"TPU compiler for {args.topology} ({len(devices)} chips), {versions()}. Estimates: "
    f"max(bytes / {bandwidth / 1e9:.0f} GB/s, flops / {peak / 1e12:.0f} TFLOP/s), the "
    f"published {kind} peaks; an estimate, not a measurement."
  )
  if "losses" in args.sections:
    print("\n## Losses on one chip, beside optax's cross-entropy\n")
    print_loss_rows(loss_rows(shapes, args.dtypes, one), bandwidth, peak)
  if "fused" in args.sections:
    print("\n## Fused losses on one chip, beside optax on h @ w (value_and_grad in h and w)\n")
    print_fused_rows(fused_rows(sizes, args.dtypes, one))
  if "mesh" in args.sections:
    print("\n## fused_nll under shard_map: tokens on the data axes, w on vocab\n")
    print_mesh_rows(mesh_rows(devices, sizes, args.dtypes))
  if "programs" in args.sections:
    print("\n## The experiments' training programs on a mesh of the topology's chips\n")
    print_program_rows(devices)


if __name__ == "__main__":
  main()
