"""Negative feedback for a language model: token unlikelihood against repetition, and
unlearning by gradient ascent, the complement likelihood or NPO, on real text.

    jaxsoftmax-lm --experiment=repetition --workdir=runs/lm_repetition
    jaxsoftmax-lm --experiment=unlearning --workdir=runs/lm_unlearning

The text is CPython's help topics (:mod:`jaxsoftmax_experiments.text`), the model a
small decoder-only transformer (:class:`jaxsoftmax.models.TransformerLM`) whose output
layer goes through the fused losses (``--fused=false``: the unfused losses on the
logits). Every regime x seed trains at once: one compiled program, the runs grouped by
regime and ``jax.vmap``-ed over seeds, Adam, windows of ``--length`` tokens drawn with
replacement.

``repetition`` (Welleck et al. 2019), from a random start:

- ``mle``: the NLL of each next token.
- ``unlikelihood``: ``mle`` plus ``alpha * -log(1 - P(C_t))``, with C_t the window's
  tokens before position t other than its target (``fused_complement_set_nll``).
- ``negated``: ``mle`` plus ``alpha * log P(C_t)`` on the same negatives, the naive
  negated gradient (``-fused_set_nll``).

Metrics at each evaluation: validation perplexity and next-token accuracy; and on greedy
continuations (``--generate`` tokens) of validation prompts (their first ``--prompt``
tokens): seq-rep-4 (the share of repeated 4-grams in a continuation), the repetition rate
(the share of continuation tokens found in the 16 before them) and the number of unique
tokens over all continuations; and whether the validation perplexity is above the
vocabulary size (worse than a uniform guess), the first evaluation at which it is.

``unlearning`` (Zhang et al. 2024): a model trained with ``mle`` on every training topic
for ``--initial_steps`` is the start and the frozen reference. ``--forget`` topics are to be
forgotten, the other training topics retained. Each regime adds the retain NLL to:

- ``gradient_ascent``: minus the forget NLL;
- ``complement``: ``-log(1 - p_t)`` of each forget token (``fused_complement_nll``);
- ``npo``: ``(2/beta) log(1 + (pi(x) / pi_ref(x))^beta)`` per forget window, with
  ``pi(x)`` the window's likelihood.

Metrics: forget NLL, the forget log-likelihood ratio to the reference (per token), retain
and test perplexity, and collapse: retain perplexity above ``--collapse`` times the
start's. Unless given, unlearning runs ``--steps=200`` and evaluates every 50.

A run diverges at the first step whose loss or gradient is not finite or whose loss
falls below ``-logit_bound``; it is then frozen and recorded. The workdir gets
``config.json``, ``metrics.jsonl``, ``results.json``, ``summary.md``, ``curves.png`` and
``checkpoints/`` (one per evaluation); rerunning the same command resumes from the last
checkpoint and ends with the same files, byte for byte, as a run never stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsoftmax import losses
from jaxsoftmax.models import TransformerLM
from jaxsoftmax_experiments import text
from jaxsoftmax_experiments.report import mean_std

UNLEARNING_DEFAULTS = {"steps": 200, "eval_every": 50}  # the unlearning phase's, when not given
EXPERIMENTS = {"repetition": ("mle", "unlikelihood", "negated"),
               "unlearning": ("gradient_ascent", "complement", "npo")}


class LMError(ValueError):
  """A bad flag value; the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
  experiment: str = "repetition"
  seeds: int = 3
  steps: int = 800
  eval_every: int = 200
  batch_size: int = 16
  length: int = 32
  width: int = 64
  depth: int = 2
  heads: int = 4
  learning_rate: float = 1e-3
  alpha: float = 1.0
  fused: bool = True
  vocab_chunk: int = 512
  prompt: int = 16
  generate: int = 32
  num_prompts: int = 40
  initial_steps: int = 800
  forget: int = 4
  npo_beta: float = 0.1
  collapse: float = 3.0
  logit_bound: float = 1e3
  seed: int = 0

  def check(self) -> None:
    if self.experiment not in EXPERIMENTS:
      raise LMError(f"--experiment: one of {', '.join(EXPERIMENTS)}, got {self.experiment!r}.")
    for key in ("seeds", "steps", "eval_every", "batch_size", "length", "width", "depth",
                "heads", "vocab_chunk", "prompt", "generate", "num_prompts", "initial_steps",
                "forget"):
      if getattr(self, key) < 1:
        raise LMError(f"--{key}: must be >= 1, got {getattr(self, key)}.")
    for key in ("learning_rate", "npo_beta", "collapse", "logit_bound"):
      v = getattr(self, key)
      if not (math.isfinite(v) and v > 0):
        raise LMError(f"--{key}: must be a finite number > 0, got {v}.")
    if not (math.isfinite(self.alpha) and self.alpha >= 0):
      raise LMError(f"--alpha: must be a finite number >= 0, got {self.alpha}.")
    if self.width % self.heads:
      raise LMError(f"--width: must be a multiple of --heads ({self.heads}), got {self.width}.")
    if self.prompt >= self.length:
      raise LMError(f"--prompt: must be shorter than --length ({self.length}), got {self.prompt}.")

  @property
  def regimes(self) -> tuple[str, ...]:
    return EXPERIMENTS[self.experiment]


