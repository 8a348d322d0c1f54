"""Negative feedback for a language model: token unlikelihood against repetition, and
unlearning by gradient ascent, the complement likelihood or NPO, on real text; and the
model's own answers to a task, judged and learned from (``feedback``).

    jaxsoftmax-run --config=lm_repetition --workdir=runs/lm_repetition
    jaxsoftmax-run --config=lm_unlearning --workdir=runs/lm_unlearning
    jaxsoftmax-run --config=lm_unlearning --config.dataset=text:my_notes.txt --workdir=runs/mine
    jaxsoftmax-run --config=lm_feedback --workdir=runs/lm_feedback

The feedback experiment is :mod:`jaxsoftmax_experiments.judged`; this module hands its
plan, runs, records and outputs to it.

The kind ``lm`` of the framework (:mod:`jaxsoftmax_experiments.kinds`). The text is
CPython's help topics (:mod:`jaxsoftmax_experiments.text`) or a user's (``text:PATH``),
the model a small decoder-only transformer (:class:`jaxsoftmax.models.TransformerLM`)
whose output layer goes through the fused losses (``config.head='softmax'``: the
unfused losses on the logits). Every regime x seed trains at once: one compiled
program, the runs grouped by regime and ``jax.vmap``-ed over seeds, Adam, windows of
``config.length`` tokens drawn with replacement.

``repetition`` (Welleck et al. 2019), from a random start:

The regimes are the classifier's, from the one regime table
(:mod:`jaxsoftmax_experiments.regimes`), on token targets:

- ``positive_only`` (mle): the NLL of each next token.
- ``complement_likelihood`` (unlikelihood): mle plus ``alpha * -log(1 - P(C_t))``, with C_t
  the window's tokens before position t other than its target (``fused_complement_set_nll``).
- ``negated_gradient``: mle plus ``alpha * log P(C_t)`` on the same negatives, the naive
  negated gradient (``-fused_set_nll``).

Metrics at each evaluation: validation perplexity and next-token accuracy; and on greedy
continuations (``config.generate`` tokens) of validation prompts (their first ``config.prompt``
tokens): seq-rep-4 (the share of repeated 4-grams in a continuation), the repetition rate
(the share of continuation tokens found in the 16 before them) and the number of unique
tokens over all continuations; and whether the validation perplexity is above the
vocabulary size (worse than a uniform guess), the first evaluation at which it is.

``unlearning`` (Zhang et al. 2024): a model trained with ``mle`` on every training topic
for ``config.initial_steps`` is the start and the frozen reference. ``config.forget``
topics are to be forgotten, the other training topics retained. Each regime adds the retain NLL to:

- ``negated_gradient`` (gradient ascent): minus the forget NLL;
- ``complement_likelihood``: ``-log(1 - p_t)`` of each forget token (``fused_complement_nll``);
- ``npo``: ``(2/beta) log(1 + (pi(x) / pi_ref(x))^beta)`` per forget window, with
  ``pi(x)`` the window's likelihood.

Metrics: forget NLL, the forget log-likelihood ratio to the reference (per token), retain
and test perplexity, and collapse: retain perplexity above ``config.collapse`` times
the start's. The packaged ``lm_unlearning`` runs 200 steps and
evaluates every 50.

A run diverges at the first step whose loss or gradient is not finite, whose largest
``|logit|`` passes ``logit_bound`` (the head's reading: an upper bound for the fused head) or
whose loss falls below ``-logit_bound``; it is then frozen and recorded. The workdir is the
framework's (:mod:`jaxsoftmax_experiments.workdir`); a resumed run ends with the same
files, byte for byte, as a run never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxsoftmax import losses
from jaxsoftmax.models import TransformerLM
from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import heads as heads_lib
from jaxsoftmax_experiments import parallel, report, text, training
from jaxsoftmax_experiments.regimes import REGIMES
from jaxsoftmax_experiments.report import mean_std

EXPERIMENTS = config_lib.LM_EXPERIMENTS


@dataclasses.dataclass(frozen=True)
class Settings:
  """A validated lm config as a frozen, hashable record (it keys the compiled programs)."""

  experiment: str = "repetition"
  regimes: tuple[str, ...] = EXPERIMENTS["repetition"]
  dataset: str = "help_topics"
  num_seeds: int = 3
  steps: int = 800
  eval_every: int = 200
  batch_size: int = 16
  length: int = 32
  width: int = 64
  depth: int = 2
  heads: int = 4
  learning_rate: float = 1e-3
  alpha: float = 1.0
  head: str = "fused"
  num_clusters: int = 0
  tree: str = "huffman"
  branching: int = 2
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
  # the feedback experiment's (jaxsoftmax_experiments.judged)
  task: str = "addition"
  digits: int = 2
  num_labeled: int = 500
  num_unlabeled: int = 1000
  num_validation: int = 300
  num_test: int = 300
  samples: int = 4
  temperature: float = 1.0
  feedback_rounds: int = 2
  eval_samples: int = 8
  select_every: int = 250
  wreinforce_lambda: float = 0.1
  pmpo_alpha: float = 0.5
  pmpo_beta: float = 0.1
  nft_epsilon: float = 0.1
  simnpo_beta: float = 2.5
  simnpo_gamma: float = 0.0

  @classmethod
  def of(cls, config) -> "Settings":
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(
      **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
    )


# --- data ----------------------------------------------------------------------------


class Data(NamedTuple):
  train: np.ndarray  # [n, length + 1] windows (retain windows when unlearning)
  validation: np.ndarray
  test: np.ndarray
  forget: np.ndarray  # [m, length + 1]; empty for repetition
  vocab_size: int


def make_data(s: Settings, corpus: text.Corpus | None = None) -> tuple[Data, dict]:
  corpus = corpus or text.corpus()
  train_names = sorted(corpus.tokens["train"])
  # The forget topics: evenly spaced among the training topics, by name.
  step = max(1, len(train_names) // s.forget)
  forget_names = train_names[step // 2 :: step][: s.forget] if s.experiment == "unlearning" else []
  retain_names = [n for n in train_names if n not in forget_names]
  w = lambda stream: text.windows(stream, s.length)
  data = Data(
    w(corpus.stream("train", retain_names)),
    w(corpus.stream("validation")),
    w(corpus.stream("test")),
    w(corpus.stream("train", forget_names))
    if forget_names
    else np.zeros((0, s.length + 1), np.int32),
    len(corpus.vocabulary),
  )
  info = {
    "vocab_size": len(corpus.vocabulary),
    "forget_topics": forget_names,
    "train_windows": len(data.train),
    "validation_windows": len(data.validation),
    "test_windows": len(data.test),
    "forget_windows": len(data.forget),
  }
  return data, info


# --- model and losses ----------------------------------------------------------------


def token_counts(data: Data) -> np.ndarray:
  """How often each token is a training target: the frequencies of a Huffman tree."""
  return np.bincount(data.train[:, 1:].ravel(), minlength=data.vocab_size)


def make_head(
  s: Settings, vocab_size: int, frequencies: np.ndarray | None = None
) -> heads_lib.Head:
  return heads_lib.make_head(
    s.head,
    vocab_size,
    s.num_clusters,
    s.vocab_chunk,
    tree=s.tree,
    branching=s.branching,
    frequencies=frequencies,
  )


def build(s: Settings, vocab_size: int, key, head: heads_lib.Head | None = None) -> TransformerLM:
  head = head if head is not None else make_head(s, vocab_size)
  return TransformerLM(
    vocab_size,
    s.length,
    width=s.width,
    depth=s.depth,
    heads=s.heads,
    tree=heads_lib.tree_of(head),
    rngs=nnx.Rngs(key),
  )


def candidates(windows):
  """Welleck et al.'s candidates C_t: the tokens before target t in its window (the
  inputs up to t) other than the target, ``[B, T, T]``, -1 where unused."""
  return text.previous_tokens(windows[:, :-1], windows[:, 1:])


class Targets(NamedTuple):
  """What a regime's losses read of a batch of windows (the fields the classifier's
  examples have): the target tokens ``[B, T]`` (-1: none), further wrong ids
  ``[B, T, M]`` or None, and the reference log-likelihood of each window ``[B]`` (npo)."""

  label: jax.Array
  wrong: jax.Array | None = None
  reference: jax.Array | None = None


def objective(s: Settings, head, regime: str, model, batch, reference=None):
  """The regime's loss on a batch, from the one regime table
  (:data:`jaxsoftmax_experiments.regimes.REGIMES`): the mean of its positive loss over
  the batch's target tokens, plus its negative loss on the negatives. ``batch`` is
  ``(windows,)`` (repetition: each position's negatives are the window's earlier tokens
  other than its target, a set, weighted by ``alpha``, and the mean runs over every
  position, an empty set adding 0) or, when unlearning, ``(retain windows, forget
  windows, forget indices)`` (the negatives are the forget windows' target tokens)."""
  rule = REGIMES[regime]
  if s.experiment == "repetition":
    (windows,) = batch
    targets = windows[:, 1:]
    out = head.training_output(model, windows[:, :-1], targets)
    loss = jnp.mean(rule.positive(head, out, Targets(targets), s))
    largest = head.largest_logit(out)
    if rule.negative is None:
      return loss, largest
    negatives = candidates(windows)
    has = jnp.any(negatives >= 0, -1)
    negative = rule.negative(head, out, Targets(jnp.full_like(targets, -1), negatives), s)
    return loss + s.alpha * jnp.mean(jnp.where(has, negative, 0.0)), largest
  retain, forget, index = batch
  out = head.training_output(model, retain[:, :-1], retain[:, 1:])
  loss = jnp.mean(rule.positive(head, out, Targets(retain[:, 1:]), s))
  largest = head.largest_logit(out)
  if rule.negative is None:
    return loss, largest
  out = head.training_output(model, forget[:, :-1], forget[:, 1:])
  targets = Targets(forget[:, 1:], None, None if reference is None else reference[index])
  loss = loss + jnp.mean(rule.negative(head, out, targets, s))
  return loss, jnp.maximum(largest, head.largest_logit(out))


# --- training and evaluation ----------------------------------------------------------
#
# The state is the framework's (training.State): one training.RunState group per regime,
# the step, and as the kind's own array the reference log-likelihood of every forget window,
# [seeds, forget windows] (unlearning; [seeds, 1] and unused in the repetition experiment).


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Plan:
  settings: Settings
  data: Data
  graphdef: Any
  head: heads_lib.Head
  mesh: Mesh  # (runs, batch): seeds x each batch
  info: dict = dataclasses.field(default_factory=dict)  # the data's description

  @property
  def optimizer(self):
    return optax.adam(self.settings.learning_rate)


def make_plan(s: Settings, data: Data, info: dict | None = None, devices=None) -> Plan:
  """The plan of settings on data, over ``devices`` (default: all): each regime's seeds
  split over the mesh's runs axis, each run's batch of windows over its batch axis."""
  head = make_head(s, data.vocab_size, token_counts(data))
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(s, data.vocab_size, 0, head)))  # no compute
  return Plan(
    s, data, graphdef, head, parallel.make_mesh(s.num_seeds, s.batch_size, devices), info or {}
  )


