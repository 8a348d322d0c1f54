"""One experiment: examples from a protocol, then every regime and seed trained at once.

:func:`run_experiment` is free of file I/O; :mod:`experiments.run` wraps it with the
command line, the workdir's outputs and the checkpoints. It hands out a
:class:`Snapshot` at evaluations and resumes from one: a resumed experiment takes
the same steps, with the same random keys, as one that was never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from experiments import parallel, protocols
from experiments.data import Dataset
from experiments.train import REGIME_IDS, RunState, Trainer


class Snapshot(NamedTuple):
  """Where an experiment stands after an evaluation: enough to carry on from there."""
  step: int                       # training steps done, over all rounds
  state: RunState                 # every run's state, stacked
  examples: protocols.Examples    # the examples table of the current round
  notes: dict                     # results known before training (JSON)
  num_records: int                # evaluation records handed to on_eval so far


def num_runs(config: ml_collections.ConfigDict) -> int:
  return len(config.regimes) * config.num_seeds


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None):
  """The mesh the experiment's runs train on (:func:`experiments.parallel.make_mesh`)."""
  return parallel.make_mesh(num_runs(config), config.batch_size, devices)


def snapshot_template(config: ml_collections.ConfigDict, dataset: Dataset,
                      devices: Sequence[jax.Device] | None = None) -> tuple[RunState, protocols.Examples]:
  """``(state, examples)`` as abstract arrays with the shapes and shardings of a snapshot."""
  trainer = Trainer(config, dataset, config.steps * config.feedback_rounds,
                    make_mesh(config, devices))
  runs = num_runs(config)
  key = jax.random.split(jax.random.key(0), runs)
  state = jax.eval_shape(trainer._init, key, key)  # noqa: SLF001 - shapes only
  table = jax.ShapeDtypeStruct((runs, config.feedback_rounds * len(dataset.y_train)), jnp.int32)
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.runs)
  return jax.tree.map(abstract, (state, protocols.Examples(table, table)))


