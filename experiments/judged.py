"""Judged generations: the language model's feedback experiment.

    jaxsoftmax-run --config=lm_feedback --workdir=runs/lm_feedback

The classifier's protocol on a language model's own answers (experiment ``feedback`` of
the kind ``lm``, :mod:`jaxsoftmax_experiments.kinds.lm`):

1. A task generated in code (:func:`addition`, or a user's file, :func:`load_task`) gives
   distinct problems, a prompt and a reference answer each, split into labeled,
   unlabeled, validation and test problems.
2. The start: a :class:`jaxsoftmax.models.TransformerLM` trained on the labeled problems
   for ``initial_steps``, validated every ``select_every`` steps by greedy exact match on
   the validation prompts; the best is the start (one per seed).
3. Rounds (``feedback_rounds``, ``steps`` each): ``samples`` answers per unlabeled
   prompt are sampled at ``temperature``, judged (exact match, or the task's judge), and
   every regime trains from its own model on the labeled problems, the answers judged
   right (positives) and those judged wrong (negatives). Round 0 samples from the start
   (the same answers for every regime of a seed); later rounds from each regime's own
   model (on-policy), whose log-probabilities are also the reference of ``npo`` and the
   sampling policy of ``nft``.

The regimes are entries of the one regime table (:mod:`jaxsoftmax_experiments.regimes`),
applied to whole answers through :class:`SequenceHead`: the NLL of an answer is the sum
of its tokens' (``jaxsoftmax.losses.sequence_nll``), the complement likelihood is
``-log(1 - P(answer))`` (``sequence_complement_nll``), exact at every magnitude.

Metrics at each evaluation, on the test prompts: greedy exact match, pass@k for
k = 1, 2, 4, ... up to ``eval_samples`` (the unbiased estimator of Chen et al. 2021,
:func:`pass_at_k`), the distinct sampled answers per prompt and their entropy, the
reference answer's NLL, and the current round's judged counts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsoftmax import losses
from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import heads as heads_lib
from jaxsoftmax_experiments import parallel, report, training
from jaxsoftmax_experiments.regimes import ANSWER_SETS, REGIMES

HEADS = ("softmax", "fused")  # the heads whose losses :class:`SequenceHead` applies to answers

# --- tasks -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """A task: its vocabulary (one character per token), ``draw(seed) -> (prompt,
  reference answer)`` and ``judge(prompt, answer, reference) -> bool`` (None: exact match).
  Every prompt has the same length, and every answer."""

  name: str
  vocabulary: tuple[str, ...]
  draw: Callable[[int], tuple[str, str]]
  judge: Callable[[str, str, str], bool] | None = None


def addition(digits: int) -> Task:
  """Two ``digits``-digit numbers and their sum, its ``digits + 1`` digits reversed (the
  lowest first, as a model adding by hand writes them): ``"07+45="`` -> ``"250"``."""

  def draw(seed: int) -> tuple[str, str]:
    a, b = np.random.default_rng(seed).integers(0, 10**digits, 2)
    return f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}"[::-1]

  return Task(f"addition of two {digits}-digit numbers", tuple("0123456789+="), draw)


EXAMPLE_TASK = '''\
"""Subtraction: the first number less the second, or 'neg' when it is negative."""

import random

VOCABULARY = "0123456789-=neg"  # one character per token


def draw(seed):
  """A problem from a seed: (prompt, reference answer), of fixed lengths."""
  rng = random.Random(seed)
  a, b = rng.randrange(100), rng.randrange(100)
  answer = f"{a - b:02d}" if a >= b else "neg"
  return f"{a:02d}-{b:02d}=", answer.rjust(3, "0")


def judge(prompt, answer, reference):
  """Right when the answer is the reference (optional: exact match by default)."""
  return answer == reference
'''


def _task_error(path: str, message: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(f"config.task: {path}: {message}")


def load_task(path: str) -> Task:
  """The task a user's Python file defines (``config.task='py:PATH'``): ``VOCABULARY`` (a
  string, or a sequence of single characters), ``draw(seed)`` and optionally ``judge``.
  Raises ``ConfigError`` naming what is missing or wrong."""
  spec = importlib.util.spec_from_file_location("jaxsoftmax_user_task", path)
  if spec is None or spec.loader is None:
    raise _task_error(path, "not a Python file that can be loaded.")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except FileNotFoundError:
    raise _task_error(path, "no such file.") from None
  except Exception as e:  # the user's code: any error is theirs, named
    raise _task_error(path, f"loading it raised {type(e).__name__}: {e}") from None
  vocabulary = getattr(module, "VOCABULARY", None)
  if vocabulary is None:
    raise _task_error(path, "defines no VOCABULARY (a string, one character per token).")
  tokens = tuple(vocabulary)
  if not tokens or not all(isinstance(t, str) and len(t) == 1 for t in tokens):
    raise _task_error(path, "VOCABULARY must be a non-empty string of single characters.")
  if len(set(tokens)) != len(tokens):
    raise _task_error(path, "VOCABULARY repeats a character.")
  draw = getattr(module, "draw", None)
  if not callable(draw):
    raise _task_error(path, "defines no draw(seed) returning (prompt, reference answer).")
  judge = getattr(module, "judge", None)
  if judge is not None and not callable(judge):
    raise _task_error(path, "judge is defined but is not a function.")
  return Task(f"the task in {path}", tokens, draw, judge)


def task_of(name: str, digits: int) -> Task:
  return addition(digits) if name == "addition" else load_task(name[3:])


# --- problems ------------------------------------------------------------------------------


class Problems(NamedTuple):
  """Token ids of each split's prompts ``[n, P]`` and reference answers ``[n, A]``."""

  labeled: tuple[np.ndarray, np.ndarray]
  unlabeled: tuple[np.ndarray, np.ndarray]
  validation: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  vocab_size: int