def _step(
  plan: Plan, regime: str, run: training.RunState, reference, train, forget
) -> training.RunState:
  s = plan.settings
  key, k1, k2 = jax.random.split(run.key, 3)
  rows = jax.random.randint(k1, (s.batch_size,), 0, train.shape[0])
  if s.experiment == "repetition" or REGIMES[regime].negative is None:
    batch = (train[rows],)
  else:
    index = jax.random.randint(k2, (s.batch_size,), 0, forget.shape[0])
    batch = (train[rows], forget[index], index)
  # The batch is split over the mesh's batch axis (under vmap, runs over its runs axis).
  batch = jax.lax.with_sharding_constraint(batch, parallel.batch_sharding(plan.mesh))

  def loss_fn(params):
    return objective(s, plan.head, regime, nnx.merge(plan.graphdef, params), batch, reference)

  (loss, largest), grads = jax.value_and_grad(loss_fn, has_aux=True)(run.params)
  return training.apply_update(plan.optimizer, run, key, loss, grads, largest, s.logit_bound)


def _init(plan: Plan, key) -> training.RunState:
  k_init, k_batch = jax.random.split(key)
  params = nnx.state(build(plan.settings, plan.data.vocab_size, k_init, plan.head), nnx.Param)
  return training.new_run(params, plan.optimizer, k_batch)


