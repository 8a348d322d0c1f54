"""Several true labels per example: softmax with targets ``Y/|Y|`` against sigmoid
cross-entropy, and what the ``(1 - y) log(1 - p)`` terms and probability clipping do.

    jaxsoftmax-multilabel --dataset=canvases --workdir=runs/multilabel_canvases
    jaxsoftmax-multilabel --dataset=generated --workdir=runs/multilabel_generated
    jaxsoftmax-multilabel --dataset=npz:my_labels.npz --workdir=runs/mine
    jaxsoftmax-multilabel --figure=docs/multilabel_gradients.png

Every objective of :data:`OBJECTIVES` x ``--seeds`` seeds trains an MLP at once: one
compiled program, the runs grouped by objective and ``jax.vmap``-ed over seeds, Adam,
batches drawn with replacement. The workdir gets ``config.json``, ``results.json``,
``summary.md`` and ``curves.png``; a second command on the same folder waits for nothing
and is refused (an OS lock), and a folder holding another config's results is refused
unless ``--overwrite``.

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

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsoftmax import losses
from jaxsoftmax.models import MLP
from jaxsoftmax_experiments.data import digits, standardise
from jaxsoftmax_experiments.report import mean_std

CLIP = 1e-7  # Keras's epsilon: probabilities clipped to [1e-7, 1 - 1e-7]


class MultiLabelError(ValueError):
  """A label mask or data file that cannot be used; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Data:
  name: str
  x_train: np.ndarray
  y_train: np.ndarray   # bool [n, K]
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
    raise MultiLabelError(f"{name}: a label mask must be [n, K] with n = {len(x)} inputs, got "
                          f"shape {y.shape}.")
  if y.dtype != np.bool_:
    if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
      bad = y[~np.isin(y, (0, 1))] if np.issubdtype(y.dtype, np.number) else y.dtype
      raise MultiLabelError(f"{name}: a label mask must be binary (0/1 or bool), found "
                            f"{np.ravel(bad)[:3]}.")
    y = y.astype(bool)
  return y


def _generated() -> Data:
  from sklearn.datasets import make_multilabel_classification
  x, y = make_multilabel_classification(n_samples=3000, n_features=20, n_classes=10,
                                        n_labels=3, allow_unlabeled=False, random_state=0)
  xs = standardise(x[:2000], x[2000:2500], x[2500:])
  ys = [y[:2000], y[2000:2500], y[2500:]]
  return Data("generated", xs[0], ys[0].astype(bool), xs[1], ys[1].astype(bool), xs[2],
              ys[2].astype(bool))


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
      x[i, :, 8 * slot:8 * slot + 8] = images[rng.choice(by_class[c])]
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
  ys = [check_labels(arrays[f"y_{s}"], arrays[f"x_{s}"], f"npz:{path}: y_{s}")
        for s in ("train", "val", "test")]
  if len({y.shape[1] for y in ys}) != 1:
    raise MultiLabelError(f"npz:{path}: y_train, y_val and y_test must have the same number of "
                          f"classes, got {[y.shape[1] for y in ys]}.")
  xs = standardise(*(np.asarray(arrays[f"x_{s}"], np.float64) for s in ("train", "val", "test")))
  return Data(f"npz:{path}", xs[0], ys[0], xs[1], ys[1], xs[2], ys[2])


def load(name: str) -> Data:
  if name == "generated":
    return _generated()
  if name == "canvases":
    return _canvases()
  if name.startswith("npz:"):
    return _npz(name[4:])
  raise MultiLabelError(f"--dataset: one of generated, canvases or npz:PATH, got {name!r}.")


# --- the objectives -------------------------------------------------------------------


def _softmax_targets(z, y):
  """multilabel_softmax_cross_entropy, weight 0 for an example without labels."""
  has = jnp.any(y, axis=-1)
  safe = y.at[..., 0].set(y[..., 0] | ~has)  # any label: the loss is masked out below
  return jnp.where(has, losses.multilabel_softmax_cross_entropy(z, safe), 0.0)