# --- data ----------------------------------------------------------------------------


class Data(NamedTuple):
  train: np.ndarray       # [n, length + 1] windows (retain windows when unlearning)
  validation: np.ndarray
  test: np.ndarray
  forget: np.ndarray      # [m, length + 1]; empty for repetition
  vocab_size: int


def make_data(s: Settings, corpus: text.Corpus | None = None) -> tuple[Data, dict]:
  corpus = corpus or text.corpus()
  train_names = sorted(corpus.tokens["train"])
  # The forget topics: evenly spaced among the training topics, by name.
  step = max(1, len(train_names) // s.forget)
  forget_names = train_names[step // 2::step][:s.forget] if s.experiment == "unlearning" else []
  retain_names = [n for n in train_names if n not in forget_names]
  w = lambda stream: text.windows(stream, s.length)
  data = Data(w(corpus.stream("train", retain_names)), w(corpus.stream("validation")),
              w(corpus.stream("test")),
              w(corpus.stream("train", forget_names)) if forget_names
              else np.zeros((0, s.length + 1), np.int32),
              len(corpus.vocabulary))
  info = {"vocab_size": len(corpus.vocabulary), "forget_topics": forget_names,
          "train_windows": len(data.train), "validation_windows": len(data.validation),
          "test_windows": len(data.test), "forget_windows": len(data.forget)}
  return data, info


# --- model and losses ----------------------------------------------------------------


def build(s: Settings, vocab_size: int, key) -> TransformerLM:
  return TransformerLM(vocab_size, s.length, width=s.width, depth=s.depth, heads=s.heads,
                       rngs=nnx.Rngs(key))


def id_mask(ids, vocab: int):
  """The ``[..., V]`` boolean mask of padded id lists ``[..., M]`` (-1 unused), written by
  one scatter (no ``[..., M, V]`` comparison)."""
  flat = ids.reshape(-1, ids.shape[-1])
  rows = jnp.arange(flat.shape[0])[:, None]
  mask = jnp.zeros((flat.shape[0], vocab), bool).at[rows, jnp.where(flat < 0, vocab, flat)].set(
      True, mode="drop")
  return mask.reshape(*ids.shape[:-1], vocab)


def token_losses(s: Settings, model, windows, kind: str, negatives=None):
  """Per-token losses ``[B, T]`` of ``kind`` on windows ``[B, T + 1]``: ``nll``,
  ``complement`` (of the target), ``complement_set`` / ``set`` (of ``negatives``)."""
  inputs, targets = windows[:, :-1], windows[:, 1:]
  if not s.fused:
    z = model(inputs)
    if kind == "nll":
      return losses.nll(z, targets)
    if kind == "complement":
      return losses.complement_nll(z, targets)
    mask = id_mask(negatives, z.shape[-1])
    if kind == "complement_set":
      return losses.complement_set_nll(z, mask)
    # An empty set has set_nll +inf with a zero gradient: the select makes its loss 0.
    return jnp.where(mask.any(-1), losses.set_nll(z, mask), 0.0)
  h = model.features(inputs)
  w, b = model.output_layer()
  kw = dict(bias=b, vocab_chunk=s.vocab_chunk)
  if kind == "nll":
    return losses.fused_nll(h, w, targets, **kw)
  if kind == "complement":
    return losses.fused_complement_nll(h, w, targets, **kw)
  if kind == "complement_set":
    return losses.fused_complement_set_nll(h, w, negatives, **kw)
  return losses.fused_set_nll(h, w, negatives, where=jnp.any(negatives >= 0, -1), **kw)


def candidates(windows):
  """Welleck et al.'s candidates C_t: the tokens before target t in its window (the
  inputs up to t) other than the target, ``[B, T, T]``, -1 where unused."""
  return text.previous_tokens(windows[:, :-1], windows[:, 1:])


def objective(s: Settings, regime: str, model, batch, reference=None):
  """The regime's loss on a batch: ``batch`` is ``(windows,)`` or, when unlearning,
  ``(retain windows, forget windows, forget indices)``."""
  if s.experiment == "repetition":
    (windows,) = batch
    nll = jnp.mean(token_losses(s, model, windows, "nll"))
    if regime == "mle":
      return nll
    negs = candidates(windows)
    if regime == "unlikelihood":
      return nll + s.alpha * jnp.mean(token_losses(s, model, windows, "complement_set", negs))
    has = jnp.any(negs >= 0, -1)
    set_nll = token_losses(s, model, windows, "set", negs)
    return nll - s.alpha * jnp.sum(jnp.where(has, set_nll, 0.0)) / jnp.maximum(jnp.sum(has), 1)
  retain, forget, index = batch
  retain_nll = jnp.mean(token_losses(s, model, retain, "nll"))
  if regime == "gradient_ascent":
    return retain_nll - jnp.mean(token_losses(s, model, forget, "nll"))
  if regime == "complement":
    return retain_nll + jnp.mean(token_losses(s, model, forget, "complement"))
  log_pi = -jnp.sum(token_losses(s, model, forget, "nll"), axis=-1)     # [B]
  ratio = log_pi - reference[index]
  return retain_nll + jnp.mean((2.0 / s.npo_beta) * jax.nn.softplus(s.npo_beta * ratio))


# --- state, training, evaluation ------------------------------------------------------


class Run(NamedTuple):
  params: Any
  opt_state: Any
  key: jax.Array
  alive: jax.Array
  diverged_at: jax.Array


class State(NamedTuple):
  runs: tuple            # one Run per regime, stacked over seeds
  step: jax.Array
  reference: jax.Array   # [seeds, forget windows] log pi_ref per window (unlearning), else [seeds, 1]


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  settings: Settings
  data: Data
  graphdef: Any

  @property
  def optimizer(self):
    return optax.adam(self.settings.learning_rate)


@functools.lru_cache(maxsize=4)
def plan_of(s: Settings) -> tuple[Plan, dict]:
  """The plan of a settings and its data's description, built once per settings: the
  compiled programs (keyed by the plan) are then reused by a rerun in the same process."""
  data, info = make_data(s)
  return make_plan(s, data), info


def make_plan(s: Settings, data: Data) -> Plan:
  return Plan(s, data, nnx.graphdef(build(s, data.vocab_size, 0)))


def _step(plan: Plan, regime: str, run: Run, reference, train, forget) -> tuple[Run, jax.Array]:
  s = plan.settings
  key, k1, k2 = jax.random.split(run.key, 3)
  rows = jax.random.randint(k1, (s.batch_size,), 0, train.shape[0])
  if s.experiment == "repetition" or regime == "mle":
    batch = (train[rows],)
  else:
    index = jax.random.randint(k2, (s.batch_size,), 0, forget.shape[0])
    batch = (train[rows], forget[index], index)

  def loss_fn(params):
    return objective(s, regime, nnx.merge(plan.graphdef, params), batch, reference)

  loss, grads = jax.value_and_grad(loss_fn)(run.params)
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g))
                                                   for g in jax.tree.leaves(grads)]))
  ok = finite & (loss >= -s.logit_bound)
  keep = run.alive & ok
  updates, opt_state = plan.optimizer.update(grads, run.opt_state, run.params)
  params = jax.tree.map(lambda p, u: p + jnp.where(keep, u, 0).astype(p.dtype), run.params, updates)
  return Run(params, opt_state, key, keep,
             jnp.where(run.alive & ~ok, -1, run.diverged_at)), loss


