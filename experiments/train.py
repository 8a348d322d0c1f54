"""Training many runs at once: one jitted step, vmapped over stacked model states.

A *run* is one (regime, seed) pair. Its parameters, optimizer state, random key and
divergence record are stacked with every other run's on a leading axis, and
``jax.vmap`` turns the single-run :meth:`Trainer.step` into one compiled program for
all of them; :meth:`Trainer.train` scans ``eval_every`` such steps per call.

Divergence is recorded, not raised: a step whose loss or new parameters are not
finite, or whose largest training logit magnitude passes ``config.logit_bound``,
marks its run as diverged at that step and freezes it at its last parameters, while
every other run carries on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from experiments import config as config_lib
from experiments import parallel, protocols
from experiments.data import Dataset
from jaxsoftmax import losses
from jaxsoftmax.models import CNN, MLP
from jaxsoftmax.tree import ClassTree, balanced_tree

POSITIVE_ONLY, NEGATED_GRADIENT, COMPLEMENT_LIKELIHOOD = range(3)
REGIME_IDS = dict(zip(config_lib.REGIMES, range(3)))


def make_tree(config: ml_collections.ConfigDict, dataset: Dataset) -> ClassTree | None:
  """The balanced class tree of a hierarchical head; None for a softmax head."""
  if config.head != "hierarchical":
    return None
  return balanced_tree(dataset.num_classes, config.num_clusters or None)


def make_model(config: ml_collections.ConfigDict, dataset: Dataset, rngs: nnx.Rngs) -> nnx.Module:
  """The config's model and head for the dataset's input shape and classes."""
  tree = make_tree(config, dataset)
  if config.model == "mlp":
    return MLP(dataset.input_shape, dataset.num_classes, hidden=tuple(config.hidden),
               tree=tree, rngs=rngs)
  return CNN(dataset.input_shape, dataset.num_classes, channels=tuple(config.channels),
             kernel_size=config.kernel_size or None, tree=tree, rngs=rngs)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Adam (AdamW when ``weight_decay > 0``) or SGD with momentum 0.9, on the config's schedule."""
  lr = config.learning_rate
  if config.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, lr, config.warmup_steps, total_steps)
  elif config.warmup_steps:
    lr = optax.linear_schedule(0.0, lr, config.warmup_steps)
  if config.optimizer == "adam":
    return optax.adamw(lr, weight_decay=config.weight_decay)
  return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.sgd(lr, momentum=0.9))


def _by_regime(kind, regime, positive, negated, complement):
  negative = jnp.where(regime == NEGATED_GRADIENT, negated, complement)
  negative = jnp.where(regime == POSITIVE_ONLY, 0.0, negative)
  return jnp.where(kind == protocols.POSITIVE, positive,
                   jnp.where(kind == protocols.NEGATIVE, negative, 0.0))


def _labels(examples: protocols.Examples) -> jax.Array:
  return jnp.where(examples.kind == protocols.EMPTY, 0, examples.label)


def example_losses(logits: jax.Array, examples: protocols.Examples, regime: jax.Array) -> jax.Array:
  """The per-example training loss of a regime; empty slots give 0.

  Positives get ``nll``; negatives get nothing (``positive_only``), ``negated_nll``
  (``negated_gradient``) or ``complement_nll`` (``complement_likelihood``).
  """
  label = _labels(examples)
  return _by_regime(examples.kind, regime, losses.nll(logits, label),
                    losses.negated_nll(logits, label), losses.complement_nll(logits, label))


def hierarchical_example_losses(cluster_logits: jax.Array, rows: jax.Array,
                                examples: protocols.Examples, regime: jax.Array,
                                tree: ClassTree) -> jax.Array:
  """:func:`example_losses` through a class tree, from the labels' cluster rows.

  Positives get ``hierarchical_nll``; negatives nothing, its negation, or
  ``hierarchical_complement_nll``.
  """
  label = _labels(examples)
  nll = losses.hierarchical_nll(cluster_logits, rows, label, tree)
  return _by_regime(examples.kind, regime, nll, -nll,
                    losses.hierarchical_complement_nll(cluster_logits, rows, label, tree))


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class RunState(NamedTuple):
  """One run's training state; stacked on a leading axis for many runs."""
  params: Any
  opt_state: Any
  key: jax.Array
  step: jax.Array          # int32, steps taken (frozen runs count on)
  alive: jax.Array         # bool, False once diverged
  diverged_at: jax.Array   # int32, the step that diverged, -1 if none