def _sigmoid(z, y):
  return jnp.sum(losses.sigmoid_binary_cross_entropy(z, y.astype(z.dtype)), axis=-1)


def _complement_terms(z, y):
  """``-sum_{k not in Y} log(1 - p_k)``, each term the exact complement_nll of class k."""
  k = z.shape[-1]
  per_class = jax.vmap(lambda c: losses.complement_nll(z, jnp.full(z.shape[:-1], c)),
                       out_axes=-1)(jnp.arange(k))
  return jnp.sum(jnp.where(y, 0.0, per_class), axis=-1)


def _softmax_plus_complement(z, y):
  return _softmax_targets(z, y) + jnp.where(jnp.any(y, -1), _complement_terms(z, y), 0.0)


def _clipped(z, y):
  """Keras's categorical cross-entropy on softmax outputs: probabilities clipped to
  ``[1e-7, 1 - 1e-7]``, targets ``Y/|Y|``. The clip passes no gradient outside."""
  has = jnp.any(y, axis=-1, keepdims=True)
  t = jnp.where(has, y / jnp.maximum(jnp.sum(y, -1, keepdims=True), 1), 0.0)
  p = jnp.clip(jax.nn.softmax(z, axis=-1), CLIP, 1.0 - CLIP)
  return -jnp.sum(t * jnp.log(p), axis=-1)


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  loss: Callable        # (logits [B, K], labels bool [B, K]) -> [B]
  scores: str           # "softmax" or "sigmoid": how predictions are read
  summary: str


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("softmax_y_over_size", _softmax_targets, "softmax",
              "multilabel_softmax_cross_entropy: softmax with targets Y/|Y|"),
    Objective("sigmoid", _sigmoid, "sigmoid",
              "sigmoid_binary_cross_entropy summed over classes"),
    Objective("softmax_plus_complement", _softmax_plus_complement, "softmax",
              "softmax with targets Y/|Y| plus -log(1 - p_k) for every k not in Y (complement_nll)"),
    Objective("clipped_softmax", _clipped, "softmax",
              "Keras-style: softmax probabilities clipped to [1e-7, 1 - 1e-7], targets Y/|Y|"),
)}


# --- training -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  steps: int = 2000
  seeds: int = 5
  batch_size: int = 128
  learning_rate: float = 1e-3
  hidden: tuple[int, ...] = (100, 100)
  eval_every: int = 200
  seed: int = 0

  def check(self):
    for key in ("steps", "seeds", "batch_size", "eval_every"):
      if getattr(self, key) < 1:
        raise MultiLabelError(f"--{key}: must be >= 1, got {getattr(self, key)}.")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise MultiLabelError(f"--learning_rate: must be a finite number > 0, got "
                            f"{self.learning_rate}.")


def _model(settings, data, key):
  return MLP(data.x_train.shape[1:], data.num_classes, hidden=settings.hidden,
             rngs=nnx.Rngs(key))


def _train_fn(settings: Settings, graphdef, objective: Objective, length: int):
  opt = optax.adam(settings.learning_rate)
  zero_loss = -math.log(CLIP) * 0.999  # a clipped-wrong label's loss is -log(1e-7) / |Y|

  def step(carry, _, x, y):
    params, opt_state, key = carry
    key, sub = jax.random.split(key)
    idx = jax.random.randint(sub, (settings.batch_size,), 0, x.shape[0])
    xb, yb = x[idx], y[idx]

    # One forward and one backward pass give the loss, each example's gradient with
    # respect to its logits (for the zero-gradient count) and the parameters' gradient.
    z, pullback = jax.vjp(lambda p: nnx.merge(graphdef, p)(xb), params)
    per_example, loss_vjp = jax.vjp(lambda z: objective.loss(z, yb), z)
    (dz,) = loss_vjp(jnp.ones_like(per_example))
    (grads,) = pullback(dz / settings.batch_size)
    loss = jnp.mean(per_example)
    zero = jnp.all(dz == 0, axis=-1)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    stats = (loss, jnp.any(zero), jnp.any(zero & (per_example * jnp.sum(yb, -1) >= zero_loss)))
    return (params, opt_state, key), stats

  def run(params, opt_state, key, x, y):
    return jax.lax.scan(functools.partial(step, x=x, y=y), (params, opt_state, key), None,
                        length=length)
  return jax.vmap(run, in_axes=(0, 0, 0, None, None))