SPLITS = ("labeled", "unlabeled", "validation", "test")


def _call(task: Task, what: str, fn, *args):
  try:
    return fn(*args)
  except Exception as e:  # the user's code
    raise config_lib.ConfigError(f"config.task: {what} raised {type(e).__name__}: {e}") from None


def draw_problems(task: Task, sizes: dict[str, int], seed: int) -> Problems:
  """``sizes[split]`` distinct problems per split (no prompt in two splits), drawn from
  seeds ``seed * 10**6 + i``; checked: strings of the vocabulary, of fixed lengths."""
  index = {t: i for i, t in enumerate(task.vocabulary)}
  need, seen, problems = sum(sizes.values()), set(), []
  lengths = None
  for i in range(20 * need + 100):
    if len(problems) == need:
      break
    got = _call(task, f"draw({seed * 10**6 + i})", task.draw, seed * 10**6 + i)
    if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(x, str) for x in got)):
      raise config_lib.ConfigError(
        f"config.task: draw({seed * 10**6 + i}) returned {got!r}; it must return "
        "(prompt, reference answer), two strings."
      )
    prompt, answer = got
    for what, text in (("prompt", prompt), ("answer", answer)):
      bad = sorted(set(text) - set(index))
      if bad or not text:
        raise config_lib.ConfigError(
          f"config.task: draw({seed * 10**6 + i}) gave the {what} {text!r}, "
          + (f"with {bad} outside VOCABULARY." if bad else "which is empty.")
        )
    if lengths is None:
      lengths = (len(prompt), len(answer), prompt, answer)
    elif (len(prompt), len(answer)) != lengths[:2]:
      raise config_lib.ConfigError(
        f"config.task: every prompt needs the same length and every answer too: "
        f"{prompt!r} -> {answer!r}, and before it {lengths[2]!r} -> {lengths[3]!r}."
      )
    if prompt not in seen:
      seen.add(prompt)
      problems.append((prompt, answer))
  if len(problems) < need:
    raise config_lib.ConfigError(
      f"config.num_labeled: the task gave {len(problems)} distinct prompts, and the splits "
      f"ask for {need} (num_labeled + num_unlabeled + num_validation + num_test)."
    )
  if task.judge is not None:
    prompt, answer = problems[0]
    if _call(task, "judge", task.judge, prompt, answer, answer) is not True:
      raise config_lib.ConfigError(
        f"config.task: judge({prompt!r}, {answer!r}, {answer!r}) is not True: the "
        "reference answer must be judged right."
      )
  ids = lambda texts: np.array([[index[c] for c in t] for t in texts], np.int32)
  out, start = {}, 0
  for split in SPLITS:
    chunk = problems[start : start + sizes[split]]
    start += sizes[split]
    out[split] = (ids([p for p, _ in chunk]), ids([a for _, a in chunk]))
  return Problems(**out, vocab_size=len(task.vocabulary))


def judge(task: Task, prompts: np.ndarray, answers: np.ndarray, references: np.ndarray):
  """Whether each answer is right: ``answers [..., n, m, A]`` against ``references [n, A]``
  of ``prompts [n, P]``; exact match, or the task's judge on the decoded strings."""
  if task.judge is None:
    return np.all(answers == references[:, None, :], axis=-1)
  text = lambda ids: "".join(task.vocabulary[i] for i in ids)
  prompt_text = [text(p) for p in prompts]
  reference_text = [text(r) for r in references]
  flat = answers.reshape(-1, *answers.shape[-3:])
  right = np.zeros(flat.shape[:-1], bool)
  for r, run in enumerate(flat):
    for i, row in enumerate(run):
      for j, answer in enumerate(row):
        right[r, i, j] = bool(task.judge(prompt_text[i], text(answer), reference_text[i]))
  return right.reshape(answers.shape[:-1])