class StepStats(NamedTuple):
  loss: jax.Array          # the batch's mean training loss
  max_logit: jax.Array     # the batch's largest |logit|
  alive: jax.Array         # whether the run was alive before this step


class Trainer:
  """The model, optimizer and data of one experiment, and its jitted functions.

  Stacked runs are split over the mesh's ``runs`` axis and each run's batch over its
  ``batch`` axis (:mod:`experiments.parallel`); the data are replicated.

  Args:
    config: a validated experiment config.
    dataset: the data; its splits are put on the mesh's devices once.
    total_steps: the length of the learning-rate schedule.
    mesh: a ``(runs, batch)`` mesh from :func:`experiments.parallel.make_mesh`, whose
      ``runs`` size divides the number of stacked runs; by default one device.
  """

  def __init__(self, config: ml_collections.ConfigDict, dataset: Dataset, total_steps: int,
               mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.dataset = dataset
    self.mesh = mesh or parallel.make_mesh(1, 1, jax.devices()[:1])
    self.runs = parallel.run_sharding(self.mesh)
    self.optimizer = make_optimizer(config, total_steps)
    self.graphdef = nnx.graphdef(make_model(config, dataset, nnx.Rngs(0)))
    self.tree = make_tree(config, dataset)
    put = lambda a: parallel.put(jnp.asarray(a), parallel.replicated(self.mesh))
    self.x_train, self.x_test, self.y_test = put(dataset.x_train), put(dataset.x_test), put(dataset.y_test)
    vmap = lambda f, in_axes: jax.vmap(f, in_axes=in_axes, spmd_axis_name=parallel.RUNS)
    self.batch_step = jax.jit(vmap(self.step, (0, 0, 0, None)))
    self._init = jax.jit(vmap(self.init_one, (0, 0)), out_shardings=self.runs)
    self._train = jax.jit(self.train_steps, static_argnames="length",
                          out_shardings=(self.runs, parallel.steps_sharding(self.mesh)))
    self.evaluate = jax.jit(vmap(self.evaluate_one, (0, None, None)), out_shardings=self.runs)
    self.predict = jax.jit(vmap(self.predict_one, (0, None)), out_shardings=self.runs)

  def shard(self, tree):
    """Puts arrays with a leading runs axis (state, examples, regimes) on the mesh."""
    return parallel.put(tree, self.runs)

  def init_one(self, init_key: jax.Array, train_key: jax.Array) -> RunState:
    """A fresh state: parameters drawn from ``init_key``, batches from ``train_key``."""
    params = nnx.state(make_model(self.config, self.dataset, nnx.Rngs(init_key)), nnx.Param)
    return RunState(params, self.optimizer.init(params), train_key, jnp.int32(0),
                    jnp.bool_(True), jnp.int32(-1))

  def init(self, init_keys: jax.Array, train_keys: jax.Array) -> RunState:
    """:meth:`init_one` for every pair of keys, stacked and split over the mesh."""
    return self._init(*self.shard((init_keys, train_keys)))

  def logits(self, params, x: jax.Array):
    """The model's output: logits, or ``(cluster_logits, within_logits)`` for a hierarchical head."""
    return nnx.merge(self.graphdef, params)(x)

  def _valid_max(self, cluster_logits, within, cluster=None):
    """The largest |logit| of a hierarchical head, padding slots left out."""
    sizes = jnp.asarray(self.tree.sizes)
    sizes = sizes[cluster] if cluster is not None else sizes
    valid = jnp.arange(self.tree.max_size) < sizes[..., None]
    return jnp.maximum(jnp.max(jnp.abs(cluster_logits)),
                       jnp.max(jnp.where(valid, jnp.abs(within), 0.0)))

  def training_losses(self, params, x: jax.Array, batch: protocols.Examples,
                      regime: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example regime losses of a batch, and its largest |logit|.

    A hierarchical head computes only the labels' cluster rows.
    """
    model = nnx.merge(self.graphdef, params)
    if self.tree is None:
      logits = model(x)
      return example_losses(logits, batch, regime), jnp.max(jnp.abs(logits))
    label = _labels(batch)
    cluster_logits, rows = model.head.target_logits(model.features(x), label)
    per_example = hierarchical_example_losses(cluster_logits, rows, batch, regime, self.tree)
    cluster = jnp.asarray(self.tree.cluster_of)[label]
    return per_example, self._valid_max(cluster_logits, rows, cluster)

  def _scores(self, out) -> jax.Array:
    """Per-class scores whose argmax is the prediction: the logits, or the tree's log p."""
    return out if self.tree is None else losses.hierarchical_log_softmax(*out, self.tree)

  def outputs(self, params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Class scores whose argmax is the prediction, the NLL of ``y``, the largest |logit|."""
    out = self.logits(params, x)
    if self.tree is None:
      return out, losses.nll(out, y), jnp.max(jnp.abs(out))
    return self._scores(out), losses.hierarchical_nll(*out, y, self.tree), self._valid_max(*out)

  def step(self, state: RunState, examples: protocols.Examples, regime: jax.Array,
           x_train: jax.Array) -> tuple[RunState, StepStats]:
    """One optimizer step of one run, on a batch drawn from its usable examples."""
    key, batch_key = jax.random.split(state.key)
    usable = jnp.where(regime == POSITIVE_ONLY, examples.kind == protocols.POSITIVE,
                       examples.kind != protocols.EMPTY)
    p = usable / jnp.sum(usable)
    slots = jax.random.choice(batch_key, p.shape[0], (self.config.batch_size,), p=p)
    batch = jax.tree.map(lambda a: a[slots], examples)
    x = x_train[slots % x_train.shape[0]]
    # The batch is split over the mesh's batch axis (under vmap, runs over its runs axis).
    x, batch = jax.lax.with_sharding_constraint((x, batch), parallel.batch_sharding(self.mesh))

    def objective(params):
      per_example, max_logit = self.training_losses(params, x, batch, regime)
      return jnp.mean(per_example), max_logit

    (loss, max_logit), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = (jnp.isfinite(loss) & _all_finite(params)
          & (max_logit <= self.config.logit_bound))
    keep = state.alive & ok
    step = state.step + 1
    new_state = RunState(
        params=_select(keep, params, state.params),
        opt_state=_select(keep, opt_state, state.opt_state),
        key=key, step=step, alive=keep,
        diverged_at=jnp.where(state.alive & ~ok, step, state.diverged_at))
    return new_state, StepStats(loss, max_logit, state.alive)

  def train_steps(self, state: RunState, examples: protocols.Examples, regimes: jax.Array,
                  x_train: jax.Array, length: int) -> tuple[RunState, StepStats]:
    """``length`` vmapped steps of every run under ``lax.scan``; pure, for ``jax.jit``."""
    def body(state, _):
      return self.batch_step(state, examples, regimes, x_train)
    return jax.lax.scan(body, state, None, length=length)

  def train(self, state: RunState, examples: protocols.Examples, regimes: jax.Array,
            length: int) -> tuple[RunState, StepStats]:
    """``length`` steps of every run in one compiled scan; stats are ``[length, runs]``."""
    return self._train(state, *self.shard((examples, regimes)), self.x_train, length=length)

  def evaluate_one(self, params, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """Accuracy, mean NLL and largest |logit| on (x, y), and the parameters' L2 norm."""
    scores, nll, max_logit = self.outputs(params, x, y)
    return {
        "test_accuracy": jnp.mean(jnp.argmax(scores, -1) == y),
        "test_nll": jnp.mean(nll),
        "test_max_logit": max_logit,
        "param_norm": optax.tree.norm(params),
    }

  def test_metrics(self, state: RunState) -> dict[str, jax.Array]:
    """:meth:`evaluate_one` on the test split for every run, each ``[runs]``."""
    return self.evaluate(state.params, self.x_test, self.y_test)

  def predict_one(self, params, x: jax.Array) -> jax.Array:
    return jnp.argmax(self._scores(self.logits(params, x)), -1).astype(jnp.int32)

  def train_predictions(self, state: RunState) -> jax.Array:
    """Every run's predicted class for every training input, ``[runs, n]``."""
    return self.predict(state.params, self.x_train)