def train(settings: Settings, data: Data, names: Sequence[str]):
  """Trains every objective x seed; returns ``(scores, history, stats)``: test and
  validation scores ``[S, n, K]`` per objective at the end, the test scores at each
  evaluation, and per-step statistics ``[S, steps]``."""
  keys = jax.random.split(jax.random.key(settings.seed), settings.seeds)
  split = jax.vmap(jax.random.split)(keys)
  init_keys, batch_keys = split[:, 0], split[:, 1]
  graphdef = nnx.graphdef(_model(settings, data, 0))
  params = jax.vmap(lambda k: nnx.state(_model(settings, data, k), nnx.Param))(init_keys)
  opt = optax.adam(settings.learning_rate)
  state = {n: (params, jax.vmap(opt.init)(params), batch_keys) for n in names}
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  apply = jax.jit(jax.vmap(lambda p, x: nnx.merge(graphdef, p)(x), in_axes=(0, None)))

  @functools.partial(jax.jit, static_argnames="length")
  def chunk(state, length):
    out, stats = {}, {}
    for n in names:
      (p, o, k), s = _train_fn(settings, graphdef, OBJECTIVES[n], length)(*state[n], x, y)
      out[n], stats[n] = (p, o, k), s
    return out, stats

  history = {n: [] for n in names}
  all_stats = {n: [] for n in names}
  done = 0
  while True:
    for n in names:
      history[n].append((done, np.asarray(apply(state[n][0], data.x_test))))
    if done >= settings.steps:
      break
    length = min(settings.eval_every, settings.steps - done)
    state, stats = chunk(state, length)
    for n in names:
      all_stats[n].append(jax.tree.map(np.asarray, stats[n]))
    done += length
  scores = {n: (np.asarray(apply(state[n][0], data.x_val)), history[n][-1][1]) for n in names}
  stats = {n: tuple(np.concatenate([s[i] for s in all_stats[n]], axis=1) for i in range(3))
           for n in names}
  return scores, history, stats


# --- metrics --------------------------------------------------------------------------


def _probabilities(z: np.ndarray, kind: str) -> np.ndarray:
  z = np.asarray(z, np.float64)
  if kind == "sigmoid":
    return 1.0 / (1.0 + np.exp(-z))
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def precision_recall_at_k(scores: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float]:
  """Mean over examples of |top-k ∩ Y| / k and |top-k ∩ Y| / |Y| (examples with a label)."""
  top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
  hits = np.take_along_axis(y, top, axis=-1).sum(-1)
  size = y.sum(-1)
  has = size > 0
  return float(np.mean(hits / k)), float(np.mean(hits[has] / size[has]))


def mean_average_precision(scores: np.ndarray, y: np.ndarray) -> float:
  """Mean over classes (with a positive test example) of average precision, the mean of
  the precision at each positive's rank."""
  aps = []
  for k in range(y.shape[1]):
    if not y[:, k].any():
      continue
    order = np.argsort(-scores[:, k], kind="stable")
    hits = y[order, k]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    aps.append(float(precision[hits].mean()))
  return float(np.mean(aps))


def example_f1(predicted: np.ndarray, y: np.ndarray) -> float:
  """Mean over examples of 2 |P ∩ Y| / (|P| + |Y|) (1 where both are empty)."""
  inter = (predicted & y).sum(-1)
  denom = predicted.sum(-1) + y.sum(-1)
  return float(np.mean(np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)))


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
  """Expected calibration error of label marginals: over (example, class) pairs in 10
  equal-width bins of q, the weighted mean of |mean q - mean y|."""
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


