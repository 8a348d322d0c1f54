"""One experiment: examples from a protocol, then every regime and seed trained at once.

:func:`run_experiment` is free of file I/O; :mod:`experiments.run` wraps it with the
command line and the workdir's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from experiments import protocols
from experiments.data import Dataset
from experiments.train import REGIME_IDS, Trainer


def seed_keys(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Per-seed keys, each ``[num_seeds]``: labeled-set draw, protocol, init, batches."""
  root = jax.random.key(config.seed)
  keys = jax.vmap(lambda s: jax.random.split(jax.random.fold_in(root, s), 4))(
      jnp.arange(config.num_seeds))
  return dict(zip(("labeled", "protocol", "init", "batches"), keys.T))


def _chunks(steps: int, every: int):
  """Chunk lengths that end at each multiple of ``every`` and at ``steps``."""
  done = 0
  while done < steps:
    length = min(every, steps - done)
    done += length
    yield length


def _float(x) -> float | None:
  """A JSON-safe float: None for NaN and infinities (divergence is recorded elsewhere)."""
  x = float(x)
  return x if math.isfinite(x) else None


def initial_model_predictions(config, dataset, keys, labeled, progress=None):
  """Feedback protocol: trains one model per seed on its labeled inputs alone.

  Returns its predictions on every training input ``[seeds, n]`` and its test accuracy.
  """
  trainer = Trainer(config, dataset, config.initial_steps)
  y = jnp.asarray(dataset.y_train)
  examples = protocols.labeled_only(jnp.broadcast_to(y, labeled.shape), labeled)
  regimes = jnp.full(config.num_seeds, REGIME_IDS["positive_only"])
  state = trainer.init(keys["init"], keys["batches"])
  state, _ = trainer.train(state, examples, regimes, config.initial_steps)
  if progress is not None:
    progress.update(config.initial_steps)
  accuracy = trainer.test_metrics(state)["test_accuracy"]
  return trainer.train_predictions(state), accuracy


def first_round_examples(config, dataset, keys, progress=None) -> tuple[protocols.Examples, dict]:
  """The protocol's examples for every seed, ``[seeds, rounds * n]``, and notes on them."""
  y = jnp.asarray(dataset.y_train)
  n, seeds, rounds = len(y), config.num_seeds, config.feedback_rounds
  labeled = jax.vmap(protocols.labeled_mask, (0, None, None))(keys["labeled"], n, config.num_labeled)
  ys = jnp.broadcast_to(y, (seeds, n))
  notes: dict[str, Any] = {}
  if config.protocol == "supervised":
    return protocols.supervised(ys, rounds), notes
  if config.protocol in ("uniform", "biased"):
    bias = config.bias if config.protocol == "biased" else 0.0
    draw = lambda key, lab: protocols.complementary(
        key, y, lab, dataset.num_classes, bias=bias, rounds=rounds)
    return jax.vmap(draw)(keys["protocol"], labeled), notes
  predictions, accuracy = initial_model_predictions(config, dataset, keys, labeled, progress)
  notes["initial_model_test_accuracy"] = [float(a) for a in accuracy]
  examples = protocols.judge(protocols.labeled_only(ys, labeled, rounds), predictions, y, 0)
  return examples, notes


