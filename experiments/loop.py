"""The experiment as one state and one loop.

:class:`State` holds everything needed to carry on: every run's parameters and
optimizer state (grouped by regime), the examples table, the step, the latest metrics,
each run's best test accuracy so far and the protocol's notes. It is one pytree of
arrays, checkpointed whole; the results come from it alone.

:func:`run` yields the state after every evaluation, the first one before any
training. The caller logs, checkpoints and decides whether to go on; resuming is
passing a yielded state back in. A resumed run takes the same steps, with the same
random keys, as one that was never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import parallel, protocols, training
from jaxsoftmax_experiments import regimes as regimes_lib
from jaxsoftmax_experiments.data import Dataset

METRICS = ("test_accuracy", "test_nll", "test_max_logit", "param_norm", "train_loss", "max_logit")


class State(NamedTuple):
  """Where an experiment stands after an evaluation; the tuples hold one entry per regime
  group, each stacked over seeds."""

  runs: tuple  # training.RunState per regime, stacked over seeds
  examples: tuple  # protocols.Examples per regime, [seeds, rounds * n]
  step: jax.Array  # int32: training steps done, over all rounds
  evaluations: jax.Array  # int32: evaluations done (the first is at step 0)
  metrics: tuple  # per regime: {name in METRICS: float32 [seeds]}
  best_accuracy: tuple  # per regime: float32 [seeds], best test accuracy so far
  notes: dict  # protocol notes, e.g. the initial model's test accuracy
  reference: jax.Array | None = None  # [seeds, n, K] log p of the reference model (npo)


class Data(NamedTuple):
  """The dataset's arrays on the mesh's devices, replicated."""

  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Plan:
  """What a config asks for, resolved once: its setups and its data on the devices."""

  config: ml_collections.ConfigDict
  dataset: Dataset
  setup: training.Setup  # the experiment's runs
  initial: training.Setup | None  # the model of the labeled inputs alone (feedback, npo)
  data: Data

  @property
  def total_steps(self) -> int:
    return self.config.steps * self.config.feedback_rounds

  def chunks(self, done: int) -> Iterator[int]:
    """Chunk lengths from ``done`` that end at every evaluation and round boundary."""
    steps, every = self.config.steps, self.config.eval_every
    while done < self.total_steps:
      within = done % steps
      length = min(every - within % every, steps - within)
      done += length
      yield length


def make_plan(config, dataset: Dataset, devices: Sequence[jax.Device] | None = None) -> Plan:
  """The plan of a validated config on a dataset, over ``devices`` (default: all)."""
  total_steps = config.steps * config.feedback_rounds
  setup = training.make_setup(
    config, dataset, regimes=tuple(config.regimes), total_steps=total_steps, devices=devices
  )
  initial = None
  if config.protocol == "feedback" or needs_reference(config):
    initial = training.make_setup(
      config, dataset, regimes=("positive_only",), total_steps=config.initial_steps, devices=devices
    )
  arrays = (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test)
  data = Data(*parallel.put(arrays, parallel.replicated(setup.mesh)))
  return Plan(config, dataset, setup, initial, data)


def needs_reference(config) -> bool:
  """Whether a regime of the config trains against a reference model (npo)."""
  return any(regimes_lib.REFERENCE in regimes_lib.REGIMES[r].needs for r in config.regimes)


def round_of(config, step: int) -> int:
  """The feedback round a step belongs to (0: before any training)."""
  return 0 if step == 0 else (step - 1) // config.steps + 1


@functools.partial(jax.jit, static_argnums=(0, 1))
def _seed_keys(seed: int, num_seeds: int) -> dict[str, jax.Array]:
  """Per-seed keys, each ``[num_seeds]``: labeled-set draw, protocol, init, batches."""
  root = jax.random.key(seed)
  keys = jax.vmap(lambda s: jax.random.split(jax.random.fold_in(root, s), 4))(jnp.arange(num_seeds))
  return dict(zip(("labeled", "protocol", "init", "batches"), keys.T))


@functools.partial(jax.jit, static_argnames=("plan",))
def _first_examples(plan: Plan, keys, data: Data):
  """The protocol's examples of every seed, ``[seeds, rounds * n]``, and notes on them.

  The feedback protocol trains a model per seed on its labeled inputs alone (its own
  setup: one ``positive_only`` group and an ``initial_steps`` schedule), and the judge
  marks that model's predictions on the training inputs.
  """
  c, y = plan.config, data.y_train
  labeled = jax.vmap(protocols.labeled_mask, (0, None, None))(
    keys["labeled"], y.shape[0], c.num_labeled
  )
  ys = jnp.broadcast_to(y, labeled.shape)
  if c.protocol == "supervised":
    examples = protocols.supervised(ys, c.feedback_rounds)
  elif c.protocol in ("uniform", "biased"):
    bias = c.bias if c.protocol == "biased" else 0.0
    draw = lambda key, lab: protocols.complementary(
      key,
      y,
      lab,
      plan.dataset.num_classes,
      bias=bias,
      rounds=c.feedback_rounds,
      num_negatives=c.num_negatives,
    )
    examples = jax.vmap(draw)(keys["protocol"], labeled)
  else:
    examples = protocols.labeled_only(ys, labeled, c.feedback_rounds)
    if config_lib.sets_across_rounds(c):
      examples = protocols.with_sets(examples, c.feedback_rounds - 1)
  notes, reference = {}, None
  if plan.initial is not None:
    # The model trained on the labeled inputs alone: it makes the judged predictions of
    # the feedback protocol and is the frozen reference of npo.
    fns = training.functions(plan.initial)
    runs = fns.init(keys["init"][None], keys["batches"][None])
    alone = protocols.labeled_only(ys, labeled, c.feedback_rounds)
    runs, _ = fns.train(runs, (alone,), data.x_train, length=c.initial_steps)
    accuracy = fns.evaluate(runs, data.x_test, data.y_test)[0]["test_accuracy"]
    if c.protocol == "feedback":
      examples = protocols.judge(examples, fns.predict(runs, data.x_train)[0], y, 0)
    name = "initial" if c.protocol == "feedback" else "reference"
    notes[f"{name}_model_test_accuracy"] = accuracy
    if needs_reference(c):
      reference = fns.log_probs(runs, data.x_train)[0]
      examples = protocols.with_reference(examples, reference)
  return examples, notes, reference


def _evaluated(fns, state: State, x_test, y_test, stats) -> State:
  """``state`` with a new evaluation: metrics, best accuracy, and the count."""
  metrics, best = [], []
  for i, (group, evaluation) in enumerate(
    zip(state.runs, fns.evaluate(state.runs, x_test, y_test))
  ):
    m = dict(evaluation)
    if stats is None:
      m["train_loss"] = jnp.full_like(m["test_nll"], jnp.nan)
      m["max_logit"] = jnp.full_like(m["test_nll"], jnp.nan)
    else:
      alive = stats[i].alive
      live = alive.sum(0)
      total = jnp.where(alive, stats[i].loss, 0.0).sum(0)
      m["train_loss"] = jnp.where(live > 0, total / jnp.maximum(live, 1), jnp.nan)
      m["max_logit"] = jnp.where(
        live > 0, jnp.where(alive, stats[i].max_logit, -jnp.inf).max(0), jnp.nan
      )
    metrics.append(m)
    best.append(
      m["test_accuracy"]
      if stats is None
      else jnp.maximum(state.best_accuracy[i], m["test_accuracy"])
    )
  return state._replace(
    metrics=tuple(metrics), best_accuracy=tuple(best), evaluations=state.evaluations + 1
  )


@functools.partial(jax.jit, static_argnames=("plan",))
def _start(plan: Plan, keys, data: Data) -> State:
  examples, notes, reference = _first_examples(plan, keys, data)
  fns = training.functions(plan.setup)
  groups = len(plan.setup.regimes)
  tile = lambda a: jnp.stack([a] * groups)
  runs = fns.init(tile(keys["init"]), tile(keys["batches"]))
  state = State(runs, (examples,) * groups, jnp.int32(0), jnp.int32(0), (), (), notes, reference)
  return _constrain(plan, _evaluated(fns, state, data.x_test, data.y_test, None))


@functools.partial(jax.jit, static_argnames=("plan", "length"))
def _advance(plan: Plan, state: State, data: Data, length: int) -> State:
  fns = training.functions(plan.setup)
  runs, stats = fns.train(state.runs, state.examples, data.x_train, length=length)
  state = state._replace(runs=runs, step=state.step + length)
  return _constrain(plan, _evaluated(fns, state, data.x_test, data.y_test, stats))


@functools.partial(jax.jit, static_argnames=("plan", "round_"))
def _next_round(plan: Plan, state: State, data: Data, round_: int) -> State:
  predictions = training.functions(plan.setup).predict(state.runs, data.x_train)
  examples = tuple(
    protocols.judge(e, p, data.y_train, round_) for e, p in zip(state.examples, predictions)
  )
  if state.reference is not None:
    examples = tuple(protocols.with_reference(e, state.reference) for e in examples)
  return _constrain(plan, state._replace(examples=examples))


def start(plan: Plan) -> State:
  """The state before any training: examples drawn, runs initialised, evaluated once."""
  return _start(plan, _seed_keys(plan.config.seed, plan.config.num_seeds), plan.data)


def run(plan: Plan, state: State | None = None) -> Iterator[State]:
  """Yields the state after every evaluation: first the one ``state`` holds (or a new
  one at step 0), then one per ``eval_every`` steps, up to the last step."""
  if state is None:
    state = start(plan)
  yield state
  done = int(state.step)
  for length in plan.chunks(done):
    if done > 0 and done % plan.config.steps == 0:  # a new feedback round starts
      state = _next_round(plan, state, plan.data, done // plan.config.steps)
    state = _advance(plan, state, plan.data, length)
    done += length
    yield state


_PER_RUN = ("runs", "examples", "metrics", "best_accuracy", "reference")


def _shardings(plan: Plan, state):
  """The sharding of every leaf of a state: per-run fields over the mesh's runs axis."""
  runs = parallel.run_sharding(plan.setup.mesh)
  replicated = parallel.replicated(plan.setup.mesh)
  return jax.tree_util.tree_map_with_path(
    lambda path, _: runs if path[0].name in _PER_RUN else replicated, state
  )