def _init(plan: Plan, key) -> Run:
  k_init, k_batch = jax.random.split(key)
  params = nnx.state(build(plan.settings, plan.data.vocab_size, k_init), nnx.Param)
  return Run(params, plan.optimizer.init(params), k_batch, jnp.bool_(True), jnp.int32(-2))


@functools.partial(jax.jit, static_argnames=("plan", "regimes", "length"))
def _train(plan: Plan, regimes: tuple[str, ...], runs: tuple, reference, step, length: int,
           train, forget):
  def body(carry, _):
    runs, step = carry
    out = []
    for regime, run in zip(regimes, runs):
      new, _ = jax.vmap(functools.partial(_step, plan, regime), (0, 0, None, None))(
          run, reference, train, forget)
      # The step a run diverged at: _step marks it -1, here it gets the step number.
      new = new._replace(diverged_at=jnp.where(new.diverged_at == -1, step + 1, new.diverged_at))
      out.append(new)
    return (tuple(out), step + 1), None
  (runs, step), _ = jax.lax.scan(body, (runs, step), None, length=length)
  return runs, step


@functools.partial(jax.jit, static_argnames=("plan",))
def _window_losses(plan: Plan, params, windows):
  """Per-window token NLLs ``[seeds, n, T]`` and next-token hits, unfused (eval only)."""
  def one(p):
    model = nnx.merge(plan.graphdef, p)
    z = model(windows[:, :-1])
    return losses.nll(z, windows[:, 1:]), jnp.argmax(z, -1) == windows[:, 1:]
  return jax.vmap(one)(params)