# --- pass@k --------------------------------------------------------------------------------


def pass_at_k(n: int, c: np.ndarray, k: int) -> np.ndarray:
  """Chen et al. 2021's unbiased estimate of pass@k from ``n`` samples of which ``c`` are
  right: ``1 - C(n - c, k) / C(n, k)``, as the product ``prod_{i=n-c+1}^{n} (1 - k / i)``."""
  c = np.asarray(c)
  out = np.ones(c.shape)
  for index, ci in np.ndenumerate(c):
    if n - ci >= k:
      out[index] = 1.0 - np.prod(1.0 - k / np.arange(n - ci + 1, n + 1))
  return out


def ks(samples: int) -> tuple[int, ...]:
  """1, 2, 4, ... up to ``samples``."""
  return tuple(2**i for i in range(int(math.log2(samples)) + 1))


# --- the head on answers -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SequenceHead:
  """The losses of whole answers, for the regime table: ``labels`` are the target tokens
  ``[..., T]`` with -1 where a position is not the answer's."""

  inner: Any  # heads_lib.SoftmaxHead or FusedHead

  def training_output(self, model, x, labels):
    return self.inner.training_output(model, x, labels)

  def _loss(self, name, out, labels, **kw):
    if isinstance(self.inner, heads_lib.FusedHead):
      h, w, b = out
      fused = dict(bias=b, vocab_chunk=self.inner.vocab_chunk)
      return getattr(losses, "fused_" + name)(h, w, labels, ignore_index=-1, **fused, **kw)
    return getattr(losses, name)(out, labels, ignore_index=-1, **kw)

  def nll(self, out, labels):
    return self._loss("sequence_nll", out, labels)

  def set_nll(self, out, labels, wrong=None):
    del wrong  # one answer per example
    return self.nll(out, labels)

  def complement_nll(self, out, labels, wrong=None):
    del wrong
    return self._loss("sequence_complement_nll", out, labels)

  def complement_set_nll(self, out, labels):
    return self._loss("sequence_complement_set_nll", out, labels)

  def _per_token(self, name, out, labels):
    """A flat loss (``nll`` or ``complement_nll``) of every answer token, 0 elsewhere."""
    keep = labels >= 0
    safe = jnp.where(keep, labels, 0)
    if isinstance(self.inner, heads_lib.FusedHead):
      h, w, b = out
      kw = dict(bias=b, vocab_chunk=self.inner.vocab_chunk)
      per = getattr(losses, "fused_" + name)(h, w, safe, where=keep, **kw)
    else:
      per = getattr(losses, name)(out, safe, where=keep)
    return jnp.where(keep, per, 0.0)

  def token_nll(self, out, labels):
    """``-log p(a_t)`` of every answer token, 0 elsewhere, ``[..., T]``."""
    return self._per_token("nll", out, labels)

  def token_complement_nll(self, out, labels):
    """``sum_t -log(1 - p(a_t))`` over the answer's tokens."""
    return jnp.sum(self._per_token("complement_nll", out, labels), axis=-1)

  def largest_logit(self, out):
    return self.inner.largest_logit(out)


class Answers(NamedTuple):
  """What a regime's losses read of a batch of answers: ``label`` the target tokens (-1
  outside the answer), ``reference`` the log-likelihood of each answer under the round's
  start ``[B]`` (npo), ``reference_tokens`` its tokens' ``[B, T]`` and ``rate`` the share of
  the answer's prompt's samples judged right ``[B]`` (nft)."""

  label: jax.Array
  wrong: None = None
  reference: jax.Array | None = None
  reference_tokens: jax.Array | None = None
  rate: jax.Array | None = None


class Feedback(NamedTuple):
  """A round's judged answers of one group of runs: ``answers [seeds, n, m, A]``, ``right
  [seeds, n, m]`` and the answer tokens' log-probabilities under the model that sampled
  them, ``logp [seeds, n, m, A]``."""

  answers: jax.Array
  right: jax.Array
  logp: jax.Array


# --- the plan ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Plan:
  settings: Any  # kinds.lm.Settings
  task: Task
  problems: Problems
  graphdef: Any
  head: SequenceHead
  mesh: Any
  info: dict

  @property
  def optimizer(self):
    import optax

    return optax.adam(self.settings.learning_rate)

  @property
  def prompt_length(self) -> int:
    return self.problems.test[0].shape[1]

  @property
  def answer_length(self) -> int:
    return self.problems.test[1].shape[1]