def _constrain(plan: Plan, state: State) -> State:
  """Pins a state to the checkpoint's shardings, so a restored one needs no new program."""
  return jax.lax.with_sharding_constraint(state, _shardings(plan, state))


def template(plan: Plan) -> State:
  """A :class:`State` of abstract arrays with a checkpoint's shapes, dtypes and shardings."""
  state = jax.eval_shape(lambda: start(plan))
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, _shardings(plan, state)
  )


def light(state: State, examples: bool = False) -> State:
  """The state without parameters, optimizer states and keys (and without the examples
  unless asked): what :func:`records` and :func:`results` read, cheap to fetch."""
  runs = tuple(g._replace(params=None, opt_state=None, key=None) for g in state.runs)
  return state._replace(runs=runs, examples=state.examples if examples else None)


def _float(x) -> float | None:
  """A JSON-safe float: None for NaN and infinities (divergence is recorded elsewhere)."""
  x = float(x)
  return x if math.isfinite(x) else None


def records(plan: Plan, host: State) -> list[dict[str, Any]]:
  """The ``metrics.jsonl`` lines of the evaluation ``host`` (a fetched state) holds:
  one per (regime, seed), regime-major."""
  step = int(host.step)
  out = []
  for regime, group, metrics in zip(plan.setup.regimes, host.runs, host.metrics):
    for seed in range(plan.setup.seeds):
      record = {"round": round_of(plan.config, step), "step": step, "regime": regime, "seed": seed}
      record.update({k: _float(metrics[k][seed]) for k in METRICS})
      alive = bool(group.alive[seed])
      record["diverged"] = not alive
      record["diverged_at_step"] = None if alive else int(group.diverged_at[seed])
      out.append(record)
  return out


