"""Modules imported on first use, so that ``--help`` and the up-front refusals of a command
answer before JAX loads (importing JAX takes seconds, tens of them on a busy machine).

The configuration checks need the names in the regime and head tables, not the losses
behind them: :mod:`regimes`, :mod:`heads` and :mod:`protocols` name JAX, the losses and
the models through :func:`module`, which imports them at the first attribute read.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class _Deferred:
  def __init__(self, name: str):
    self._name = name
    self._module: ModuleType | None = None

  def __getattr__(self, attr: str):
    if self._module is None:
      self._module = importlib.import_module(self._name)
    return getattr(self._module, attr)

  def __repr__(self) -> str:
    return f"<deferred module {self._name!r}>"


def module(name: str):
  """``name`` imported at the first attribute read of the returned object."""
  return _Deferred(name)