@functools.partial(jax.jit, static_argnames=("plan", "regimes", "length"))
def _train(
  plan: Plan, regimes: tuple[str, ...], runs: tuple, reference, length: int, train, forget
) -> tuple:
  """``length`` steps of every run of ``regimes`` (one group each, over seeds)."""
  steppers = [
    jax.vmap(
      functools.partial(_step, plan, regime), (0, 0, None, None), spmd_axis_name=parallel.RUNS
    )
    for regime in regimes
  ]

  def body(runs, _):
    return tuple(f(run, reference, train, forget) for f, run in zip(steppers, runs)), None

  runs, _ = jax.lax.scan(body, runs, None, length=length)
  return jax.lax.with_sharding_constraint(
    runs, jax.tree.map(lambda _: parallel.run_sharding(plan.mesh), runs)
  )


@functools.partial(jax.jit, static_argnames=("plan",))
def _window_losses(plan: Plan, params, windows):
  """Per-window token NLLs ``[seeds, n, T]`` and next-token hits, unfused (eval only)."""

  def one(p):
    z = plan.head.scores(nnx.merge(plan.graphdef, p), windows[:, :-1])
    return losses.nll(z, windows[:, 1:]), jnp.argmax(z, -1) == windows[:, 1:]

  return jax.vmap(one)(params)