def make_plan(s, task: Task, problems: Problems, info: dict, devices=None) -> Plan:
  from jaxsoftmax_experiments.kinds import lm

  length = problems.test[0].shape[1] + problems.test[1].shape[1] - 1
  s_model = dataclasses.replace(s, length=length)
  inner = lm.make_head(s_model, problems.vocab_size)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: lm.build(s_model, problems.vocab_size, 0, inner)))
  mesh = parallel.make_mesh(s.num_seeds, s.batch_size, devices)
  return Plan(s_model, task, problems, graphdef, SequenceHead(inner), mesh, info)


def _sequences(prompts, answers):
  """Model inputs ``[..., P + A - 1]`` and targets (-1 on the prompt) of prompt + answer."""
  full = jnp.concatenate([prompts, answers], axis=-1)
  p = prompts.shape[-1]
  targets = jnp.where(jnp.arange(full.shape[-1] - 1) >= p - 1, full[..., 1:], -1)
  return full[..., :-1], targets


def _model(plan: Plan, params):
  return nnx.merge(plan.graphdef, params)


def sample(plan: Plan, params, prompts, key, count: int, temperature: float | None):
  """``count`` answers per prompt ``[n, count, A]`` (greedy where ``temperature`` is
  None), one token after another."""
  model = _model(plan, params)
  p, a = plan.prompt_length, plan.answer_length
  n = prompts.shape[0]
  seq = jnp.zeros((n, count, p + a - 1), jnp.int32).at[..., :p].set(prompts[:, None, :])
  answers = jnp.zeros((n, count, a), jnp.int32)

  def body(carry, t):
    seq, answers = carry
    z = model(seq)[..., p - 1 + t, :].astype(jnp.float32)
    if temperature is None:
      token = jnp.argmax(z, -1).astype(jnp.int32)
    else:
      token = jax.random.categorical(jax.random.fold_in(key, t), z / temperature).astype(jnp.int32)
    answers = answers.at[..., t].set(token)
    seq = seq.at[..., p + t].set(token, mode="drop")  # the last token is no input
    return (seq, answers), None

  (_, answers), _ = jax.lax.scan(body, (seq, answers), jnp.arange(a))
  return answers


def token_logp(plan: Plan, params, prompts, answers):
  """``log p(a_t | prompt, a_<t)`` of ``answers [n, m, A]``, ``[n, m, A]``."""
  model = _model(plan, params)
  shape = (*answers.shape[:2], prompts.shape[-1])
  inputs, targets = _sequences(jnp.broadcast_to(prompts[:, None], shape), answers)
  z = model(inputs)
  nll = losses.nll(z, jnp.maximum(targets, 0))
  return -nll[..., plan.prompt_length - 1 :]


# --- training ------------------------------------------------------------------------------


class Start(NamedTuple):
  """How each seed's start was chosen: the step and its validation exact match, ``[seeds]``."""

  step: jax.Array
  exact_match: jax.Array


def _flat(out, shape):
  """A head's training output with its leading axis split into ``shape``."""
  return jax.tree.map(lambda x: x.reshape(*shape, *x.shape[1:]) if x.ndim > 2 else x, out)


