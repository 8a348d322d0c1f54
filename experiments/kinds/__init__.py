"""The kinds of experiment the framework runs, by the name ``config.kind`` gives.

A kind brings only what is its own: its data, its model, its loss on a batch, how its
runs advance between evaluations, its evaluation and host-side metrics, and the
contents of its results, summary and curves. The state of a run (``training.RunState``),
the optimizer step under the one divergence rule (``training.apply_update``), the state
of every run with the step (``training.State``, the classifier's ``loop.State``), its
shardings and the loop over evaluations (``training.evaluations``) exist once. So do
the command line, the config checks, the workdir (lock, config check, resume,
checkpoint cadence, the record of finished outputs), the progress display and Ctrl-C,
in :mod:`jaxsoftmax_experiments.execute`, which drives every kind through this
interface:

- ``load(config)``: the data (raises ``data.DataError`` naming what is wrong);
- ``check(config, data, memory_bytes)``: the config against its data and the memory
  (raises ``config.ConfigError`` naming a key);
- ``plan(config, data, devices)``: everything static, built once (keys the compiled
  programs);
- ``total_steps(plan)``, ``template(plan)`` (the checkpoint's abstract state),
  ``run(plan, state)`` (yields the state after every evaluation, the first before any
  training; resuming is passing a yielded state back);
- ``host(plan, state)`` (what the host reads of a state: fetched, small) and
  ``step(host)``;
- ``records(plan, host, earlier)``: the ``metrics.jsonl`` lines of an evaluation;
- ``progress(plan, records)``: a short text for the progress bar;
- ``outputs(plan, state, records, wall, resumed_from)``: ``(results, summary, plot)``
  with ``plot(path)`` writing ``curves.png``;
- ``arrays(data)``: the arrays the checkpoints' fingerprint hashes;
- ``title(config)``.
"""

from __future__ import annotations

import importlib

NAMES = ("classifier", "lm", "multilabel")


def get(name: str):
  """The module of kind ``name``.

  Example:
    >>> get("multilabel").__name__
    'jaxsoftmax_experiments.kinds.multilabel'
  """
  if name not in NAMES:
    raise ValueError(f"unknown kind {name!r}; the kinds are {', '.join(NAMES)}.")
  return importlib.import_module(f"jaxsoftmax_experiments.kinds.{name}")
