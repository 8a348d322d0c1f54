"""Several true labels per example: softmax with targets ``Y/|Y|`` against sigmoid
cross-entropy, and what the ``(1 - y) log(1 - p)`` terms and probability clipping do::

    jaxsoftmax-run --config=multilabel_canvases --workdir=runs/multilabel_canvases
    jaxsoftmax-run --config=multilabel_generated --workdir=runs/multilabel_generated
    jaxsoftmax-run --config=multilabel_canvases --config.dataset=npz:mine.npz --workdir=runs/mine
    python -m experiments.benchmarks.multilabel_figure runs/multilabel_gradients.png

The kind ``multilabel`` of the framework (:mod:`jaxsoftmax_experiments.kinds`). Every
objective of :data:`OBJECTIVES` named in ``config.regimes`` x ``config.num_seeds`` seeds
trains an MLP at once: one compiled program, the runs grouped by objective and
``jax.vmap``-ed over seeds, Adam, batches drawn with replacement. The state, the loop, the
optimizer step and its divergence rule (:mod:`jaxsoftmax_experiments.training`), the
workdir, its metrics log, checkpoints and resume are the framework's; a step's largest
``|logit|`` is read on the logits.

Data (offline, fixed splits; ``x`` standardised with the training split's statistics):

- ``generated``: scikit-learn's ``make_multilabel_classification`` (3000 examples, 20
  features, 10 classes, 3 labels on average, no unlabeled example, ``random_state=0``),
  split 2000 / 500 / 500 for training, validation and test.
- ``canvases``: 8 x 32 canvases of two to four of scikit-learn's 8 x 8 digits side by
  side, labelled with the set of digits shown. The first digit's class decides how many
  are drawn: two for classes 0-4, four for 5-9 (the rest drawn uniformly, blank where
  fewer than four), so the number of labels depends on which labels occur. Training
  and validation canvases use the training images, test canvases the test images
  (the digits split of :mod:`jaxsoftmax_experiments.data`).
- ``npz:PATH``: ``x_train``, ``y_train``, ``x_val``, ``y_val``, ``x_test``, ``y_test``,
  with each ``y`` a 0/1 (or boolean) ``[n, K]`` label mask.

An example with no true label has no ``Y/|Y|`` target: the softmax objectives give it
weight 0 (``multilabel_softmax_cross_entropy`` is undefined there), the sigmoid one
trains on it as all-negative, and the summary counts them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxsoftmax.models import MLP
from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import parallel, report, training
from jaxsoftmax_experiments import regimes as regimes_lib
from jaxsoftmax_experiments.data import DataError, check_inputs, digits, standardise
from jaxsoftmax_experiments.report import mean_std

CLIP = regimes_lib.CLIP  # Keras's epsilon: probabilities clipped to [1e-7, 1 - 1e-7]


class MultiLabelError(DataError):
  """A label mask or data file that cannot be used; the message names the problem."""


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity
class Data:
  name: str
  x_train: np.ndarray
  y_train: np.ndarray  # bool [n, K]
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def num_classes(self) -> int:
    return self.y_train.shape[1]


def check_labels(y, x, name: str) -> np.ndarray:
  """A bool ``[n, K]`` label mask from a 0/1 or boolean array with one row per input."""
  y = np.asarray(y)
  if y.ndim != 2 or y.shape[0] != len(x):
    raise MultiLabelError(
      f"{name}: a label mask must be [n, K] with n = {len(x)} inputs, got shape {y.shape}."
    )
  if y.shape[1] == 0:
    raise MultiLabelError(f"{name}: a label mask needs at least one class, got shape {y.shape}.")
  if y.dtype != np.bool_:
    if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
      bad = y[~np.isin(y, (0, 1))] if np.issubdtype(y.dtype, np.number) else y.dtype
      raise MultiLabelError(
        f"{name}: a label mask must be binary (0/1 or bool), found {np.ravel(bad)[:3]}."
      )
    y = y.astype(bool)
  return y


def _generated() -> Data:
  from sklearn.datasets import make_multilabel_classification

  x, y = make_multilabel_classification(
    n_samples=3000, n_features=20, n_classes=10, n_labels=3, allow_unlabeled=False, random_state=0
  )
  xs = standardise(x[:2000], x[2000:2500], x[2500:])
  ys = [y[:2000], y[2000:2500], y[2500:]]
  return Data(
    "generated", xs[0], ys[0].astype(bool), xs[1], ys[1].astype(bool), xs[2], ys[2].astype(bool)
  )


def canvases(images: np.ndarray, classes: np.ndarray, n: int, seed: int):
  """``n`` canvases ``[n, 8, 32]`` and their label masks ``[n, 10]``: the first digit's class
  c draws ``2 if c < 5 else 4`` images; the others' classes are uniform."""
  rng = np.random.default_rng(seed)
  by_class = [np.flatnonzero(classes == c) for c in range(10)]
  x = np.zeros((n, 8, 32), np.float32)
  y = np.zeros((n, 10), bool)
  for i in range(n):
    first = rng.integers(10)
    count = 2 if first < 5 else 4
    shown = [first, *rng.integers(0, 10, count - 1)]
    for slot, c in enumerate(shown):
      x[i, :, 8 * slot : 8 * slot + 8] = images[rng.choice(by_class[c])]
      y[i, c] = True
  return x, y


