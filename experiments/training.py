"""Pure training functions, built once from a frozen :class:`Setup` and jitted once.

A *run* is one (regime, seed) pair. Runs are grouped by regime: each group's
parameters, optimizer state, random key and divergence record are stacked on a leading
``[seeds]`` axis, and one compiled program steps every group, each through ``jax.vmap``
of the single-run :func:`step` with its own regime's loss only.

Divergence is recorded, not raised: a step whose loss or gradient is not finite, whose
largest training logit magnitude passes ``logit_bound`` or whose loss falls below
``-logit_bound`` (:func:`diverged_not`, the rule of every kind), marks its run as
diverged at that step and freezes it at its parameters (the step's update is
replaced by zero inside the parameter update itself, so freezing costs no extra pass
over the parameters or the optimizer state); every other run carries on.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxsoftmax.models import CNN, MLP
from jaxsoftmax_experiments import heads as heads_lib
from jaxsoftmax_experiments import parallel, protocols
from jaxsoftmax_experiments.regimes import REGIMES


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What builds a model: its kind, input shape, classes and layer sizes."""

  kind: str
  input_shape: tuple[int, ...]
  num_classes: int
  hidden: tuple[int, ...] = (100, 100)
  channels: tuple[int, ...] = (25, 25, 25)
  kernel_size: int = 0

  def build(self, head: heads_lib.Head, rngs: nnx.Rngs) -> nnx.Module:
    tree = heads_lib.tree_of(head)
    if self.kind == "mlp":
      return MLP(self.input_shape, self.num_classes, hidden=self.hidden, tree=tree, rngs=rngs)
    return CNN(
      self.input_shape,
      self.num_classes,
      channels=self.channels,
      kernel_size=self.kernel_size or None,
      tree=tree,
      rngs=rngs,
    )


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """Adam (AdamW when ``weight_decay > 0``) or SGD with momentum 0.9, on a schedule."""

  name: str = "adam"
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int = 0  # the cosine schedule's length; unused by the others

  def build(self) -> optax.GradientTransformation:
    lr = self.learning_rate
    if self.schedule == "cosine":
      lr = optax.warmup_cosine_decay_schedule(0.0, lr, self.warmup_steps, self.total_steps)
    elif self.warmup_steps:
      lr = optax.linear_schedule(0.0, lr, self.warmup_steps)
    if self.name == "adam":
      return optax.adamw(lr, weight_decay=self.weight_decay)
    return optax.chain(optax.add_decayed_weights(self.weight_decay), optax.sgd(lr, momentum=0.9))


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a set of runs: it keys the compiled programs."""

  model: ModelSpec
  head: heads_lib.Head
  optimizer: OptimizerSpec
  regimes: tuple[str, ...]  # one group of runs per regime, in this order
  seeds: int  # runs per group
  batch_size: int
  logit_bound: float
  mesh: Mesh
  transition_bias: float | None = None  # the protocol's T (uniform: 0), None if it has none
  npo_beta: float = 0.1

  def transition(self) -> jax.Array:
    """The protocol's transition matrix ``T[y, l]``, for regimes that need it."""
    if self.transition_bias is None:
      raise ValueError("this protocol has no transition matrix (uniform or biased have one).")
    return protocols.transition_matrix(self.model.num_classes, self.transition_bias)

  @functools.cached_property
  def graphdef(self) -> nnx.GraphDef:
    # nnx.eval_shape builds the model abstractly: no parameters are computed.
    model = nnx.eval_shape(lambda: self.model.build(self.head, nnx.Rngs(0)))
    return nnx.graphdef(model)


class RunState(NamedTuple):
  """One run's training state, in every kind; stacked on a leading ``[seeds]`` axis per
  group."""

  params: Any
  opt_state: Any
  key: jax.Array
  step: jax.Array  # int32, steps taken (frozen runs count on)
  alive: jax.Array  # bool, False once diverged
  diverged_at: jax.Array  # int32, the step that diverged, -1 if none


class State(NamedTuple):
  """Where a run of the language-model or multi-label kind stands after an evaluation:
  one :class:`RunState` group per regime (stacked over seeds), the step, and the kind's
  own per-run arrays (each ``[seeds, ...]``: a reference model's log-likelihoods, counts
  of steps). The classifier's :class:`jaxsoftmax_experiments.loop.State` holds more (its
  examples, metrics and notes) and keeps its layout, so that its checkpoints restore."""

  runs: tuple
  step: jax.Array  # int32: training steps done
  extra: Any


def state_shardings(mesh: Mesh, state: State) -> State:
  """Every leaf of a :class:`State`: per-run arrays over the mesh's runs axis, the step
  replicated."""
  runs = parallel.run_sharding(mesh)
  return State(
    jax.tree.map(lambda _: runs, state.runs),
    parallel.replicated(mesh),
    jax.tree.map(lambda _: runs, state.extra),
  )


def constrain(mesh: Mesh, state: State) -> State:
  """Pins a state to the checkpoint's shardings, so a restored one needs no new program."""
  return jax.lax.with_sharding_constraint(state, state_shardings(mesh, state))