@functools.partial(jax.jit, static_argnames=("plan",))
def _continue(plan: Plan, params, prompts):
  """Greedy continuations ``[seeds, n, generate]`` of ``prompts`` ``[n, prompt]``, each step
  reading the last ``length`` tokens."""
  s = plan.settings
  total = s.prompt + s.generate
  def one(p):
    model = nnx.merge(plan.graphdef, p)
    seq = jnp.zeros((prompts.shape[0], total), jnp.int32).at[:, :s.prompt].set(prompts)
    def body(seq, t):
      start = jnp.maximum(t - s.length, 0)
      window = jax.lax.dynamic_slice_in_dim(seq, start, s.length, axis=1)
      z = model(window)
      last = jnp.minimum(t, s.length) - 1
      nxt = jnp.argmax(z[:, last], -1).astype(jnp.int32)
      return seq.at[:, t].set(nxt), None
    seq, _ = jax.lax.scan(body, seq, jnp.arange(s.prompt, total))
    return seq
  return jax.vmap(one)(params)


def seq_rep(continuation: np.ndarray, n: int = 4) -> float:
  """1 - unique n-grams / n-grams of one continuation (Welleck et al.'s seq-rep-n)."""
  grams = [tuple(continuation[i:i + n]) for i in range(len(continuation) - n + 1)]
  return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequence: np.ndarray, start: int, window: int = 16) -> float:
  """The share of tokens from ``start`` on found among the ``window`` tokens before them."""
  hits = [sequence[t] in sequence[max(0, t - window):t] for t in range(start, len(sequence))]
  return float(np.mean(hits))


def evaluate(plan: Plan, state: State, start_retain_ppl=None) -> list[dict]:
  """One record per (regime, seed) at the state's step."""
  s, d = plan.settings, plan.data
  out = []
  for regime, run in zip(s.regimes, state.runs):
    rec = {}
    if s.experiment == "repetition":
      nll, hit = (np.asarray(a, np.float64) for a in _window_losses(plan, run.params, d.validation))
      rec["validation_perplexity"] = np.exp(nll.mean((1, 2)))
      rec["next_token_accuracy"] = hit.mean((1, 2))
      prompts = d.validation[:s.num_prompts, :s.prompt]
      seqs = np.asarray(_continue(plan, run.params, prompts))
      cont = seqs[:, :, s.prompt:]
      rec["seq_rep_4"] = np.array([np.mean([seq_rep(c) for c in seed]) for seed in cont])
      rec["repetition_rate"] = np.array([np.mean([repetition_rate(q, s.prompt) for q in seed])
                                         for seed in seqs])
      rec["unique_tokens"] = np.array([len(np.unique(seed)) for seed in cont], float)
      rec["worse_than_uniform"] = rec["validation_perplexity"] > d.vocab_size
    else:
      forget = np.asarray(_window_losses(plan, run.params, d.forget)[0], np.float64)
      rec["forget_nll"] = forget.mean((1, 2))
      log_pi = -forget.sum(-1)
      rec["forget_log_ratio"] = (log_pi - np.asarray(state.reference, np.float64)).mean(1) / s.length
      retain = np.asarray(_window_losses(plan, run.params, d.train[:len(d.test)])[0], np.float64)
      rec["retain_perplexity"] = np.exp(retain.mean((1, 2)))
      test = np.asarray(_window_losses(plan, run.params, d.test)[0], np.float64)
      rec["test_perplexity"] = np.exp(test.mean((1, 2)))
      # At step 0 every regime is the start: its own retain perplexity is the baseline.
      start = rec["retain_perplexity"] if start_retain_ppl is None else start_retain_ppl
      rec["collapsed"] = rec["retain_perplexity"] > s.collapse * start
    alive = np.asarray(run.alive)
    at = np.asarray(run.diverged_at)
    for seed in range(s.seeds):
      r = {"step": int(state.step), "regime": regime, "seed": seed}
      for k, v in rec.items():
        v = v[seed]
        r[k] = bool(v) if isinstance(v, np.bool_) else (float(v) if math.isfinite(v) else None)
      r["diverged"] = not bool(alive[seed])
      r["diverged_at_step"] = None if alive[seed] else int(at[seed])
      out.append(r)
  return out