def _canvases() -> Data:
  x_tr, y_tr, x_te, y_te, _ = digits()  # the classifier's digits split
  a, ya = canvases(x_tr, y_tr, 3000, seed=0)
  b, yb = canvases(x_tr, y_tr, 600, seed=1)
  c, yc = canvases(x_te, y_te, 1000, seed=2)
  xs = standardise(a, b, c)
  return Data("canvases", xs[0], ya, xs[1], yb, xs[2], yc)


def _npz(path: str) -> Data:
  keys = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in keys if k in f}
  except (OSError, ValueError) as e:
    raise MultiLabelError(f"npz:{path}: cannot read it ({e}).") from None
  missing = [k for k in keys if k not in arrays]
  if missing:
    raise MultiLabelError(f"npz:{path}: missing {', '.join(missing)}; it needs {', '.join(keys)}.")
  for s in ("train", "val", "test"):
    check_inputs(f"npz:{path}", f"x_{s}", arrays[f"x_{s}"])
  if not all(arrays[f"x_{s}"].shape[1:] == arrays["x_train"].shape[1:] for s in ("val", "test")):
    raise MultiLabelError(
      f"npz:{path}: x_train, x_val and x_test must have the same input shape, "
      f"got {[arrays[f'x_{s}'].shape[1:] for s in ('train', 'val', 'test')]}."
    )
  ys = [
    check_labels(arrays[f"y_{s}"], arrays[f"x_{s}"], f"npz:{path}: y_{s}")
    for s in ("train", "val", "test")
  ]
  if len({y.shape[1] for y in ys}) != 1:
    raise MultiLabelError(
      f"npz:{path}: y_train, y_val and y_test must have the same number of "
      f"classes, got {[y.shape[1] for y in ys]}."
    )
  xs = standardise(*(np.asarray(arrays[f"x_{s}"], np.float64) for s in ("train", "val", "test")))
  return Data(f"npz:{path}", xs[0], ys[0], xs[1], ys[1], xs[2], ys[2])


def load_data(name: str) -> Data:
  """The dataset ``name``: generated, canvases or npz:PATH; a test split needs a positive
  label (else no ranking metric is defined). The packaged ones are made once a process."""
  if name in ("generated", "canvases"):
    data = _packaged(name)
  elif name.startswith("npz:"):
    data = _npz(name[4:])
  else:
    raise MultiLabelError(f"config.dataset: one of generated, canvases or npz:PATH, got {name!r}.")
  if not data.y_test.any():
    raise MultiLabelError(
      f"{name}: y_test has no positive label; precision, recall and mean "
      "average precision are undefined on it."
    )
  return data


@functools.lru_cache(maxsize=2)
def _packaged(name: str) -> Data:
  return _generated() if name == "generated" else _canvases()


# --- the objectives: the label-set entries of the one regime table ----------------------


@dataclasses.dataclass(frozen=True)
class Objective:
  """A multi-label entry of :data:`jaxsoftmax_experiments.regimes.REGIMES`, as this kind
  reads it: its loss on logits and a label mask, and how its predictions are read."""

  name: str
  loss: Callable  # (logits [B, K], labels bool [B, K]) -> [B]
  scores: str  # "softmax" or "sigmoid": how predictions are read
  summary: str