# --- the command line -----------------------------------------------------------------



def summary_markdown(results: dict[str, Any]) -> str:
  c = results["config"]
  names = list(results["objectives"])
  cols = ["precision@1", "precision@3", "recall@3", "mAP", "example_f1", "marginal_ece"]
  lines = [f"# Several true labels on {c['dataset']}", "",
           f"MLP {tuple(c['hidden'])}, {c['seeds']} seeds, {c['steps']} steps, batch "
           f"{c['batch_size']}, Adam at {c['learning_rate']:g}; {results['num_train']} training, "
           f"{results['num_val']} validation, {results['num_test']} test examples, "
           f"{results['num_classes']} classes, {results['mean_labels']:.2f} labels per training "
           f"example ({results['num_unlabeled']} without any); {results['wall_seconds']:.1f} s.", "",
           "| objective | " + " | ".join(cols) + " | steps with a zero-gradient example "
           "(of them: clipped wrong) |",
           "|---|" + "---|" * len(cols) + "---|"]
  for n in names:
    r = results["objectives"][n]
    cells = [mean_std(r[k]) for k in cols]
    zero = f"{np.mean(r['zero_gradient_steps']):.3f} ({np.mean(r['clipped_wrong_steps']):.3f})"
    lines.append(f"| {n} | " + " | ".join(cells) + f" | {zero} |")
  lines += ["", "Mean ± sample standard deviation over seeds, test split, last step. "
            "example_f1: sets predicted with the threshold (sigmoid) or the count scale "
            "(softmax: top round(s / max p)) that maximises it on the validation split. "
            "marginal_ece: 10-bin calibration error of per-class marginals (sigmoid p_k; "
            "softmax min(1, mean |Y| x p_k)). The last column: the fraction of steps in which "
            "some example's gradient with respect to its logits was exactly zero, and in "
            "brackets those where that example had a true label clipped at 1e-7."]
  return "\n".join(lines) + "\n"