@functools.partial(jax.jit, static_argnames=("plan",))
def _continue(plan: Plan, params, prompts):
  """The prompts ``[n, prompt]`` and their greedy continuations, ``[seeds, n, prompt +
  generate]``, each step reading the last ``length`` tokens (a sequence shorter than
  ``length`` is padded at its end: the causal model never reads past the position it
  predicts from)."""
  s = plan.settings
  total = s.prompt + s.generate

  def one(p):
    model = nnx.merge(plan.graphdef, p)
    width = max(total, s.length)
    seq = jnp.zeros((prompts.shape[0], width), jnp.int32).at[:, : s.prompt].set(prompts)

    def body(seq, t):
      start = jnp.maximum(t - s.length, 0)
      window = jax.lax.dynamic_slice_in_dim(seq, start, s.length, axis=1)
      z = plan.head.scores(model, window)
      last = jnp.minimum(t, s.length) - 1
      nxt = jnp.argmax(z[:, last], -1).astype(jnp.int32)
      return seq.at[:, t].set(nxt), None

    seq, _ = jax.lax.scan(body, seq, jnp.arange(s.prompt, total))
    return seq[:, :total]

  return jax.vmap(one)(params)


def seq_rep(continuation: np.ndarray, n: int = 4) -> float:
  """1 - unique n-grams / n-grams of one continuation (Welleck et al.'s seq-rep-n)."""
  grams = [tuple(continuation[i : i + n]) for i in range(len(continuation) - n + 1)]
  return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequence: np.ndarray, start: int, window: int = 16) -> float:
  """The share of tokens from ``start`` on found among the ``window`` tokens before them."""
  hits = [sequence[t] in sequence[max(0, t - window) : t] for t in range(start, len(sequence))]
  return float(np.mean(hits))