def _objective(rule: regimes_lib.Regime) -> Objective:
  loss = lambda z, y: rule.positive(None, z, regimes_lib.LabelSets(y))
  return Objective(rule.name, loss, rule.scores, rule.summary)


#: The multi-label objectives by name, the label-set entries of the one regime table.
OBJECTIVES: dict[str, Objective] = {
  name: _objective(regimes_lib.REGIMES[name]) for name in regimes_lib.LABEL_SET_NAMES
}


# --- training -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """A validated multilabel config as a frozen, hashable record (it keys the programs)."""

  regimes: tuple[str, ...] = tuple(OBJECTIVES)
  steps: int = 2000
  num_seeds: int = 5
  batch_size: int = 128
  learning_rate: float = 1e-3
  hidden: tuple[int, ...] = (100, 100)
  eval_every: int = 200
  seed: int = 0
  logit_bound: float = 1e3

  @classmethod
  def of(cls, config) -> "Settings":
    v = config.to_dict()
    return cls(
      tuple(v["regimes"]),
      v["steps"],
      v["num_seeds"],
      v["batch_size"],
      float(v["learning_rate"]),
      tuple(v["hidden"]),
      v["eval_every"],
      v["seed"],
      float(v["logit_bound"]),
    )


def _model(settings, data, key):
  return MLP(data.x_train.shape[1:], data.num_classes, hidden=settings.hidden, rngs=nnx.Rngs(key))


class Counts(NamedTuple):
  """The kind's own arrays in the framework's state (``training.State.extra``): per run,
  the count of steps with an exactly-zero logit gradient for some example (and, of them,
  those where that example had a clipped true label)."""

  zero_steps: tuple  # int32 [seeds] per objective
  clipped_steps: tuple  # int32 [seeds] per objective


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Plan:
  settings: Settings
  data: Data
  graphdef: Any
  arrays: tuple  # x_train, y_train, x_val, x_test on the mesh, replicated
  mesh: Mesh  # (runs, batch): seeds x each batch


def _train_fn(settings: Settings, graphdef, objective: Objective, length: int, mesh: Mesh):
  opt = optax.adam(settings.learning_rate)
  zero_loss = -math.log(CLIP) * 0.999  # a clipped-wrong label's loss is -log(1e-7) / |Y|

  def step(run: training.RunState, _, x, y):
    key, sub = jax.random.split(run.key)
    idx = jax.random.randint(sub, (settings.batch_size,), 0, x.shape[0])
    # The batch is split over the mesh's batch axis (under vmap, runs over its runs axis).
    xb, yb = jax.lax.with_sharding_constraint((x[idx], y[idx]), parallel.batch_sharding(mesh))

    # One forward and one backward pass give the loss, each example's gradient with
    # respect to its logits (for the zero-gradient count) and the parameters' gradient.
    z, pullback = jax.vjp(lambda p: nnx.merge(graphdef, p)(xb), run.params)
    per_example, loss_vjp = jax.vjp(lambda z: objective.loss(z, yb), z)
    (dz,) = loss_vjp(jnp.ones_like(per_example))
    (grads,) = pullback(dz / settings.batch_size)
    zero = jnp.all(dz == 0, axis=-1)
    run = training.apply_update(
      opt, run, key, jnp.mean(per_example), grads, jnp.max(jnp.abs(z)), settings.logit_bound
    )
    stats = (jnp.any(zero), jnp.any(zero & (per_example * jnp.sum(yb, -1) >= zero_loss)))
    return run, stats

  def run(state, x, y):
    state, (zero, clipped) = jax.lax.scan(
      functools.partial(step, x=x, y=y), state, None, length=length
    )
    return state, zero.sum(dtype=jnp.int32), clipped.sum(dtype=jnp.int32)

  return jax.vmap(run, in_axes=(0, None, None), spmd_axis_name=parallel.RUNS)