def results(plan: Plan, host: State) -> dict[str, Any]:
  """The final evaluation of every run, from a fetched final state, for ``results.json``."""
  regimes: dict[str, Any] = {}
  lines = records(plan, host)
  seeds = plan.setup.seeds
  for i, regime in enumerate(plan.setup.regimes):
    mine = lines[i * seeds : (i + 1) * seeds]
    columns = {
      key: [r[key] for r in mine]
      for key in (
        "test_accuracy",
        "test_nll",
        "train_loss",
        "max_logit",
        "param_norm",
        "diverged",
        "diverged_at_step",
      )
    }
    columns["best_test_accuracy"] = [_float(v) for v in host.best_accuracy[i]]
    positives, negatives = (
      np.sum(np.asarray(host.examples[i].kind) == k, axis=-1)
      for k in (protocols.POSITIVE, protocols.NEGATIVE)
    )
    columns["num_positive"] = [int(c) for c in positives]
    columns["num_negative"] = [int(c) for c in negatives]
    regimes[regime] = columns
  out: dict[str, Any] = {
    "regimes": regimes,
    "num_train": len(plan.dataset.y_train),
    "num_test": len(plan.dataset.y_test),
    "num_devices": plan.setup.mesh.size,
  }
  out.update({k: [_float(v) for v in np.asarray(a)] for k, a in host.notes.items()})
  return out
