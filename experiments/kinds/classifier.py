"""The classifier kind: the feedback experiment, the complementary-label protocols and the
supervised baselines, on digits, MNIST-1D, synthetic clusters or a user's npz file.

Its state, loop and pure training functions are :mod:`jaxsoftmax_experiments.loop` and
:mod:`jaxsoftmax_experiments.training`; this module answers the framework's kind
interface (:mod:`jaxsoftmax_experiments.kinds`) with them.
"""

from __future__ import annotations

import numpy as np

from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import data as data_lib
from jaxsoftmax_experiments import loop, parallel, report


def load(config):
  return data_lib.load(config.dataset)


def check(config, dataset, memory_bytes):
  config_lib.validate(
    config, len(dataset.y_train), dataset.num_classes, dataset.input_shape, memory_bytes
  )


def plan(config, dataset, devices):
  return loop.make_plan(config, dataset, devices)


PROGRESS = "test accuracy"


def total_steps(config) -> int:
  return config.steps * config.feedback_rounds


template = loop.template
run = loop.run


def host(plan_, state):
  return parallel.fetch(loop.light(state))


def step(host_) -> int:
  return int(host_.step)


def records(plan_, host_, earlier):
  del earlier
  return loop.records(plan_, host_)


def progress(plan_, new) -> tuple[str, dict[str, float]]:
  accuracy = {}
  for r in new:
    accuracy.setdefault(r["regime"], []).append(r["test_accuracy"])
  return PROGRESS, {
    r: float(np.mean([np.nan if v is None else v for v in a])) for r, a in accuracy.items()
  }


def outputs(plan_, state, records_, resolved, wall, resumed_from):
  results = loop.results(plan_, parallel.fetch(loop.light(state, examples=True)))
  results["config"] = resolved
  c = plan_.config
  summary = report.summary_markdown(results, wall, resumed_from)
  title = f"{c.protocol} protocol on {c.dataset}, {c.num_seeds} seeds"
  return results, summary, lambda path: report.plot_curves(records_, path, title=title)


def arrays(dataset):
  """What the checkpoints' fingerprint hashes: the splits and the class count (as before
  there were kinds, so that earlier classifier runs still resume)."""
  return (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test, dataset.num_classes)


def title(config) -> str:
  return f"{config.dataset}/{config.protocol}"