def make_plan(settings: Settings, data: Data, devices=None) -> Plan:
  """The plan over ``devices`` (default: all): each objective's seeds split over the mesh's
  runs axis, each run's batch over its batch axis."""
  mesh = parallel.make_mesh(settings.num_seeds, settings.batch_size, devices)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: _model(settings, data, 0)))  # no compute
  arrays = parallel.put(
    tuple(jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_val, data.x_test)),
    parallel.replicated(mesh),
  )
  return Plan(settings, data, graphdef, arrays, mesh)


@functools.partial(jax.jit, static_argnames=("plan",))
def _start(plan: Plan) -> training.State:
  s = plan.settings
  keys = jax.random.split(jax.random.key(s.seed), s.num_seeds)
  split = jax.vmap(jax.random.split)(keys)
  init_keys, batch_keys = split[:, 0], split[:, 1]
  params = jax.vmap(lambda k: nnx.state(_model(s, plan.data, k), nnx.Param))(init_keys)
  opt = optax.adam(s.learning_rate)
  new_run = jax.vmap(lambda params, key: training.new_run(params, opt, key))
  runs = tuple(new_run(params, batch_keys) for _ in s.regimes)
  zeros = tuple(jnp.zeros(s.num_seeds, jnp.int32) for _ in s.regimes)
  return training.constrain(plan.mesh, training.State(runs, jnp.int32(0), Counts(zeros, zeros)))


@functools.partial(jax.jit, static_argnames=("plan", "length"))
def _advance(plan: Plan, state: training.State, length: int) -> training.State:
  x, y = plan.arrays[0], plan.arrays[1]
  runs, zero, clipped = [], [], []
  for name, run_, z, c in zip(
    plan.settings.regimes, state.runs, state.extra.zero_steps, state.extra.clipped_steps
  ):
    run_, dz, dc = _train_fn(plan.settings, plan.graphdef, OBJECTIVES[name], length, plan.mesh)(
      run_, x, y
    )
    runs.append(run_)
    zero.append(z + dz)
    clipped.append(c + dc)
  state = training.State(tuple(runs), state.step + length, Counts(tuple(zero), tuple(clipped)))
  return training.constrain(plan.mesh, state)


@functools.partial(jax.jit, static_argnames=("plan",))
def _scores(plan: Plan, state: training.State, x):
  """Every run's logits on ``x``: ``[seeds, n, K]`` per objective."""
  apply = jax.vmap(lambda p, x: nnx.merge(plan.graphdef, p)(x), in_axes=(0, None))
  return tuple(apply(run_.params, x) for run_ in state.runs)


def run(plan: Plan, state: training.State | None = None) -> Iterator[training.State]:
  """Yields the state after every evaluation, the first at step 0."""
  s = plan.settings
  advance = lambda state, length: _advance(plan, state, length)
  return training.evaluations(
    _start(plan) if state is None else state, advance, s.steps, s.eval_every
  )


# --- metrics --------------------------------------------------------------------------


def _probabilities(z: np.ndarray, kind: str) -> np.ndarray:
  """Probabilities in float64 from the logits: ``jax.nn.sigmoid`` per class, or the exp of
  ``jax.nn.log_softmax`` over the classes."""
  with jax.enable_x64(True):
    z = jnp.asarray(np.asarray(z, np.float64))
    p = jax.nn.sigmoid(z) if kind == "sigmoid" else jnp.exp(jax.nn.log_softmax(z, axis=-1))
    return np.asarray(p)


def precision_recall_at_k(scores: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float]:
  """By hand (scikit-learn has no precision or recall at k for label sets). Mean over
  examples of ``|top-k ∩ Y| / k`` and ``|top-k ∩ Y| / |Y|`` (examples with a label)."""
  top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
  hits = np.take_along_axis(y, top, axis=-1).sum(-1)
  size = y.sum(-1)
  has = size > 0
  return float(np.mean(hits / k)), float(np.mean(hits[has] / size[has]))


def mean_average_precision(scores: np.ndarray, y: np.ndarray) -> float:
  """Mean over classes (with a positive test example) of average precision:
  ``sklearn.metrics.average_precision_score`` per class, the mean of the precision at each
  positive's rank (tied scores share one threshold)."""
  from sklearn.metrics import average_precision_score

  has = y.any(0)
  return float(average_precision_score(y[:, has], scores[:, has], average="macro"))