@functools.partial(jax.jit, static_argnames=("plan",))
def _start(plan: Plan, key) -> State:
  s = plan.settings
  seeds = jax.random.split(key, s.seeds)
  if s.experiment == "repetition":
    runs = tuple(jax.vmap(functools.partial(_init, plan))(seeds) for _ in s.regimes)
    return State(runs, jnp.int32(0), jnp.zeros((s.seeds, 1), jnp.float32))  # unused; orbax saves no empty array
  # Unlearning: train the start with mle on every training window (retain and forget).
  everything = jnp.concatenate([plan.data.train, plan.data.forget])
  start = jax.vmap(functools.partial(_init, plan))(seeds)
  pre = Plan(dataclasses.replace(s, experiment="repetition"), plan.data, plan.graphdef)
  (start,), _ = _train(pre, ("mle",), (start,), None, jnp.int32(0), s.initial_steps,
                       everything, everything)
  nll = _window_losses(plan, start.params, plan.data.forget)[0]
  reference = -jnp.sum(nll, -1)                                     # [seeds, forget windows]
  fresh = lambda: jax.vmap(lambda k: jax.random.fold_in(k, 1))(start.key)
  runs = tuple(Run(start.params, jax.vmap(plan.optimizer.init)(start.params), fresh(),
                   jnp.ones(s.seeds, bool), jnp.full(s.seeds, -2, jnp.int32)) for _ in s.regimes)
  return State(runs, jnp.int32(0), reference)


def run(plan: Plan, state: State | None = None) -> Iterator[State]:
  """Yields the state after every evaluation, the first at step 0."""
  s = plan.settings
  if state is None:
    state = _start(plan, jax.random.key(s.seed))
  yield state
  train, forget = jnp.asarray(plan.data.train), jnp.asarray(plan.data.forget)
  if forget.shape[0] == 0:
    forget = train
  while int(state.step) < s.steps:
    length = min(s.eval_every, s.steps - int(state.step))
    runs, step = _train(plan, s.regimes, state.runs, state.reference, state.step, length,
                        train, forget)
    state = state._replace(runs=runs, step=step)
    yield state


# --- outputs --------------------------------------------------------------------------

METRICS = {"repetition": ("validation_perplexity", "next_token_accuracy", "seq_rep_4",
                          "repetition_rate", "unique_tokens"),
           "unlearning": ("forget_nll", "forget_log_ratio", "retain_perplexity",
                          "test_perplexity")}