def evaluate(plan: Plan, state: training.State, start_retain_ppl=None) -> list[dict]:
  """One record per (regime, seed) at the state's step."""
  s, d = plan.settings, plan.data
  out = []
  for regime, run in zip(s.regimes, state.runs):
    rec = {}
    if s.experiment == "repetition":
      nll, hit = (
        np.asarray(a, np.float64)
        for a in parallel.fetch(_window_losses(plan, run.params, d.validation))
      )
      rec["validation_perplexity"] = np.exp(nll.mean((1, 2)))
      rec["next_token_accuracy"] = hit.mean((1, 2))
      prompts = d.validation[: s.num_prompts, : s.prompt]
      seqs = np.asarray(parallel.fetch(_continue(plan, run.params, prompts)))
      cont = seqs[:, :, s.prompt :]
      rec["seq_rep_4"] = np.array([np.mean([seq_rep(c) for c in seed]) for seed in cont])
      rec["repetition_rate"] = np.array(
        [np.mean([repetition_rate(q, s.prompt) for q in seed]) for seed in seqs]
      )
      rec["unique_tokens"] = np.array([len(np.unique(seed)) for seed in cont], float)
      rec["worse_than_uniform"] = rec["validation_perplexity"] > d.vocab_size
    else:
      forget = np.asarray(parallel.fetch(_window_losses(plan, run.params, d.forget)[0]), np.float64)
      rec["forget_nll"] = forget.mean((1, 2))
      log_pi = -forget.sum(-1)
      reference = np.asarray(parallel.fetch(state.extra), np.float64)
      rec["forget_log_ratio"] = (log_pi - reference).mean(1) / s.length
      retain = np.asarray(
        parallel.fetch(_window_losses(plan, run.params, d.train[: len(d.test)])[0]), np.float64
      )
      rec["retain_perplexity"] = np.exp(retain.mean((1, 2)))
      test = np.asarray(parallel.fetch(_window_losses(plan, run.params, d.test)[0]), np.float64)
      rec["test_perplexity"] = np.exp(test.mean((1, 2)))
      # At step 0 every regime is the start: its own retain perplexity is the baseline.
      start = rec["retain_perplexity"] if start_retain_ppl is None else start_retain_ppl
      rec["collapsed"] = rec["retain_perplexity"] > s.collapse * start
    alive, at = (np.asarray(a) for a in parallel.fetch((run.alive, run.diverged_at)))
    for seed in range(s.num_seeds):
      r = {"step": int(state.step), "regime": regime, "seed": seed}
      for k, v in rec.items():
        v = v[seed]
        r[k] = bool(v) if isinstance(v, np.bool_) else (float(v) if math.isfinite(v) else None)
      r["diverged"] = not bool(alive[seed])
      r["diverged_at_step"] = None if alive[seed] else int(at[seed])
      out.append(r)
  return out


@functools.partial(jax.jit, static_argnames=("plan",))
def _start(plan: Plan, key) -> training.State:
  s = plan.settings
  seeds = jax.random.split(key, s.num_seeds)
  if s.experiment == "repetition":
    runs = tuple(jax.vmap(functools.partial(_init, plan))(seeds) for _ in s.regimes)
    # The reference is unused here; orbax saves no empty array.
    state = training.State(runs, jnp.int32(0), jnp.zeros((s.num_seeds, 1), jnp.float32))
    return training.constrain(plan.mesh, state)
  # Unlearning: train the start with mle on every training window (retain and forget).
  everything = jnp.concatenate([plan.data.train, plan.data.forget])
  start = jax.vmap(functools.partial(_init, plan))(seeds)
  pre = dataclasses.replace(
    plan, settings=dataclasses.replace(s, experiment="repetition", regimes=("positive_only",))
  )
  (start,) = _train(
    pre, ("positive_only",), (start,), None, s.initial_steps, everything, everything
  )
  nll = _window_losses(plan, start.params, plan.data.forget)[0]
  reference = -jnp.sum(nll, -1)  # [seeds, forget windows]
  fresh = lambda: jax.vmap(lambda k: jax.random.fold_in(k, 1))(start.key)
  new_run = jax.vmap(lambda params, key: training.new_run(params, plan.optimizer, key))
  runs = tuple(new_run(start.params, fresh()) for _ in s.regimes)
  return training.constrain(plan.mesh, training.State(runs, jnp.int32(0), reference))


def training_windows(plan: Plan):
  """``(train, forget)``: the windows :func:`_train` reads (the training windows stand in
  for an empty forget set, in the repetition experiment)."""
  forget = plan.data.forget if len(plan.data.forget) else plan.data.train
  return plan.data.train, forget