def example_f1(predicted: np.ndarray, y: np.ndarray) -> float:
  """Mean over examples of ``2 |P ∩ Y| / (|P| + |Y|)`` (1 where both are empty):
  ``sklearn.metrics.f1_score(average="samples", zero_division=1.0)``."""
  from sklearn.metrics import f1_score

  return float(f1_score(y, predicted, average="samples", zero_division=1.0))


def predict_sets(p: np.ndarray, kind: str, knob: float) -> np.ndarray:
  """Predicted label sets: sigmoid, ``p >= knob``; softmax, the top ``round(knob / max p)``
  classes (with targets ``Y/|Y|`` the largest probability estimates ``1/|Y|``)."""
  if kind == "sigmoid":
    return p >= knob
  count = np.clip(np.rint(knob / p.max(-1)), 1, p.shape[-1]).astype(int)
  rank = np.argsort(np.argsort(-p, axis=-1, kind="stable"), axis=-1)
  return rank < count[:, None]


KNOBS = {"sigmoid": np.linspace(0.05, 0.95, 19), "softmax": np.linspace(0.5, 3.0, 26)}


def calibration_error(q: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
  """By hand (scikit-learn's calibration_curve gives the bins' means, not their weights).
  Expected calibration error of label marginals: over (example, class) pairs in 10
  equal-width bins of q, the weighted mean of ``|mean q - mean y|``."""
  q, y = q.ravel(), y.ravel().astype(float)
  which = np.minimum((q * bins).astype(int), bins - 1)
  total = 0.0
  for b in range(bins):
    inside = which == b
    if inside.any():
      total += inside.mean() * abs(q[inside].mean() - y[inside].mean())
  return float(total)


def metrics(val_scores, test_scores, data: Data, kind: str) -> dict[str, float]:
  p_val, p_test = _probabilities(val_scores, kind), _probabilities(test_scores, kind)
  out = {}
  for k in (1, 2, 3):
    out[f"precision@{k}"], out[f"recall@{k}"] = precision_recall_at_k(p_test, data.y_test, k)
  out["mAP"] = mean_average_precision(p_test, data.y_test)
  f1s = [example_f1(predict_sets(p_val, kind, t), data.y_val) for t in KNOBS[kind]]
  knob = float(KNOBS[kind][int(np.argmax(f1s))])
  out["f1_knob"] = knob
  out["example_f1"] = example_f1(predict_sets(p_test, kind, knob), data.y_test)
  if kind == "sigmoid":
    marginals = p_test
  else:  # E[Y_k] = E[|Y| Y_k/|Y|], with |Y| at its training mean
    marginals = np.minimum(1.0, data.y_train.sum(-1).mean() * p_test)
  out["marginal_ece"] = calibration_error(marginals, data.y_test)
  return out


# --- the framework's kind interface ----------------------------------------------------

PROGRESS = "test precision@1"


def load(config) -> Data:
  return load_data(config.dataset)


def check(config, data: Data, memory_bytes) -> None:
  """The MLP's memory against what the runs may use."""
  if memory_bytes is None:
    return
  values = config.to_dict()
  widths = [int(np.prod(data.x_train.shape[1:])), *values["hidden"], data.num_classes]
  params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
  runs = len(values["regimes"]) * values["num_seeds"]
  need = 4 * runs * (4 * params + 2 * values["batch_size"] * sum(widths))
  if need > memory_bytes:
    key = "hidden" if 4 * runs * 4 * params > memory_bytes else "batch_size"
    raise config_lib.ConfigError(
      f"config.{key}: the runs need about {need / 2**30:.1f} GiB (parameters, optimizer "
      f"state, gradients and one batch's activations, float32), more than the "
      f"{memory_bytes / 2**30:.1f} GiB available."
    )


def total_steps(config) -> int:
  return config.steps


def plan(config, data: Data, devices) -> Plan:
  return _plan_of(Settings.of(config), data, None if devices is None else tuple(devices))


@functools.lru_cache(maxsize=4)
def _plan_of(settings: Settings, data: Data, devices) -> Plan:
  return make_plan(settings, data, devices)


def template(plan_: Plan) -> training.State:
  """The checkpoint's abstract state: shapes, dtypes and the mesh's shardings."""
  return training.template(plan_.mesh, lambda: _start(plan_))


def host(plan_: Plan, state: training.State):
  """The step, every run's test scores at this evaluation, and whether each run is alive
  and the step it diverged at."""
  scores, runs = parallel.fetch(
    (_scores(plan_, state, plan_.arrays[3]), [(r.alive, r.diverged_at) for r in state.runs])
  )
  return int(state.step), [np.asarray(z) for z in scores], runs


def step(host_) -> int:
  return host_[0]


def records(plan_: Plan, host_, earlier) -> list[dict]:
  """Test precision@1 and mean average precision of every (objective, seed)."""
  del earlier
  at, scores, runs = host_
  y = plan_.data.y_test
  out = []
  for name, z, (alive, diverged_at) in zip(plan_.settings.regimes, scores, runs):
    kind = OBJECTIVES[name].scores
    for seed in range(z.shape[0]):
      p = _probabilities(z[seed], kind)
      out.append(
        {
          "step": at,
          "regime": name,
          "seed": seed,
          "precision@1": precision_recall_at_k(p, y, 1)[0],
          "mAP": mean_average_precision(p, y),
          "diverged": not bool(alive[seed]),
          "diverged_at_step": None if alive[seed] else int(diverged_at[seed]),
        }
      )
  return out


def progress(plan_: Plan, new: list[dict]) -> tuple[str, dict[str, float]]:
  out = {}
  for r in new:
    out.setdefault(r["regime"], []).append(r["precision@1"])
  return PROGRESS, {k: float(np.mean(v)) for k, v in out.items()}


def outputs(
  plan_: Plan,
  state: training.State,
  records_: list[dict],
  resolved: dict,
  wall: float,
  resumed_from,
):
  del wall, resumed_from  # the files do not depend on them: a resumed run's are the same
  s, data = plan_.settings, plan_.data
  val, test, counts = parallel.fetch(
    (_scores(plan_, state, plan_.arrays[2]), _scores(plan_, state, plan_.arrays[3]), state.extra)
  )
  results = {
    "config": resolved,
    "num_devices": plan_.mesh.size,
    "num_train": len(data.y_train),
    "num_val": len(data.y_val),
    "num_test": len(data.y_test),
    "num_classes": data.num_classes,
    "mean_labels": float(data.y_train.sum(-1).mean()),
    "num_unlabeled": int((data.y_train.sum(-1) == 0).sum()),
    "objectives": {},
  }
  for i, n in enumerate(s.regimes):
    v, t = np.asarray(val[i]), np.asarray(test[i])
    per_seed = [metrics(v[k], t[k], data, OBJECTIVES[n].scores) for k in range(s.num_seeds)]
    r = {key: [m[key] for m in per_seed] for key in per_seed[0]}
    r["zero_gradient_steps"] = [float(c) / s.steps for c in np.asarray(counts.zero_steps[i])]
    r["clipped_wrong_steps"] = [float(c) / s.steps for c in np.asarray(counts.clipped_steps[i])]
    last = [x for x in records_ if x["step"] == s.steps and x["regime"] == n]  # seed order
    r["diverged"] = [x["diverged"] for x in last]
    r["diverged_at_step"] = [x["diverged_at_step"] for x in last]
    results["objectives"][n] = r
  return results, summary_markdown(results), lambda path: _plot(records_, s.regimes, path)


def arrays(data: Data):
  return (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test)


def title(config) -> str:
  return f"multilabel/{config.dataset}"


def summary_markdown(results: dict[str, Any]) -> str:
  c = results["config"]
  names = list(results["objectives"])
  cols = ["precision@1", "precision@3", "recall@3", "mAP", "example_f1", "marginal_ece"]
  lines = [
    f"# Several true labels on {c['dataset']}",
    "",
    f"MLP {tuple(c['hidden'])}, {c['num_seeds']} seeds, {c['steps']} steps, batch "
    f"{c['batch_size']}, Adam at {c['learning_rate']:g}; {results['num_train']} training, "
    f"{results['num_val']} validation, {results['num_test']} test examples, "
    f"{results['num_classes']} classes, {results['mean_labels']:.2f} labels per training "
    f"example ({results['num_unlabeled']} without any).",
    "",
    "| objective | " + " | ".join(cols) + " | steps with a zero-gradient example "
    "(of them: clipped wrong) | diverged |",
    "|---|" + "---|" * len(cols) + "---|---:|",
  ]
  for n in names:
    r = results["objectives"][n]
    cells = [mean_std(r[k]) for k in cols]
    zero = f"{np.mean(r['zero_gradient_steps']):.3f} ({np.mean(r['clipped_wrong_steps']):.3f})"
    lines.append(
      f"| {n} | " + " | ".join(cells) + f" | {zero} | {sum(r['diverged'])}/{len(r['diverged'])} |"
    )
  lines += [
    "",
    "Mean ± sample standard deviation over seeds, test split, last step. "
    "example_f1: sets predicted with the threshold (sigmoid) or the count scale "
    "(softmax: top round(s / max p)) that maximises it on the validation split. "
    "marginal_ece: 10-bin calibration error of per-class marginals (sigmoid p_k; "
    "softmax min(1, mean |Y| x p_k)). The last column: the fraction of steps in which "
    "some example's gradient with respect to its logits was exactly zero, and in "
    "brackets those where that example had a true label clipped at 1e-7. "
    + report.divergence_rule(c["logit_bound"]),
  ]
  return "\n".join(lines) + "\n"


def _plot(records_: list[dict], names, path):
  """Test precision@1 and mAP against step, from the metrics log: mean and min-max band."""
  import io

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, n in enumerate(names):
    mine = [r for r in records_ if r["regime"] == n]
    steps = sorted({r["step"] for r in mine})
    for ax, metric in zip(axes, ("precision@1", "mAP")):
      values = np.array([[r[metric] for r in mine if r["step"] == st] for st in steps], float)
      ax.plot(steps, values.mean(1), color=f"C{i}", label=n)
      ax.fill_between(steps, values.min(1), values.max(1), color=f"C{i}", alpha=0.2, linewidth=0)
      ax.set(xlabel="step", ylabel=metric, title=f"test {metric} (mean, min-max over seeds)")
  axes[0].legend(loc="lower right")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  report.write_atomic(path, buf.getvalue())


def gradient_figure(path: str, num_classes: int = 10) -> dict[str, list[float]]:
  """Loss and true-logit gradient against the true class's logit gap, for cross-entropy,
  cross-entropy plus the (1 - y) log(1 - p) terms, and the clipped form; one true label,
  the other K - 1 logits 0. Returns the curves it plots."""
  import io

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxsoftmax_experiments.report import write_atomic

  gaps = np.linspace(-30.0, 10.0, 401, dtype=np.float32)
  y = jnp.zeros((len(gaps), num_classes), bool).at[:, 0].set(True)
  z = jnp.zeros((len(gaps), num_classes)).at[:, 0].set(gaps)
  curves = {}
  for name in ("softmax_y_over_size", "softmax_plus_complement", "clipped_softmax"):
    fn = OBJECTIVES[name].loss
    value = jax.jit(fn)(z, y)
    grad = jax.jit(jax.grad(lambda z: jnp.sum(fn(z, y))))(z)[:, 0]
    curves[name] = (np.asarray(value), np.asarray(grad))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  labels = {
    "softmax_y_over_size": "cross-entropy  -log p_y",
    "softmax_plus_complement": "+ sum_{k != y} -log(1 - p_k)",
    "clipped_softmax": "clipped  -log clip(p_y, 1e-7, 1 - 1e-7)",
  }
  for i, (name, (value, grad)) in enumerate(curves.items()):
    style = "--" if name == "clipped_softmax" else "-"
    axes[0].plot(gaps, value, style, color=f"C{i}", label=labels[name])
    axes[1].plot(gaps, -grad, style, color=f"C{i}", label=labels[name])
  axes[0].set(
    xlabel="true logit minus the others' (K = 10)",
    ylabel="loss",
    title="loss (from the toolkit's exact losses)",
  )
  axes[1].set(
    xlabel="true logit minus the others' (K = 10)",
    ylabel="-d loss / d z_true",
    title="push on the true logit",
  )
  axes[1].set_yscale("symlog", linthresh=1e-3)
  axes[0].legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  write_atomic(Path(path), buf.getvalue())
  return {k: [float(v) for v in g] for k, (_, g) in curves.items()} | {
    "gaps": [float(g) for g in gaps]
  }
