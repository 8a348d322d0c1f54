"""The regime table: how a training run uses its positive and negative examples.

A regime is one entry: its name, the per-example loss it applies to positives and to
negatives (each a function of the head, the head's training output and the batch), and
what else it needs. Adding a regime is adding an entry to :data:`REGIMES`. The trainer
groups runs by regime, so a run computes only its own regime's losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jaxsoftmax_experiments import protocols

# (head, head output, batch of examples) -> per-example loss, [batch]
ExampleLoss = Callable[["Head", object, protocols.Examples], jax.Array]  # noqa: F821


def _nll(head, out, batch):
  return head.nll(out, batch.label)


def _negated(head, out, batch):
  return -head.set_nll(out, batch.label, batch.wrong)  # +log P(the wrong labels)


def _complement(head, out, batch):
  return head.complement_nll(out, batch.label, batch.wrong)


@dataclasses.dataclass(frozen=True)
class Regime:
  """One way to train on the examples.

  Attributes:
    name: the name configs use.
    positive: the loss on a positive example "x is y".
    negative: the loss on a negative example "x is not l" (``batch.label`` holds l and
      ``batch.wrong`` any further wrong labels of the same input); None to ignore
      negatives, whose slots are then never drawn into a batch.
    needs: what the regime needs beyond the examples (none of today's regimes needs
      anything; a reference model or a transition matrix would be named here).
    summary: one line for ``--help`` and the README.
  """
  name: str
  positive: ExampleLoss
  negative: ExampleLoss | None
  needs: tuple[str, ...] = ()
  summary: str = ""


REGIMES: dict[str, Regime] = {r.name: r for r in (
    Regime("positive_only", _nll, None,
           summary="nll on the positives; the negatives are ignored"),
    Regime("negated_gradient", _nll, _negated,
           summary="nll on the positives plus +log p_l (+log P(S) for a set) on the negatives "
                   "(the naive method)"),
    Regime("complement_likelihood", _nll, _complement,
           summary="nll on the positives plus -log(1 - p_l) (-log(1 - P(S)) for a set) on the "
                   "negatives"),
)}
NAMES = tuple(REGIMES)