def run(plan: Plan, state: training.State | None = None) -> Iterator[training.State]:
  """Yields the state after every evaluation, the first at step 0."""
  if _judged(plan):
    from jaxsoftmax_experiments import judged

    return judged.run(plan, state)  # type: ignore[arg-type]
  s = plan.settings
  if state is None:
    state = _start(plan, jax.random.key(s.seed))
  train, forget = parallel.put(training_windows(plan), parallel.replicated(plan.mesh))

  def advance(state, length):
    runs = _train(plan, s.regimes, state.runs, state.extra, length, train, forget)
    return state._replace(runs=runs, step=state.step + length)

  return training.evaluations(state, advance, s.steps, s.eval_every)


# --- outputs --------------------------------------------------------------------------

METRICS = {
  "repetition": (
    "validation_perplexity",
    "next_token_accuracy",
    "seq_rep_4",
    "repetition_rate",
    "unique_tokens",
  ),
  "unlearning": ("forget_nll", "forget_log_ratio", "retain_perplexity", "test_perplexity"),
}


def summarise(s: Settings, records: list[dict], info: dict, wall: float) -> tuple[dict, str]:
  last = max(r["step"] for r in records)
  final = [r for r in records if r["step"] == last]
  first = [r for r in records if r["step"] == 0]
  results = {"config": None, "data": info, "wall_seconds": wall, "regimes": {}}
  for regime in s.regimes:
    mine = [r for r in final if r["regime"] == regime]
    entry = {
      k: [r.get(k) for r in mine] for k in (*METRICS[s.experiment], "diverged", "diverged_at_step")
    }
    flag = "collapsed" if s.experiment == "unlearning" else "worse_than_uniform"
    entry[f"{flag}_at_step"] = [  # a random start is worse than uniform: from step 1 on
      next(
        (
          r["step"]
          for r in records
          if r["regime"] == regime and r["seed"] == seed and r["step"] > 0 and r.get(flag)
        ),
        None,
      )
      for seed in range(s.num_seeds)
    ]
    results["regimes"][regime] = entry
  cols = METRICS[s.experiment]
  lines = [
    f"# {s.experiment} on "
    + ("CPython's help topics" if s.dataset == "help_topics" else f"the text {s.dataset[5:]}"),
    "",
    f"TransformerLM (width {s.width}, depth {s.depth}, {s.heads} heads, context "
    f"{s.length}), vocabulary {info['vocab_size']}, {s.num_seeds} seeds, {s.steps} steps, "
    f"batch {s.batch_size} windows, Adam at {s.learning_rate:g}, "
    f"{s.head} head; {wall:.1f} s.",
    "",
  ]
  if s.experiment == "unlearning":
    start = {k: mean_std([r.get(k) for r in first if r["regime"] == s.regimes[0]]) for k in cols}
    lines += [
      f"Forget topics: {', '.join(info['forget_topics'])} ({info['forget_windows']} "
      f"windows). The start ({s.initial_steps} mle steps on every training topic): "
      + ", ".join(f"{k} {v}" for k, v in start.items())
      + ".",
      "",
    ]
  flag = "collapsed" if s.experiment == "unlearning" else "worse_than_uniform"
  lines += [
    "| regime | " + " | ".join(cols) + f" | diverged | {flag.replace('_', ' ')} |",
    "|---|" + "---|" * len(cols) + "---:|---:|",
  ]
  steps = lambda xs: (
    (f" (steps {min(xs)}-{max(xs)})" if min(xs) != max(xs) else f" (step {xs[0]})") if xs else ""
  )
  for regime, e in results["regimes"].items():
    div = [x for x in e["diverged_at_step"] if x is not None]
    bad = [x for x in e[f"{flag}_at_step"] if x is not None]
    known = config_lib.LITERATURE_NAMES[s.experiment].get(regime)
    label = f"{regime} ({known})" if known else regime
    lines.append(
      f"| {label} | "
      + " | ".join(mean_std(e[k]) for k in cols)
      + f" | {len(div)}/{s.num_seeds}{steps(div)} | {len(bad)}/{s.num_seeds}{steps(bad)} |"
    )
  lines += [
    "",
    "Mean ± sample standard deviation over seeds at the last step. "
    + report.divergence_rule(s.logit_bound)
    + " "
    + (
      "Collapsed: retain perplexity above "
      f"{s.collapse:g} x the start's, first at the evaluation shown."
      if s.experiment == "unlearning"
      else "Worse than uniform: validation perplexity above the vocabulary size "
      f"({results['data']['vocab_size']}) at an evaluation after the start, the first "
      "shown."
    ),
  ]
  return results, "\n".join(lines) + "\n"