def run_experiment(config: ml_collections.ConfigDict, dataset: Dataset, *,
                   on_eval: Callable[[list[dict]], None] | None = None,
                   progress: bool = True) -> dict[str, Any]:
  """Trains every regime in ``config.regimes`` for every seed and evaluates them.

  Args:
    config: a validated experiment config.
    dataset: the data.
    on_eval: called after every evaluation with one record per (regime, seed): the
      round, the step and the metrics that go to ``metrics.jsonl``.
    progress: whether to show a progress bar with each regime's mean test accuracy.

  Returns:
    ``{"regimes": {regime: {metric: [one per seed]}}, "num_train": ..., "num_test": ...}``
    (and ``initial_model_test_accuracy`` for the feedback protocol): the final
    evaluation of every run, ready for ``results.json``.
  """
  regimes, seeds = tuple(config.regimes), config.num_seeds
  rounds, n = config.feedback_rounds, len(dataset.y_train)
  keys = seed_keys(config)
  total = config.steps * rounds + (config.initial_steps if config.protocol == "feedback" else 0)
  bar = tqdm(total=total, desc=f"{config.dataset}/{config.protocol}", disable=not progress,
             unit="step", dynamic_ncols=True)

  examples, notes = first_round_examples(config, dataset, keys, bar)
  # Runs are regime-major: run r * seeds + s is regime r, seed s.
  tile = lambda a: jnp.concatenate([a] * len(regimes))
  examples = jax.tree.map(tile, examples)
  run_regimes = jnp.repeat(jnp.array([REGIME_IDS[r] for r in regimes]), seeds)
  trainer = Trainer(config, dataset, config.steps * rounds)
  state = trainer.init(tile(keys["init"]), tile(keys["batches"]))
  y = jnp.asarray(dataset.y_train)

  def per_regime(values):
    """Splits a per-run sequence into one list of seeds per regime (runs are regime-major)."""
    return {r: list(values[i * seeds:(i + 1) * seeds]) for i, r in enumerate(regimes)}

  def evaluate(round_, stats):
    # One transfer from the device per evaluation.
    metrics, alive, diverged_at, steps, stats = jax.device_get(
        (trainer.test_metrics(state), state.alive, state.diverged_at, state.step, stats))
    if stats is not None:
      # Training loss and largest logit over the steps each run was alive for.
      live = stats.alive.sum(0)
      with np.errstate(invalid="ignore"):  # inf - inf in a diverging step's loss
        loss = np.where(live > 0, np.where(stats.alive, stats.loss, 0).sum(0) / np.maximum(live, 1),
                        np.nan)
      max_logit = np.where(stats.alive, stats.max_logit, -np.inf).max(0)
    records = []
    step = int(steps[0])
    for run, regime in enumerate(np.repeat(regimes, seeds)):
      record = {"round": round_, "step": step, "regime": str(regime), "seed": run % seeds}
      record.update({k: _float(v[run]) for k, v in metrics.items()})
      record["train_loss"] = None if stats is None else _float(loss[run])
      record["max_logit"] = None if stats is None else _float(max_logit[run])
      record["diverged"] = not bool(alive[run])
      record["diverged_at_step"] = None if alive[run] else int(diverged_at[run])
      records.append(record)
    if on_eval is not None:
      on_eval(records)
    bar.set_postfix({r.split("_")[0]: f"{np.mean(a):.3f}"
                     for r, a in per_regime(metrics["test_accuracy"]).items()})
    return records

  records = evaluate(0, None)
  best = [r["test_accuracy"] for r in records]
  for round_ in range(rounds):
    if round_ > 0:
      examples = protocols.judge(examples, trainer.train_predictions(state), y, round_)
    for length in _chunks(config.steps, config.eval_every):
      state, stats = trainer.train(state, examples, run_regimes, length)
      bar.update(length)
      records = evaluate(round_ + 1, stats)
      best = [max(b, r["test_accuracy"]) for b, r in zip(best, records)]
  bar.close()

  positives, negatives = jax.device_get(examples.counts())
  columns = {key: [r[key] for r in records]
             for key in ("test_accuracy", "test_nll", "train_loss", "max_logit", "param_norm",
                         "diverged", "diverged_at_step")}
  columns["best_test_accuracy"] = best
  columns["num_positive"] = [int(c) for c in positives]
  columns["num_negative"] = [int(c) for c in negatives]
  split = {key: per_regime(values) for key, values in columns.items()}
  results: dict[str, Any] = {
      "regimes": {r: {key: split[key][r] for key in columns} for r in regimes}}
  results["num_train"] = n
  results["num_test"] = len(dataset.y_test)
  results.update(notes)
  return results