def seed_keys(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Per-seed keys, each ``[num_seeds]``: labeled-set draw, protocol, init, batches."""
  root = jax.random.key(config.seed)
  keys = jax.vmap(lambda s: jax.random.split(jax.random.fold_in(root, s), 4))(
      jnp.arange(config.num_seeds))
  return dict(zip(("labeled", "protocol", "init", "batches"), keys.T))


def _chunks(steps: int, every: int, first: int = 0):
  """Chunk lengths from ``first`` that end at each multiple of ``every`` and at ``steps``."""
  done = first
  while done < steps:
    length = min(every - done % every, steps - done)
    done += length
    yield length


def _float(x) -> float | None:
  """A JSON-safe float: None for NaN and infinities (divergence is recorded elsewhere)."""
  x = float(x)
  return x if math.isfinite(x) else None


def initial_model_predictions(config, dataset, keys, labeled, progress=None, devices=None):
  """Feedback protocol: trains one model per seed on its labeled inputs alone.

  Returns its predictions on every training input ``[seeds, n]`` and its test accuracy.
  """
  mesh = parallel.make_mesh(config.num_seeds, config.batch_size, devices)
  trainer = Trainer(config, dataset, config.initial_steps, mesh)
  y = jnp.asarray(dataset.y_train)
  examples = protocols.labeled_only(jnp.broadcast_to(y, labeled.shape), labeled)
  regimes = jnp.full(config.num_seeds, REGIME_IDS["positive_only"])
  state = trainer.init(keys["init"], keys["batches"])
  state, _ = trainer.train(state, examples, regimes, config.initial_steps)
  if progress is not None:
    progress.update(config.initial_steps)
  accuracy = trainer.test_metrics(state)["test_accuracy"]
  return trainer.train_predictions(state), accuracy


def first_round_examples(config, dataset, keys, progress=None,
                         devices=None) -> tuple[protocols.Examples, dict]:
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
  predictions, accuracy = initial_model_predictions(config, dataset, keys, labeled, progress, devices)
  notes["initial_model_test_accuracy"] = [float(a) for a in parallel.fetch(accuracy)]
  examples = protocols.judge(protocols.labeled_only(ys, labeled, rounds), predictions, y, 0)
  return examples, notes


def run_experiment(config: ml_collections.ConfigDict, dataset: Dataset, *,
                   on_eval: Callable[[list[dict]], None] | None = None,
                   progress: bool = True,
                   devices: Sequence[jax.Device] | None = None,
                   resume: Snapshot | None = None,
                   records: Sequence[dict] = (),
                   on_snapshot: Callable[[Snapshot], None] | None = None,
                   snapshot_every: int = 0,
                   stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
  """Trains every regime in ``config.regimes`` for every seed and evaluates them.

  Args:
    config: a validated experiment config.
    dataset: the data.
    on_eval: called after every evaluation with one record per (regime, seed): the
      round, the step and the metrics that go to ``metrics.jsonl``.
    progress: whether to show a progress bar with each regime's mean test accuracy.
    devices: the devices to train on (default: all), through :func:`make_mesh`.
    resume: a snapshot from ``on_snapshot`` to carry on from, with ``records`` the
      first ``resume.num_records`` records that ``on_eval`` was given before it.
    on_snapshot: called with a :class:`Snapshot` after the first evaluation at or
      past every multiple of ``snapshot_every`` training steps (never if 0), after
      the last one, and when ``stop`` asks to stop.
    stop: polled after every evaluation; True ends the experiment early.

  Returns:
    ``{"regimes": {regime: {metric: [one per seed]}}, "num_train": ..., "num_test": ...}``
    (and ``initial_model_test_accuracy`` for the feedback protocol): the final
    evaluation of every run, ready for ``results.json``; None if ``stop`` ended it.
  """
  regimes, seeds = tuple(config.regimes), config.num_seeds
  rounds, n = config.feedback_rounds, len(dataset.y_train)
  total_steps = config.steps * rounds
  keys = seed_keys(config)
  initial = config.initial_steps if config.protocol == "feedback" else 0
  done = resume.step if resume else 0
  bar = tqdm(total=total_steps + initial, initial=done + (initial if resume else 0),
             desc=f"{config.dataset}/{config.protocol}", disable=not progress,
             unit="step", dynamic_ncols=True)
  tile = lambda a: jnp.concatenate([a] * len(regimes))
  # Runs are regime-major: run r * seeds + s is regime r, seed s.
  run_regimes = jnp.repeat(jnp.array([REGIME_IDS[r] for r in regimes]), seeds)
  trainer = Trainer(config, dataset, total_steps, make_mesh(config, devices))
  y = jnp.asarray(dataset.y_train)

  def per_regime(values):
    """Splits a per-run sequence into one list of seeds per regime (runs are regime-major)."""
    return {r: list(values[i * seeds:(i + 1) * seeds]) for i, r in enumerate(regimes)}

  def evaluate(round_, stats):
    # One transfer from the devices per evaluation.
    metrics, alive, diverged_at, steps, stats = parallel.fetch(
        (trainer.test_metrics(state), state.alive, state.diverged_at, state.step, stats))
    if stats is not None:
      # Training loss and largest logit over the steps each run was alive for.
      live = stats.alive.sum(0)
      with np.errstate(invalid="ignore"):  # inf - inf in a diverging step's loss
        loss = np.where(live > 0, np.where(stats.alive, stats.loss, 0).sum(0) / np.maximum(live, 1),
                        np.nan)
      max_logit = np.where(stats.alive, stats.max_logit, -np.inf).max(0)
    new = []
    step = int(steps[0])
    for run, regime in enumerate(np.repeat(regimes, seeds)):
      record = {"round": round_, "step": step, "regime": str(regime), "seed": run % seeds}
      record.update({k: _float(v[run]) for k, v in metrics.items()})
      record["train_loss"] = None if stats is None else _float(loss[run])
      record["max_logit"] = None if stats is None else _float(max_logit[run])
      record["diverged"] = not bool(alive[run])
      record["diverged_at_step"] = None if alive[run] else int(diverged_at[run])
      new.append(record)
    if on_eval is not None:
      on_eval(new)
    bar.set_postfix({r.split("_")[0]: f"{np.mean(a):.3f}"
                     for r, a in per_regime(metrics["test_accuracy"]).items()})
    return new

  if resume:
    examples, notes, records = resume.examples, dict(resume.notes), list(records)
    state = resume.state
    if len(records) != resume.num_records:
      raise ValueError(f"resuming needs the snapshot's {resume.num_records} records, got {len(records)}.")
  else:
    examples, notes = first_round_examples(config, dataset, keys, bar, devices)
    examples = jax.tree.map(tile, examples)
    state = trainer.init(tile(keys["init"]), tile(keys["batches"]))
    records = evaluate(0, None)
  examples = trainer.shard(examples)
  next_snapshot = (done // snapshot_every + 1) * snapshot_every if snapshot_every else None

  for round_ in range(rounds):
    start = round_ * config.steps
    if done >= start + config.steps:
      continue  # finished before the snapshot resumed from
    if round_ > 0 and done == start:
      examples = protocols.judge(examples, trainer.train_predictions(state), y, round_)
    for length in _chunks(config.steps, config.eval_every, first=done - start):
      state, stats = trainer.train(state, examples, run_regimes, length)
      done += length
      bar.update(length)
      records.extend(evaluate(round_ + 1, stats))
      stopping = stop is not None and stop()
      due = next_snapshot is not None and done >= next_snapshot
      if on_snapshot is not None and (due or done == total_steps or stopping):
        on_snapshot(Snapshot(done, state, examples, notes, len(records)))
        if snapshot_every:
          next_snapshot = (done // snapshot_every + 1) * snapshot_every
      if stopping:
        bar.close()
        return None
  bar.close()

  runs = len(run_regimes)
  final = records[-runs:]
  positives, negatives = parallel.fetch(examples.counts())
  columns = {key: [r[key] for r in final]
             for key in ("test_accuracy", "test_nll", "train_loss", "max_logit", "param_norm",
                         "diverged", "diverged_at_step")}
  # Records come one per run per evaluation, in run order.
  columns["best_test_accuracy"] = [max(r["test_accuracy"] for r in records[run::runs])
                                   for run in range(runs)]
  columns["num_positive"] = [int(c) for c in positives]
  columns["num_negative"] = [int(c) for c in negatives]
  split = {key: per_regime(values) for key, values in columns.items()}
  results: dict[str, Any] = {
      "regimes": {r: {key: split[key][r] for key in columns} for r in regimes}}
  results["num_train"] = n
  results["num_test"] = len(dataset.y_test)
  results["num_devices"] = trainer.mesh.size
  results.update(notes)
  return results