def _plot(s: Settings, records, path):
  import io

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxsoftmax_experiments.report import write_atomic

  keys = (
    ("validation_perplexity", "seq_rep_4")
    if s.experiment == "repetition"
    else ("forget_nll", "retain_perplexity")
  )
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, regime in enumerate(s.regimes):
    steps = sorted({r["step"] for r in records})
    for ax, key in zip(axes, keys):
      v = np.array(
        [
          [
            np.nan if r.get(key) is None else r[key]
            for r in records
            if r["regime"] == regime and r["step"] == st
          ]
          for st in steps
        ],
        float,
      )
      ax.plot(steps, np.nanmean(v, 1), color=f"C{i}", label=regime)
      ax.set(xlabel="step", ylabel=key, yscale="log" if "perplexity" in key else "linear")
  axes[0].legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  write_atomic(path, buf.getvalue())


# --- the framework's kind interface ----------------------------------------------------

PROGRESS = {
  "repetition": "validation perplexity",
  "unlearning": "forget NLL",
  "feedback": "test exact match",
}


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity
class Loaded:
  """An lm config's settings, data and a description of the data."""

  settings: Settings
  data: Data
  info: dict


def load(config) -> Loaded:
  """The corpus of ``config.dataset``, checked against the config, and its windows, made
  once per settings and text in a process (a user's text is known by its files' bytes),
  so that a rerun finds its plan and compiled programs again; for the feedback
  experiment, the task's problems (a user's task file is known by its bytes)."""
  s = Settings.of(config)
  if s.experiment == "feedback":
    return _load_cached(s, None if s.task == "addition" else text.digest(s.task[3:]))
  return _load_cached(s, None if s.dataset == "help_topics" else text.digest(s.dataset[5:]))


@functools.lru_cache(maxsize=4)
def _load_cached(s: Settings, digest: str | None) -> Loaded:
  del digest  # the cache's key: the same path with other contents is loaded again
  return _load(s)


def _load(s: Settings) -> Loaded:
  if s.experiment == "feedback":
    return _load_feedback(s)
  corpus = text.corpus() if s.dataset == "help_topics" else text.user_corpus(s.dataset[5:])
  sizes = {p: sum(len(t) for t in corpus.tokens[p].values()) for p in corpus.tokens}
  sizes["train_topics"] = len(corpus.tokens["train"])
  config_lib.validate_lm(dataclasses.asdict(s), sizes)
  if s.head == "tree" and len(corpus.vocabulary.words) < 2:
    raise config_lib.ConfigError(
      f"config.head: the tree head needs at least 2 classes; the vocabulary of "
      f"{s.dataset} is <unk> alone (no token occurs 3 times in its training topics)."
    )
  data, info = make_data(s, corpus)
  if s.experiment == "unlearning" and (len(data.forget) == 0 or len(data.train) == 0):
    empty = "forget" if len(data.forget) == 0 else "retain"
    raise config_lib.ConfigError(
      f"config.forget: the {empty} topics hold no window of config.length + 1 = "
      f"{s.length + 1} tokens; forget other topics (a different count) or use a shorter length."
    )
  return Loaded(s, data, info)


class Judged(NamedTuple):
  """The feedback experiment's data: its task and the problems it drew."""

  task: Any
  problems: Any


def _load_feedback(s: Settings) -> Loaded:
  from jaxsoftmax_experiments import judged

  config_lib.validate_lm(dataclasses.asdict(s))
  if s.head not in judged.HEADS:
    raise config_lib.ConfigError(
      f"config.head: the feedback experiment's sequence losses take the "
      f"{' or the '.join(judged.HEADS)} head, got {s.head!r}."
    )
  task = judged.task_of(s.task, s.digits)
  sizes = {
    "labeled": s.num_labeled,
    "unlabeled": s.num_unlabeled,
    "validation": s.num_validation,
    "test": s.num_test,
  }
  problems = judged.draw_problems(task, sizes, s.seed)
  info = {"task": task.name, "vocab_size": problems.vocab_size, **sizes}
  return Loaded(s, Judged(task, problems), info)  # type: ignore[arg-type]