def summarise(s: Settings, records: list[dict], info: dict, wall: float) -> tuple[dict, str]:
  last = max(r["step"] for r in records)
  final = [r for r in records if r["step"] == last]
  first = [r for r in records if r["step"] == 0]
  results = {"config": dataclasses.asdict(s), "data": info, "wall_seconds": wall, "regimes": {}}
  for regime in s.regimes:
    mine = [r for r in final if r["regime"] == regime]
    entry = {k: [r.get(k) for r in mine] for k in (*METRICS[s.experiment], "diverged",
                                                   "diverged_at_step")}
    flag = "collapsed" if s.experiment == "unlearning" else "worse_than_uniform"
    entry[f"{flag}_at_step"] = [  # a random start is worse than uniform: from step 1 on
        next((r["step"] for r in records if r["regime"] == regime and r["seed"] == seed
              and r["step"] > 0 and r.get(flag)), None) for seed in range(s.seeds)]
    results["regimes"][regime] = entry
  cols = METRICS[s.experiment]
  lines = [f"# {s.experiment} on CPython's help topics", "",
           f"TransformerLM (width {s.width}, depth {s.depth}, {s.heads} heads, context "
           f"{s.length}), vocabulary {info['vocab_size']}, {s.seeds} seeds, {s.steps} steps, "
           f"batch {s.batch_size} windows, Adam at {s.learning_rate:g}, "
           f"{'fused' if s.fused else 'unfused'} losses; {wall:.1f} s.", ""]
  if s.experiment == "unlearning":
    start = {k: mean_std([r.get(k) for r in first if r["regime"] == s.regimes[0]]) for k in cols}
    lines += [f"Forget topics: {', '.join(info['forget_topics'])} ({info['forget_windows']} "
              f"windows). The start ({s.initial_steps} mle steps on every training topic): "
              + ", ".join(f"{k} {v}" for k, v in start.items()) + ".", ""]
  flag = "collapsed" if s.experiment == "unlearning" else "worse_than_uniform"
  lines += ["| regime | " + " | ".join(cols) + f" | diverged | {flag.replace('_', ' ')} |",
            "|---|" + "---|" * len(cols) + "---:|---:|"]
  steps = lambda xs: (f" (steps {min(xs)}-{max(xs)})" if min(xs) != max(xs) else f" (step {xs[0]})") if xs else ""
  for regime, e in results["regimes"].items():
    div = [x for x in e["diverged_at_step"] if x is not None]
    bad = [x for x in e[f"{flag}_at_step"] if x is not None]
    lines.append(f"| {regime} | " + " | ".join(mean_std(e[k]) for k in cols)
                 + f" | {len(div)}/{s.seeds}{steps(div)} | {len(bad)}/{s.seeds}{steps(bad)} |")
  lines += ["", "Mean ± sample standard deviation over seeds at the last step. A run diverges "
            "at the first step whose loss or gradient is not finite or whose loss falls below "
            f"-{s.logit_bound:g}, and is frozen there. "
            + ("Collapsed: retain perplexity above "
               f"{s.collapse:g} x the start's, first at the evaluation shown."
               if s.experiment == "unlearning" else
               "Worse than uniform: validation perplexity above the vocabulary size "
               f"({results['data']['vocab_size']}) at an evaluation after the start, the first "
               "shown.")]
  return results, "\n".join(lines) + "\n"


def _plot(s: Settings, records, path):
  import io
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from jaxsoftmax_experiments.report import write_atomic
  keys = (("validation_perplexity", "seq_rep_4") if s.experiment == "repetition"
          else ("forget_nll", "retain_perplexity"))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, regime in enumerate(s.regimes):
    steps = sorted({r["step"] for r in records})
    for ax, key in zip(axes, keys):
      v = np.array([[np.nan if r.get(key) is None else r[key] for r in records
                     if r["regime"] == regime and r["step"] == st] for st in steps], float)
      ax.plot(steps, np.nanmean(v, 1), color=f"C{i}", label=regime)
      ax.set(xlabel="step", ylabel=key, yscale="log" if "perplexity" in key else "linear")
  axes[0].legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  write_atomic(path, buf.getvalue())


def fingerprint(s: Settings, data: Data) -> str:
  h = hashlib.sha256(json.dumps(dataclasses.asdict(s), sort_keys=True).encode())
  for a in (data.train, data.validation, data.test, data.forget):
    h.update(a.tobytes())
  return h.hexdigest()


