"""The language model's training step with the fused head against the unfused one.

A :class:`jaxsoftmax.models.TransformerLM` at a large synthetic vocabulary (random token
ids; the step's cost does not depend on the text) takes one Adam step on ``--batch``
windows of ``--length`` tokens, with the MLE loss alone and with token unlikelihood
(``mle`` plus the complement-set loss on each position's previous tokens):

- ``unfused``: the model's logits ``[B, T, V]`` and :func:`jaxsoftmax.losses.nll` /
  :func:`jaxsoftmax.losses.complement_set_nll` (its candidates as a ``[B, T, V]`` mask);
- ``fused``: the last hidden states and the output layer through
  :func:`jaxsoftmax.losses.fused_nll` / :func:`jaxsoftmax.losses.fused_complement_set_nll`.

It prints XLA's compiled temporary memory of the step and its tokens per second (median
of ``--rounds`` interleaved calls), with ratios fused / unfused from the same run.

    python -m experiments.benchmarks.language [--vocab 32768] [--width 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.benchmarks import timer
from jaxsoftmax_experiments.kinds import lm as language


def _step(settings, regime, vocab):
  graphdef = nnx.graphdef(language.build(settings, vocab, 0))
  opt = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, windows):
    loss, grads = jax.value_and_grad(
      lambda p: language.objective(settings, regime, nnx.merge(graphdef, p), (windows,))
    )(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = nnx.state(language.build(settings, vocab, jax.random.key(0)), nnx.Param)
  return step, params, opt.init(params)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--chunk", type=int, default=2048)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  base = language.Settings(
    width=args.width,
    depth=args.depth,
    heads=4,
    length=args.length,
    batch_size=args.batch,
    vocab_chunk=args.chunk,
  )
  windows = jnp.asarray(
    np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.length + 1)), jnp.int32
  )
  tokens = args.batch * args.length
  print(
    f"{timer.machine()}; TransformerLM width {args.width}, depth {args.depth}, "
    f"V = {args.vocab}, {args.batch} x {args.length} = {tokens} tokens per step, Adam"
  )
  print()
  print(
    "| loss | head | temp MiB | tokens per second | fused / unfused memory | fused / unfused time |"
  )
  print("|---|---|---:|---:|---:|---:|")
  for regime, name in (("mle", "mle (nll)"), ("unlikelihood", "mle + unlikelihood")):
    calls, memory = {}, {}
    for head in ("unfused", "fused"):
      s = dataclasses.replace(base, head="fused" if head == "fused" else "softmax")
      step, params, opt_state = _step(s, regime, args.vocab)
      compiled = step.lower(params, opt_state, windows).compile()
      memory[head] = compiled.memory_analysis().temp_size_in_bytes
      calls[head] = functools.partial(compiled, params, opt_state, windows)
    times = {k: float(np.median(v)) for k, v in timer.interleaved(calls, args.rounds).items()}
    for head in ("unfused", "fused"):
      ratios = (
        f"{memory['fused'] / memory['unfused']:.3f} | {times['fused'] / times['unfused']:.2f}"
        if head == "fused"
        else "| "
      )
      print(
        f"| {name} | {head} | {memory[head] / 2**20:.0f} | {tokens / times[head]:.0f} | {ratios} |"
      )


if __name__ == "__main__":
  main()