def _plot(history, data, names, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from jaxsoftmax_experiments.report import write_atomic
  import io
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, n in enumerate(names):
    kind = OBJECTIVES[n].scores
    steps = [s for s, _ in history[n]]
    for ax, metric in zip(axes, ("precision@1", "mAP")):
      values = np.array([[(precision_recall_at_k(_probabilities(z[s], kind), data.y_test, 1)[0]
                           if metric == "precision@1" else
                           mean_average_precision(_probabilities(z[s], kind), data.y_test))
                          for s in range(z.shape[0])] for _, z in history[n]])
      ax.plot(steps, values.mean(1), color=f"C{i}", label=n)
      ax.fill_between(steps, values.min(1), values.max(1), color=f"C{i}", alpha=0.2, linewidth=0)
      ax.set(xlabel="step", ylabel=metric, title=f"test {metric} (mean, min-max over seeds)")
  axes[0].legend(loc="lower right")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  write_atomic(path, buf.getvalue())


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
  labels = {"softmax_y_over_size": "cross-entropy  -log p_y",
            "softmax_plus_complement": "+ sum_{k != y} -log(1 - p_k)",
            "clipped_softmax": "clipped  -log clip(p_y, 1e-7, 1 - 1e-7)"}
  for i, (name, (value, grad)) in enumerate(curves.items()):
    style = "--" if name == "clipped_softmax" else "-"
    axes[0].plot(gaps, value, style, color=f"C{i}", label=labels[name])
    axes[1].plot(gaps, -grad, style, color=f"C{i}", label=labels[name])
  axes[0].set(xlabel="true logit minus the others' (K = 10)", ylabel="loss",
              title="loss (from the toolkit's exact losses)")
  axes[1].set(xlabel="true logit minus the others' (K = 10)",
              ylabel="-d loss / d z_true", title="push on the true logit")
  axes[1].set_yscale("symlog", linthresh=1e-3)
  axes[0].legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  write_atomic(Path(path), buf.getvalue())
  return {k: [float(v) for v in g] for k, (_, g) in curves.items()} | {"gaps": [float(g) for g in gaps]}


def main(argv: Sequence[str] | None = None) -> int:
  from jaxsoftmax_experiments import report
  from jaxsoftmax_experiments.workdir import Workdir, WorkdirError
  parser = argparse.ArgumentParser(prog="jaxsoftmax-multilabel",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="canvases",
                      help="generated, canvases (default) or npz:PATH")
  parser.add_argument("--workdir", help="folder for config.json, results.json, summary.md, curves.png")
  parser.add_argument("--objectives", default=",".join(OBJECTIVES),
                      help="comma-separated, from " + ", ".join(OBJECTIVES))
  for f in dataclasses.fields(Settings):
    if f.name != "hidden":
      parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
  parser.add_argument("--hidden", default="100,100", help="MLP hidden sizes, comma-separated")
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--figure", help="write the cross-entropy gradient figure here and stop")
  args = parser.parse_args(argv)
  if args.figure:
    gradient_figure(args.figure)
    print(f"Wrote {args.figure}")
    return 0
  if not args.workdir:
    print("error: --workdir is required, e.g. --workdir=runs/multilabel.", file=sys.stderr)
    return 2
  try:
    names = [n for n in args.objectives.split(",") if n]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names:
      raise MultiLabelError(f"--objectives: unknown {unknown}; choose from {', '.join(OBJECTIVES)}.")
    hidden = tuple(int(h) for h in args.hidden.split(",") if h)
    settings = Settings(args.steps, args.seeds, args.batch_size, args.learning_rate, hidden,
                        args.eval_every, args.seed)
    settings.check()
    data = load(args.dataset)
  except (MultiLabelError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  config = {"dataset": args.dataset, "objectives": names, **dataclasses.asdict(settings)}
  workdir = Workdir(args.workdir)
  try:
    workdir.lock()
  except WorkdirError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    workdir.remove_temporary_files()
    done = workdir.path / "results.json"
    if done.exists() and not args.overwrite:
      old = json.loads(done.read_text()).get("config")
      if old == json.loads(json.dumps(config)):
        print(f"The run in {workdir.path} is complete; its results are in results.json and "
              "summary.md (--overwrite runs it afresh).")
        return 0
      print(f"error: {workdir.path} holds results of another config; pass --overwrite or "
            "choose another --workdir.", file=sys.stderr)
      return 2
    workdir.claim("jaxsoftmax-multilabel")
    start = time.perf_counter()
    scores, history, stats = train(settings, data, names)
    results = {"config": config, "num_train": len(data.y_train), "num_val": len(data.y_val),
               "num_test": len(data.y_test), "num_classes": data.num_classes,
               "mean_labels": float(data.y_train.sum(-1).mean()),
               "num_unlabeled": int((data.y_train.sum(-1) == 0).sum()), "objectives": {}}
    for n in names:
      val, test = scores[n]
      per_seed = [metrics(val[s], test[s], data, OBJECTIVES[n].scores)
                  for s in range(settings.seeds)]
      r = {k: [m[k] for m in per_seed] for k in per_seed[0]}
      _, zero, clipped = stats[n]
      r["zero_gradient_steps"] = [float(v) for v in zero.mean(1)]
      r["clipped_wrong_steps"] = [float(v) for v in clipped.mean(1)]
      results["objectives"][n] = r
    results["wall_seconds"] = time.perf_counter() - start
    report.write_atomic(workdir.path / "config.json", report.to_json(config))
    report.write_atomic(done, report.to_json(results))
    text = summary_markdown(results)
    report.write_atomic(workdir.path / "summary.md", text)
    _plot(history, data, names, workdir.path / "curves.png")
    print(text)
    print(f"Wrote config.json, results.json, summary.md and curves.png to {workdir.path}/")
    return 0
  finally:
    workdir.unlock()


def cli() -> None:
  """The ``jaxsoftmax-multilabel`` console script."""
  sys.exit(main())


if __name__ == "__main__":
  cli()