def _step(plan: Plan, regime: str, run: training.RunState, fb: Feedback, labeled, unlabeled):
  """One optimizer step of one run: a batch of positives (the labeled problems and, unless
  the regime says otherwise, the answers judged right) and a batch of negatives (answers
  judged wrong; for a set regime, prompts with all their wrong answers)."""
  s, head, rule = plan.settings, plan.head, REGIMES[regime]
  key, k_pos, k_neg = jax.random.split(run.key, 3)
  prompts_l, answers_l = labeled
  n_l, m, a, b = prompts_l.shape[0], fb.right.shape[-1], plan.answer_length, s.batch_size
  flat_answers = fb.answers.reshape(-1, a)

  def loss_fn(params):
    model = _model(plan, params)
    loss, largest = jnp.float32(0.0), jnp.float32(0.0)
    if rule.positives != "none":
      judged = fb.right.reshape(-1) & (rule.positives == "all")
      pool = jnp.concatenate([jnp.ones(n_l, bool), judged])
      i = jax.random.categorical(k_pos, jnp.where(pool, 0.0, -jnp.inf), shape=(b,))
      is_labeled, j = i < n_l, jnp.maximum(i - n_l, 0)
      prompts = jnp.where(
        is_labeled[:, None], prompts_l[jnp.minimum(i, n_l - 1)], unlabeled[j // m]
      )
      answers = jnp.where(is_labeled[:, None], answers_l[jnp.minimum(i, n_l - 1)], flat_answers[j])
      inputs, targets = _sequences(prompts, answers)
      out = head.training_output(model, inputs, targets)
      loss = loss + jnp.mean(rule.positive(head, out, Answers(targets), s))
      largest = head.largest_logit(out)
    if rule.negative is not None:
      wrong = ~fb.right
      if ANSWER_SETS in rule.needs:
        has_wrong = jnp.any(wrong, -1)
        has = jnp.any(has_wrong)
        count = max(b // m, 1)
        i = jax.random.categorical(k_neg, jnp.where(has_wrong, 0.0, -jnp.inf), shape=(count,))
        prompts = jnp.broadcast_to(unlabeled[i][:, None], (count, m, unlabeled.shape[-1]))
        inputs, targets = _sequences(prompts, fb.answers[i])
        targets = jnp.where((wrong[i] & has)[..., None], targets, -1)
        flat_out = head.training_output(
          model, inputs.reshape(count * m, -1), targets.reshape(count * m, -1)
        )
        negative = rule.negative(head, _flat(flat_out, (count, m)), Answers(targets), s)
        largest = jnp.maximum(largest, head.largest_logit(flat_out))
      else:
        flat_wrong = wrong.reshape(-1)
        has = jnp.any(flat_wrong)
        i = jax.random.categorical(k_neg, jnp.where(flat_wrong, 0.0, -jnp.inf), shape=(b,))
        inputs, targets = _sequences(unlabeled[i // m], flat_answers[i])
        targets = jnp.where(has, targets, -1)  # none wrong: no token counts, the term is 0
        logp = fb.logp.reshape(-1, a)[i]
        before = jnp.zeros((b, targets.shape[-1] - a), logp.dtype)
        rate = jnp.where(has, jnp.mean(fb.right[i // m], -1), 0.0)
        batch = Answers(targets, None, jnp.sum(logp, -1), jnp.concatenate([before, logp], -1), rate)
        out = head.training_output(model, inputs, targets)
        negative = rule.negative(head, out, batch, s)
        largest = jnp.maximum(largest, head.largest_logit(out))
      loss = loss + jnp.where(has, jnp.mean(negative), 0.0)
    return loss, largest

  (loss, largest), grads = jax.value_and_grad(loss_fn, has_aux=True)(run.params)
  return training.apply_update(plan.optimizer, run, key, loss, grads, largest, s.logit_bound)


def _steps(plan: Plan, regimes, runs, feedback, length, labeled, unlabeled):
  steppers = [
    jax.vmap(
      functools.partial(_step, plan, regime), (0, 0, None, None), spmd_axis_name=parallel.RUNS
    )
    for regime in regimes
  ]

  def body(runs, _):
    return tuple(
      f(run, fb, labeled, unlabeled) for f, run, fb in zip(steppers, runs, feedback)
    ), None

  runs, _ = jax.lax.scan(body, runs, None, length=length)
  return runs


@functools.partial(jax.jit, static_argnames=("plan", "length"))
def _train(plan: Plan, runs, feedback, length: int, labeled, unlabeled):
  """``length`` steps of every run (one group per regime, over seeds)."""
  runs = _steps(plan, plan.settings.regimes, runs, feedback, length, labeled, unlabeled)
  return jax.lax.with_sharding_constraint(
    runs, jax.tree.map(lambda _: parallel.run_sharding(plan.mesh), runs)
  )


def _empty_feedback(plan: Plan, seeds: int) -> Feedback:
  n, m, a = plan.problems.unlabeled[0].shape[0], plan.settings.samples, plan.answer_length
  return Feedback(
    jnp.zeros((seeds, n, m, a), jnp.int32),
    jnp.zeros((seeds, n, m), bool),
    jnp.zeros((seeds, n, m, a), jnp.float32),
  )


def _init(plan: Plan, key) -> training.RunState:
  from jaxsoftmax_experiments.kinds import lm

  k_init, k_batch = jax.random.split(key)
  model = lm.build(plan.settings, plan.problems.vocab_size, k_init, plan.head.inner)
  return training.new_run(nnx.state(model, nnx.Param), plan.optimizer, k_batch)


def _exact(plan: Plan, params, prompts, answers):
  greedy = sample(plan, params, prompts, jax.random.key(0), 1, None)[:, 0]
  return jnp.mean(jnp.all(greedy == answers, -1))


@functools.partial(jax.jit, static_argnames=("plan",))
def _pretrain(plan: Plan, key, labeled, unlabeled, validation):
  """Every seed's start: trained on the labeled problems, validated every
  ``select_every`` steps (and at the last), the best kept."""
  s = plan.settings
  seeds = jax.random.split(key, s.num_seeds)
  runs = jax.vmap(functools.partial(_init, plan))(seeds)
  empty = _empty_feedback(plan, s.num_seeds)
  every = min(s.select_every, s.initial_steps)
  lengths = [every] * (s.initial_steps // every) + [s.initial_steps % every] * bool(
    s.initial_steps % every
  )

  def chunk(carry, length):
    run, best, best_score, best_step = carry
    (run,) = _steps(plan, ("labeled_only",), (run,), (empty,), length, labeled, unlabeled)
    score = jax.vmap(lambda p: _exact(plan, p, *validation))(run.params)
    better = score > best_score
    pick = lambda new, old: jnp.where(better.reshape(-1, *(1,) * (new.ndim - 1)), new, old)
    best = jax.tree.map(pick, run.params, best)
    return run, best, jnp.where(better, score, best_score), jnp.where(better, run.step, best_step)

  carry = (runs, runs.params, jnp.full(s.num_seeds, -1.0), jnp.zeros(s.num_seeds, jnp.int32))
  for length in dict.fromkeys(lengths):  # one scan per chunk length (at most two), in order
    count = lengths.count(length)
    carry, _ = jax.lax.scan(lambda c, _: (chunk(c, length), None), carry, None, length=count)
  runs, best, score, step = carry
  return best, Start(step, score), runs.key


@functools.partial(jax.jit, static_argnames=("plan",))
def _sample_round(plan: Plan, params, keys, prompts):
  s = plan.settings
  answers = jax.vmap(lambda p, k: sample(plan, p, prompts, k, s.samples, s.temperature))(
    params, keys
  )
  return jax.lax.with_sharding_constraint(answers, parallel.run_sharding(plan.mesh))


@functools.partial(jax.jit, static_argnames=("plan",))
def _logp(plan: Plan, params, prompts, answers):
  logp = jax.vmap(lambda p, a: token_logp(plan, p, prompts, a))(params, answers)
  return jax.lax.with_sharding_constraint(logp, parallel.run_sharding(plan.mesh))


def judged_round(plan: Plan, params, keys) -> Feedback:
  """``samples`` answers per unlabeled prompt from each seed's ``params``, judged, with
  their tokens' log-probabilities under the model that sampled them."""
  prompts, references = plan.problems.unlabeled
  answers = _sample_round(plan, params, keys, prompts)
  right = judge(plan.task, prompts, np.asarray(parallel.fetch(answers)), references)
  logp = _logp(plan, params, prompts, answers)
  return Feedback(answers, parallel.put(right, parallel.run_sharding(plan.mesh)), logp)


def start(plan: Plan) -> training.State:
  s, p = plan.settings, plan.problems
  params, chosen, keys = _pretrain(
    plan, jax.random.key(s.seed), p.labeled, p.unlabeled[0], p.validation
  )
  first = judged_round(plan, params, _fold(keys, 0))
  return _assemble(plan, params, keys, first, chosen)


@functools.partial(jax.jit, static_argnames=("plan",))
def _assemble(plan: Plan, params, keys, first: Feedback, chosen: Start) -> training.State:
  """The state at step 0: every regime's runs from the start, with round 0's answers."""
  new_run = jax.vmap(lambda params, key: training.new_run(params, plan.optimizer, key))
  runs = tuple(
    new_run(params, jax.vmap(lambda k, i=i: jax.random.fold_in(k, 1 + i))(keys))
    for i in range(len(plan.settings.regimes))
  )
  extra = (tuple(first for _ in plan.settings.regimes), chosen)
  return training.constrain(plan.mesh, training.State(runs, jnp.int32(0), extra))


@jax.jit
def _fold(keys, salt):
  """Each seed's key folded with ``salt`` (traced: one program for every round)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, salt))(keys)


def abstract_start(plan: Plan) -> training.State:
  """What ``start`` returns, built without training (for the checkpoint's template)."""
  s = plan.settings
  keys = jax.random.split(jax.random.key(s.seed), s.num_seeds)
  runs = tuple(jax.vmap(functools.partial(_init, plan))(keys) for _ in s.regimes)
  empty = _empty_feedback(plan, s.num_seeds)
  chosen = Start(jnp.zeros(s.num_seeds, jnp.int32), jnp.zeros(s.num_seeds, jnp.float32))
  return training.State(runs, jnp.int32(0), (tuple(empty for _ in s.regimes), chosen))


def run(plan: Plan, state: training.State | None = None):
  """Yields the state after every evaluation, the first at step 0; at the start of each
  round after the first, every regime's answers are sampled from its own model again."""
  s, p = plan.settings, plan.problems
  if state is None:
    state = start(plan)
  labeled = parallel.put(p.labeled, parallel.replicated(plan.mesh))
  unlabeled = parallel.put(p.unlabeled[0], parallel.replicated(plan.mesh))

  def advance(state, length):
    step, end = int(state.step), int(state.step) + length
    while step < end:
      feedback, chosen = state.extra
      if step > 0 and step % s.steps == 0:  # a new round: the models' own answers, judged
        feedback = tuple(judged_round(plan, run.params, _fold(run.key, step)) for run in state.runs)
      chunk = min(end, (step // s.steps + 1) * s.steps) - step
      runs = _train(plan, state.runs, feedback, chunk, labeled, unlabeled)
      step += chunk
      state = training.State(runs, state.step + chunk, (feedback, chosen))
    return state

  return training.evaluations(state, advance, s.steps * s.feedback_rounds, s.eval_every)


# --- evaluation ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("plan",))
def _evaluate(plan: Plan, params, key, prompts, references):
  """Greedy answers ``[seeds, n, A]``, ``eval_samples`` sampled ones ``[seeds, n, E, A]``
  and the reference answers' NLL ``[seeds, n]`` of one group of runs."""
  s = plan.settings

  def one(p):
    greedy = sample(plan, p, prompts, key, 1, None)[:, 0]
    sampled = sample(plan, p, prompts, jax.random.fold_in(key, 1), s.eval_samples, s.temperature)
    nll = -jnp.sum(token_logp(plan, p, prompts, references[:, None]), axis=(-2, -1))
    return greedy, sampled, nll

  return jax.vmap(one)(params)


def _diversity(answers: np.ndarray) -> tuple[float, float]:
  """The mean over prompts of the distinct answers among each prompt's samples, and of
  their empirical entropy (nats); ``answers [n, E, A]``."""
  distinct, entropy = [], []
  for row in answers:
    _, counts = np.unique(row, axis=0, return_counts=True)
    q = counts / counts.sum()
    distinct.append(len(counts))
    entropy.append(float(-np.sum(q * np.log(q))))
  return float(np.mean(distinct)), float(np.mean(entropy))


def round_of(plan: Plan, step: int) -> int:
  """The round whose answers a state at ``step`` trained on (0 at the start)."""
  return max(step - 1, 0) // plan.settings.steps


def records(plan: Plan, state: training.State) -> list[dict]:
  """One record per (regime, seed) at the state's step."""
  s, (prompts, references) = plan.settings, plan.problems.test
  step = int(state.step)
  key = jax.random.fold_in(jax.random.key(s.seed + 1), step)
  feedback, _ = state.extra
  out = []
  for regime, group, fb in zip(s.regimes, state.runs, feedback):
    greedy, sampled, nll = (
      np.asarray(x) for x in parallel.fetch(_evaluate(plan, group.params, key, prompts, references))
    )
    exact = judge(plan.task, prompts, greedy[:, :, None], references)[..., 0].mean(-1)
    right = judge(plan.task, prompts, sampled, references).sum(-1)  # [seeds, n]
    judged = np.asarray(parallel.fetch(fb.right))
    alive, at = (np.asarray(a) for a in parallel.fetch((group.alive, group.diverged_at)))
    for seed in range(s.num_seeds):
      distinct, entropy = _diversity(sampled[seed])
      r = {"step": step, "regime": regime, "seed": seed, "round": round_of(plan, step)}
      r["exact_match"] = float(exact[seed])
      for k in ks(s.eval_samples):
        r[f"pass@{k}"] = float(pass_at_k(s.eval_samples, right[seed], k).mean())
      r["distinct_answers"], r["answer_entropy"] = distinct, entropy
      mean_nll = float(nll[seed].mean())
      r["answer_nll"] = mean_nll if math.isfinite(mean_nll) else None
      r["judged_right"] = int(judged[seed].sum())
      r["judged_wrong"] = int(judged[seed].size - judged[seed].sum())
      r["diverged"] = not bool(alive[seed])
      r["diverged_at_step"] = None if alive[seed] else int(at[seed])
      out.append(r)
  return out


# --- outputs -------------------------------------------------------------------------------


def summarise(plan: Plan, state: training.State, records_: list[dict]) -> tuple[dict, str]:
  s, info = plan.settings, plan.info
  last = max(r["step"] for r in records_)
  final = [r for r in records_ if r["step"] == last]
  first = [r for r in records_ if r["step"] == 0 and r["regime"] == s.regimes[0]]
  chosen = state.extra[1]
  chosen_step = [int(x) for x in np.asarray(parallel.fetch(chosen.step))]
  chosen_exact = [float(x) for x in np.asarray(parallel.fetch(chosen.exact_match))]
  pass_keys = [f"pass@{k}" for k in ks(s.eval_samples)]
  cols = ["exact_match", *pass_keys, "distinct_answers", "answer_entropy", "answer_nll"]
  ends = [min(s.steps * (r + 1), last) for r in range(s.feedback_rounds) if s.steps * r < last]
  results: dict = {
    "config": None,
    "data": info,
    "start": {
      "chosen_at_step": chosen_step,
      "validation_exact_match": chosen_exact,
      **{k: [r[k] for r in first] for k in cols},
    },
    "regimes": {},
  }
  for regime in s.regimes:
    mine = [r for r in final if r["regime"] == regime]
    entry = {k: [r.get(k) for r in mine] for k in (*cols, "diverged", "diverged_at_step")}
    entry["exact_match_by_round"] = [
      [r["exact_match"] for r in records_ if r["regime"] == regime and r["step"] == end]
      for end in ends
    ]
    entry["judged"] = [
      [
        (r["judged_right"], r["judged_wrong"])
        for r in records_
        if r["regime"] == regime and r["step"] == end
      ]
      for end in ends
    ]
    results["regimes"][regime] = entry
  names = config_lib.LITERATURE_NAMES["feedback"]
  label = lambda regime: f"{regime} ({names[regime]})" if regime in names else regime
  lines = [
    f"# feedback on {plan.task.name}",
    "",
    f"TransformerLM (width {s.width}, depth {s.depth}, {s.heads} heads), vocabulary "
    f"{plan.problems.vocab_size}, {s.num_seeds} seeds; {info['labeled']} labeled problems, "
    f"{info['unlabeled']} unlabeled prompts x {s.samples} samples at temperature "
    f"{s.temperature:g} per round, {s.feedback_rounds} rounds of {s.steps} steps (batch "
    f"{s.batch_size} positives and {s.batch_size} negatives, Adam at {s.learning_rate:g}), "
    f"{s.head} head.",
    "",
    f"The start ({s.initial_steps} steps on the labeled problems, validated every "
    f"{min(s.select_every, s.initial_steps)}; chosen at steps "
    f"{', '.join(map(str, chosen_step))}, validation exact match "
    f"{report.mean_std(chosen_exact)}): test exact match "
    f"{report.mean_std(results['start']['exact_match'])}, "
    + ", ".join(f"{k} {report.mean_std(results['start'][k])}" for k in pass_keys)
    + ".",
    "",
    "| regime | " + " | ".join(c.replace("_", " ") for c in cols) + " | diverged |",
    "|---|" + "---|" * len(cols) + "---:|",
  ]
  for regime, e in results["regimes"].items():
    div = [x for x in e["diverged_at_step"] if x is not None]
    at = f" (step {min(div)})" if div else ""
    lines.append(
      f"| {label(regime)} | "
      + " | ".join(report.mean_std(e[k]) for k in cols)
      + f" | {len(div)}/{s.num_seeds}{at} |"
    )
  lines += [
    "",
    "Test exact match (greedy) at the end of each round, and the answers judged right / "
    "wrong that round (mean over seeds):",
    "",
    "| regime | start | "
    + " | ".join(f"round {i + 1}" for i in range(len(ends)))
    + " | "
    + " | ".join(f"judged round {i + 1}" for i in range(len(ends)))
    + " |",
    "|---|---|" + "---|" * (2 * len(ends)),
  ]
  for regime, e in results["regimes"].items():
    judged = [
      f"{np.mean([x[0] for x in j]):.0f} / {np.mean([x[1] for x in j]):.0f}" for j in e["judged"]
    ]
    lines.append(
      f"| {label(regime)} | {report.mean_std(results['start']['exact_match'])} | "
      + " | ".join(report.mean_std(x) for x in e["exact_match_by_round"])
      + " | "
      + " | ".join(judged)
      + " |"
    )
  lines += [
    "",
    "Mean ± sample standard deviation over seeds, on the test prompts at the last step. "
    f"pass@k: the unbiased estimator of Chen et al. 2021 from {s.eval_samples} samples per "
    "prompt at the sampling temperature; distinct answers and their entropy (nats) among "
    "those samples; answer NLL: the reference answer's, summed over its tokens. "
    + report.divergence_rule(s.logit_bound),
  ]
  return results, "\n".join(lines) + "\n"


def plot(plan: Plan, records_: list[dict], path) -> None:
  import io

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  s = plan.settings
  last = max(r["step"] for r in records_)
  steps = sorted({r["step"] for r in records_})
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
  k_values = ks(s.eval_samples)
  for i, regime in enumerate(s.regimes):
    colour = f"C{i % 10}"
    style = "-" if i < 10 else "--"
    curve = [
      np.mean([r["exact_match"] for r in records_ if r["regime"] == regime and r["step"] == t])
      for t in steps
    ]
    left.plot(steps, curve, style, color=colour, label=regime)
    final = [r for r in records_ if r["regime"] == regime and r["step"] == last]
    right.plot(
      k_values, [np.mean([r[f"pass@{k}"] for r in final]) for k in k_values], style, color=colour
    )
  for end in range(s.steps, last, s.steps):
    left.axvline(end, color="0.8", lw=0.8)
  left.set(xlabel="step (rounds at the grey lines)", ylabel="test exact match (greedy)")
  right.set(xlabel="k", ylabel=f"pass@k at step {last}", xscale="log")
  right.minorticks_off()
  right.set_xticks(k_values, [str(k) for k in k_values])
  handles, labels = left.get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.12, 1, 1))
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  report.write_atomic(path, buf.getvalue())