def template(mesh: Mesh, start) -> State:
  """The abstract :class:`State` that ``start()`` returns: a checkpoint's shapes, dtypes
  and shardings, computed without running it."""
  state = jax.eval_shape(start)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    state,
    state_shardings(mesh, state),
  )


def evaluations(state: State, advance, total: int, every: int):
  """Yields ``state``, then ``advance(state, length)`` after every ``every`` steps up to
  ``total``: the loop of the kinds whose runs all advance together."""
  yield state
  done = int(state.step)
  while done < total:
    length = min(every, total - done)
    state = advance(state, length)
    done += length
    yield state


class StepStats(NamedTuple):
  loss: jax.Array  # the batch's mean training loss
  max_logit: jax.Array  # the batch's largest |logit|
  alive: jax.Array  # whether the run was alive before this step


def new_run(params, optimizer: optax.GradientTransformation, key: jax.Array) -> RunState:
  """A run of every kind before its first step: ``params``, the optimizer's fresh state
  and the key its batches are drawn from."""
  return RunState(params, optimizer.init(params), key, jnp.int32(0), jnp.bool_(True), jnp.int32(-1))


def init_one(setup: Setup, init_key: jax.Array, train_key: jax.Array) -> RunState:
  """A fresh run: parameters drawn from ``init_key``, batches from ``train_key``."""
  model = setup.model.build(setup.head, nnx.Rngs(init_key))
  return new_run(nnx.state(model, nnx.Param), setup.optimizer.build(), train_key)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def diverged_not(loss, grads, largest_logit, bound) -> jax.Array:
  """The divergence rule of every kind and head, as "this step is fine": the loss and
  every gradient are finite, the head's largest ``|logit|`` is at most ``bound``, and the
  loss is at least ``-bound``."""
  return jnp.isfinite(loss) & _all_finite(grads) & (largest_logit <= bound) & (loss >= -bound)


def apply_update(
  optimizer: optax.GradientTransformation,
  state: RunState,
  key: jax.Array,
  loss: jax.Array,
  grads,
  largest_logit: jax.Array,
  bound: float,
) -> RunState:
  """One optimizer step of a run of any kind, under the divergence rule
  (:func:`diverged_not`): a run whose step is not fine is marked diverged at that step
  and frozen at its parameters (its update is replaced by zero inside the parameter
  update itself, so freezing costs no extra pass over the parameters or the optimizer
  state); its optimizer state runs on, but is never used again."""
  ok = diverged_not(loss, grads, largest_logit, bound)
  keep = state.alive & ok
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = jax.tree.map(
    lambda p, u: p + jnp.where(keep, u, 0).astype(p.dtype), state.params, updates
  )
  return RunState(
    params,
    opt_state,
    key,
    state.step + 1,
    keep,
    jnp.where(state.alive & ~ok, state.step + 1, state.diverged_at),
  )


def example_losses(
  setup: Setup, regime: str, params, x: jax.Array, batch: protocols.Examples
) -> tuple[jax.Array, jax.Array]:
  """Per-example losses of ``regime`` on a batch (empty slots give 0), and its largest
  ``|logit|``."""
  rule = REGIMES[regime]
  model = nnx.merge(setup.graphdef, params)
  batch = batch._replace(label=jnp.where(batch.kind == protocols.EMPTY, 0, batch.label))
  out = setup.head.training_output(model, x, batch.label)
  per_example = jnp.where(
    batch.kind == protocols.POSITIVE, rule.positive(setup.head, out, batch, setup), 0.0
  )
  if rule.negative is not None:
    per_example = jnp.where(
      batch.kind == protocols.NEGATIVE, rule.negative(setup.head, out, batch, setup), per_example
    )
  return per_example, setup.head.largest_logit(out)


def step(
  setup: Setup, regime: str, state: RunState, examples: protocols.Examples, x_train: jax.Array
) -> tuple[RunState, StepStats]:
  """One optimizer step of one run, on a batch drawn from the examples its regime uses."""
  key, batch_key = jax.random.split(state.key)
  if REGIMES[regime].negative is None:
    usable = examples.kind == protocols.POSITIVE
  else:
    usable = examples.kind != protocols.EMPTY
  slots = jax.random.choice(
    batch_key, usable.shape[0], (setup.batch_size,), p=usable / jnp.sum(usable)
  )
  batch = jax.tree.map(lambda a: a[slots], examples)
  x = x_train[slots % x_train.shape[0]]
  # The batch is split over the mesh's batch axis (under vmap, runs over its runs axis).
  x, batch = jax.lax.with_sharding_constraint((x, batch), parallel.batch_sharding(setup.mesh))

  combine = REGIMES[regime].batch_objective

  def objective(params):
    per_example, max_logit = example_losses(setup, regime, params, x, batch)
    if combine is None:
      return jnp.mean(per_example), max_logit
    return combine(per_example, batch, setup), max_logit

  (loss, max_logit), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  new_state = apply_update(
    setup.optimizer.build(), state, key, loss, grads, max_logit, setup.logit_bound
  )
  return new_state, StepStats(loss, max_logit, state.alive)


