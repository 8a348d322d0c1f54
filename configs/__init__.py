"""The packaged experiment configs, one file per experiment, each with ``get_config()``.

The folder is ``configs/`` in the source tree and installs as
``jaxsoftmax_experiments.configs``; :func:`names` and :func:`path` find the files through
:mod:`importlib.resources`, so ``--config=NAME`` works from any directory in every
install mode.
"""

from __future__ import annotations

import importlib.resources


def names() -> list[str]:
  """The packaged configs' names, sorted."""
  root = importlib.resources.files(__name__)
  return sorted(
    p.name[:-3] for p in root.iterdir() if p.name.endswith(".py") and not p.name.startswith("_")
  )


def path(name: str) -> str | None:
  """The file of the packaged config ``name``, or None if there is none."""
  entry = importlib.resources.files(__name__) / f"{name}.py"
  return str(entry) if name in names() and entry.is_file() else None