def execute(s: Settings, workdir: Path, *, stop_after: int | None = None,
            progress: bool = True) -> int:
  """Runs (or resumes) the experiment in ``workdir``; ``stop_after`` evaluations stops early
  (as Ctrl-C would), leaving a checkpoint. Returns the exit status."""
  from jaxsoftmax_experiments import report
  from jaxsoftmax_experiments.checkpoint import Checkpointer, CheckpointError
  from jaxsoftmax_experiments.workdir import METRICS as METRICS_LOG, Workdir, WorkdirError
  plan, info = plan_of(s)
  data = plan.data
  wd = Workdir(workdir)
  try:
    wd.lock()
  except WorkdirError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    wd.remove_temporary_files()
    config = json.loads(report.to_json(dataclasses.asdict(s)))
    problem = wd.config_problem(config)
    if problem:
      print(f"error: {problem}", file=sys.stderr)
      return 2
    if wd.is_complete():
      print(f"The run in {wd.path} is complete; its results are in results.json and summary.md.")
      return 0
    wd.claim("jaxsoftmax-lm")
    wd.write_config(config)
    checkpoints = Checkpointer(wd.checkpoints)
    fp = fingerprint(s, data)
    template = jax.eval_shape(lambda: _start(plan, jax.random.key(s.seed)))
    lines, records = wd.read_metrics()
    try:
      found = checkpoints.restore_latest(template, fingerprint=fp,
                                         usable=lambda m: m["num_records"] <= len(lines))
    except CheckpointError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    state, resumed = None, None
    if found:
      resumed, state, meta = found
      lines, records = lines[:meta["num_records"]], records[:meta["num_records"]]
      print(f"Resuming from the checkpoint at step {resumed}.")
    else:
      lines, records = [], []
    wd.keep_metrics(lines)
    start_ppl = None
    if records and s.experiment == "unlearning":
      start_ppl = np.array([r["retain_perplexity"] for r in records
                            if r["step"] == 0 and r["regime"] == s.regimes[0]])
    begin = time.perf_counter()
    evaluations = 0
    with open(wd / METRICS_LOG, "a") as f:
      for state in run(plan, state):
        step = int(state.step)
        if step == resumed:
          continue
        new = evaluate(plan, state, start_ppl)
        if step == 0 and s.experiment == "unlearning":
          start_ppl = np.array([r["retain_perplexity"] for r in new if r["regime"] == s.regimes[0]])
        records += new
        wd.append_metrics(f, new)
        checkpoints.save(step, state, {"step": step, "num_records": len(records),
                                       "fingerprint": fp})
        if progress:
          print(f"step {step}/{s.steps}", file=sys.stderr, flush=True)
        evaluations += 1
        if stop_after is not None and evaluations >= stop_after and step < s.steps:
          checkpoints.close()
          print(f"Stopped at step {step}; rerun the same command to resume.", file=sys.stderr)
          return 130
    checkpoints.close()
    # The wall time is not part of the files (a resumed run ends byte for byte as one
    # never stopped); it is printed, and kept in timing.json.
    wall = time.perf_counter() - begin
    results, summary = summarise(s, records, info, 0.0)
    results.pop("wall_seconds")
    summary = summary.replace("; 0.0 s.", ".")
    report.write_atomic(wd.path / "results.json", report.to_json(results))
    report.write_atomic(wd.path / "summary.md", summary)
    report.write_atomic(wd.path / "timing.json", report.to_json(
        {"wall_seconds": wall, "resumed_from_step": resumed}))
    _plot(s, records, wd.path / "curves.png")
    print(summary)
    print(f"{wall:.1f} s. Wrote config.json, metrics.jsonl, results.json, summary.md, "
          f"timing.json and curves.png to {wd.path}/")
    return 0
  finally:
    wd.unlock()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jaxsoftmax-lm", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", help="folder for the run's outputs (required)")
  for f in dataclasses.fields(Settings):
    kind = type(f.default)
    if kind is bool:
      parser.add_argument(f"--{f.name}", type=lambda v: v.lower() in ("1", "true", "yes"),
                          default=f.default)
    else:
      parser.add_argument(f"--{f.name}", type=kind, default=f.default)
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
  if args.experiment == "unlearning":
    for key, value in UNLEARNING_DEFAULTS.items():
      if not any(a.startswith(f"--{key}") for a in argv):
        values[key] = value
  s = Settings(**values)
  try:
    s.check()
  except LMError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not args.workdir:
    print("error: --workdir is required, e.g. --workdir=runs/lm_repetition.", file=sys.stderr)
    return 2
  return execute(s, Path(args.workdir))


def cli() -> None:
  """The ``jaxsoftmax-lm`` console script."""
  sys.exit(main())


if __name__ == "__main__":
  cli()