def check(config, loaded: Loaded, memory_bytes) -> None:
  config_lib.validate_lm(config.to_dict(), None, memory_bytes, loaded.info["vocab_size"])


def total_steps(config) -> int:
  if config.experiment == "feedback":
    return config.steps * config.feedback_rounds
  return config.steps


def plan(config, loaded: Loaded, devices) -> Plan:
  del config
  return _plan_of(loaded.settings, loaded, None if devices is None else tuple(devices))


@functools.lru_cache(maxsize=4)
def _plan_of(s: Settings, loaded: Loaded, devices):
  """One plan per settings, data and devices, so that a rerun in the same process reuses
  its compiled programs (they are keyed by the plan)."""
  if s.experiment == "feedback":
    from jaxsoftmax_experiments import judged

    task, problems = loaded.data
    return judged.make_plan(s, task, problems, loaded.info, devices)
  return make_plan(s, loaded.data, loaded.info, devices)


def _judged(plan_) -> bool:
  return plan_.settings.experiment == "feedback"


def template(plan_: Plan) -> training.State:
  """The checkpoint's abstract state: shapes, dtypes and the mesh's shardings."""
  if _judged(plan_):
    from jaxsoftmax_experiments import judged

    return training.template(plan_.mesh, lambda: judged.abstract_start(plan_))  # type: ignore[arg-type]
  return training.template(plan_.mesh, lambda: _start(plan_, jax.random.key(plan_.settings.seed)))


def host(plan_: Plan, state: training.State) -> training.State:
  return state  # the evaluation runs the models: it reads the state on the device


def step(state: training.State) -> int:
  return int(state.step)


def records(plan_: Plan, state: training.State, earlier: list[dict]) -> list[dict]:
  if _judged(plan_):
    from jaxsoftmax_experiments import judged

    return judged.records(plan_, state)  # type: ignore[arg-type]
  s = plan_.settings
  start = None
  if s.experiment == "unlearning":
    first = [
      r["retain_perplexity"] for r in earlier if r["step"] == 0 and r["regime"] == s.regimes[0]
    ]
    start = np.array(first) if first else None
  return evaluate(plan_, state, start)


def progress(plan_: Plan, new: list[dict]) -> tuple[str, dict[str, float]]:
  key = {"repetition": "validation_perplexity", "feedback": "exact_match"}.get(
    plan_.settings.experiment, "forget_nll"
  )
  out = {}
  for r in new:
    out.setdefault(r["regime"], []).append(np.nan if r.get(key) is None else r[key])
  return PROGRESS[plan_.settings.experiment], {k: float(np.mean(v)) for k, v in out.items()}


def outputs(
  plan_: Plan,
  state: training.State,
  records_: list[dict],
  resolved: dict,
  wall: float,
  resumed_from,
):
  del wall, resumed_from  # the files do not depend on them: a resumed run's are the same
  s = plan_.settings
  if _judged(plan_):
    from jaxsoftmax_experiments import judged

    results, summary = judged.summarise(plan_, state, records_)  # type: ignore[arg-type]
    results["num_devices"] = plan_.mesh.size
    results["config"] = resolved
    return results, summary, lambda path: judged.plot(plan_, records_, path)  # type: ignore[arg-type]
  results, summary = summarise(s, records_, plan_.info, 0.0)
  results.pop("wall_seconds")
  results["num_devices"] = plan_.mesh.size
  results["config"] = resolved
  summary = summary.replace("; 0.0 s.", ".")
  return results, summary, lambda path: _plot(s, records_, path)


def arrays(loaded: Loaded):
  if isinstance(loaded.data, Judged):
    return tuple(x for split in loaded.data.problems[:4] for x in split)
  d = loaded.data
  return (d.train, d.validation, d.test, d.forget)


def title(config) -> str:
  return f"lm/{config.experiment}"