def evaluate_one(setup: Setup, params, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  """Accuracy, mean NLL and largest ``|logit|`` on (x, y), and the parameters' L2 norm."""
  scores, nll, max_logit = setup.head.evaluation(nnx.merge(setup.graphdef, params), x, y)
  return {
    "test_accuracy": jnp.mean(jnp.argmax(scores, -1) == y),
    "test_nll": jnp.mean(nll),
    "test_max_logit": max_logit,
    "param_norm": optax.tree.norm(params),
  }


def predict_one(setup: Setup, params, x: jax.Array) -> jax.Array:
  model = nnx.merge(setup.graphdef, params)
  return jnp.argmax(setup.head.scores(model, x), -1).astype(jnp.int32)


def log_probs_one(setup: Setup, params, x: jax.Array) -> jax.Array:
  """``log p(k | x)`` of every class, ``[n, K]``."""
  return jax.nn.log_softmax(setup.head.scores(nnx.merge(setup.graphdef, params), x), axis=-1)


Groups = tuple  # one entry per regime of the setup, each stacked over seeds


class Functions(NamedTuple):
  """The jitted functions of a setup; every argument and result is a tuple of groups."""

  init: Any  # (init_keys [G, S], train_keys [G, S]) -> runs
  train: Any  # (runs, examples, x_train, length) -> (runs, stats [length, S] per group)
  evaluate: Any  # (runs, x, y) -> metrics per group
  predict: Any  # (runs, x) -> predictions [S, n] per group
  log_probs: Any  # (runs, x) -> log p [S, n, K] per group


@functools.lru_cache(maxsize=8)
def functions(setup: Setup) -> Functions:
  """Builds and jits :class:`Functions` once per setup."""
  runs = parallel.run_sharding(setup.mesh)
  vmap = lambda f, in_axes: jax.vmap(f, in_axes=in_axes, spmd_axis_name=parallel.RUNS)
  each = lambda f: tuple(f(i, regime) for i, regime in enumerate(setup.regimes))

  def init(init_keys, train_keys):
    return each(
      lambda i, _: vmap(functools.partial(init_one, setup), (0, 0))(init_keys[i], train_keys[i])
    )

  def train(state, examples, x_train, length):
    steppers = [
      vmap(functools.partial(step, setup, regime), (0, 0, None)) for regime in setup.regimes
    ]

    def body(state, _):
      out = [f(s, e, x_train) for f, s, e in zip(steppers, state, examples)]
      return tuple(o[0] for o in out), tuple(o[1] for o in out)

    return jax.lax.scan(body, state, None, length=length)

  def evaluate(state, x, y):
    return tuple(
      vmap(functools.partial(evaluate_one, setup), (0, None, None))(s.params, x, y) for s in state
    )

  def predict(state, x):
    return tuple(vmap(functools.partial(predict_one, setup), (0, None))(s.params, x) for s in state)

  def log_probs(state, x):
    return tuple(
      vmap(functools.partial(log_probs_one, setup), (0, None))(s.params, x) for s in state
    )

  return Functions(
    init=jax.jit(init, out_shardings=runs),
    train=jax.jit(
      train, static_argnames="length", out_shardings=(runs, parallel.steps_sharding(setup.mesh))
    ),
    evaluate=jax.jit(evaluate, out_shardings=runs),
    predict=jax.jit(predict, out_shardings=runs),
    log_probs=jax.jit(log_probs, out_shardings=runs),
  )


def make_setup(
  config,
  dataset,
  *,
  regimes: Sequence[str],
  total_steps: int,
  devices: Sequence[jax.Device] | None = None,
) -> Setup:
  """The setup of ``regimes`` x ``config.num_seeds`` runs of a config on a dataset."""
  head = heads_lib.make_head(
    config.head,
    dataset.num_classes,
    config.num_clusters,
    tree=config.tree,
    branching=config.branching,
    frequencies=np.bincount(np.asarray(dataset.y_train), minlength=dataset.num_classes),
  )
  model = ModelSpec(
    config.model,
    tuple(dataset.input_shape),
    dataset.num_classes,
    tuple(config.hidden),
    tuple(config.channels),
    config.kernel_size,
  )
  cosine = config.schedule == "cosine"
  optimizer = OptimizerSpec(
    config.optimizer,
    float(config.learning_rate),
    float(config.weight_decay),
    config.schedule,
    config.warmup_steps,
    total_steps if cosine else 0,
  )
  mesh = parallel.make_mesh(config.num_seeds, config.batch_size, devices)
  bias = {"uniform": 0.0, "biased": float(config.bias)}.get(config.protocol)
  return Setup(
    model,
    head,
    optimizer,
    tuple(regimes),
    config.num_seeds,
    config.batch_size,
    float(config.logit_bound),
    mesh,
    bias,
    float(config.npo_beta),
  )
