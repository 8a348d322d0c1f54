"""The one regime table of every kind: how a training run uses its examples.

A regime is one entry: its name, the per-example loss it applies to positives and to
negatives (each a function of the head, the head's training output, the batch and the
training setup), and what else it needs. Adding a regime is adding an entry to
:data:`REGIMES`. The trainer groups runs by regime, so a run computes only its own regime's losses.

The classifier's regimes take one label per example (:data:`NAMES`); the language model
takes the same entries on token targets; the multi-label objectives
(:data:`LABEL_SET_NAMES`) need several true labels per example (``LABEL_SETS``), and a
kind that has no label sets is refused them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

from jaxsoftmax_experiments import _deferred
from jaxsoftmax_experiments.protocols import NEGATIVE, POSITIVE

jax = _deferred.module("jax")
jnp = _deferred.module("jax.numpy")
losses = _deferred.module("jaxsoftmax.losses")

# (head, head output, batch of examples, setup) -> per-example loss, [batch]
ExampleLoss = Callable[..., "jax.Array"]

# What a regime may need; config validation checks each.
FLAT_LOGITS = "flat_logits"  # a softmax head (the loss is on all K logits)
TRANSITION = "transition_matrix"  # the protocol's T: uniform or biased wrong labels
ONE_WRONG_LABEL = "one_wrong_label"  # no sets: num_negatives = 1
REFERENCE = "reference_model"  # a frozen model trained on the labeled inputs alone
LABEL_SETS = "label_sets"  # several true labels per example (the multilabel kind)
JUDGED = "judged_answers"  # answers a language model sampled and a judge marked (lm feedback)
ANSWER_SETS = "answer_sets"  # the negative is every wrong answer of one prompt, as one set
CLIP = 1e-7  # Keras's epsilon: probabilities clipped to [1e-7, 1 - 1e-7]


class LabelSets(NamedTuple):
  """A batch of the multilabel kind: each example's true labels as a bool ``[B, K]`` mask."""

  labels: jax.Array


def _nll(head, out, batch, setup=None):
  return head.nll(out, batch.label)


def _negated(head, out, batch, setup=None):
  return -head.set_nll(out, batch.label, batch.wrong)  # +log P(the wrong labels)


def _complement(head, out, batch, setup=None):
  return head.complement_nll(out, batch.label, batch.wrong)


def _scl_exp(head, out, batch, setup=None):
  return head.flat_loss("scl_exp", out, batch.label)


def _pairwise(head, out, batch, setup=None):
  return head.flat_loss("pairwise_comparison", out, batch.label)


def _forward(head, out, batch, setup):
  return head.flat_loss("forward_nll", out, batch.label, transition=setup.transition())


def _npo(head, out, batch, setup):
  """``(2/beta) log(1 + (p_l / p_ref_l)^beta) = (2/beta) softplus(beta (log p_l - log p_ref_l))``
  with ``log p_l = -nll``, exact from the label kernel. For a sequence of labels (a
  language model's window, ``batch.label`` ``[B, T]`` against ``batch.reference`` ``[B]``)
  ``log p`` is the sequence's: the sum over its tokens."""
  beta = setup.npo_beta
  nll = head.nll(out, batch.label)
  log_p = -jnp.sum(nll.reshape(*batch.reference.shape, -1), axis=-1)
  return (2.0 / beta) * jax.nn.softplus(beta * (log_p - batch.reference))


def _token_unlikelihood(head, out, batch, setup=None):
  """``sum_t -log(1 - p(a_t | prompt, a_<t))`` over a wrong answer's tokens: token-level
  unlikelihood (Welleck et al. 2019) on the answer."""
  return head.token_complement_nll(out, batch.label)


def _complement_set(head, out, batch, setup=None):
  """``-log(1 - sum_j P(a_j))`` over a prompt's distinct wrong answers (``batch.label``
  ``[B, J, T]``, a right answer's slot all -1)."""
  return head.complement_set_nll(out, batch.label)


def _weighted_nll(head, out, batch, setup):
  return setup.wreinforce_lambda * head.nll(out, batch.label)


def _nft(head, out, batch, setup):
  """Negative-aware fine-tuning (Chen et al. 2025, arXiv 2505.18116) on a wrong answer:
  ``sum_t -log max((1 - r R_t) / (1 - r), eps)`` with ``R_t = p(a_t) / p_old(a_t)`` the
  token's likelihood ratio to the model that sampled it and ``r`` the share of that
  prompt's samples judged right (``batch.rate``)."""
  keep = batch.label >= 0
  log_ratio = -head.token_nll(out, batch.label) - batch.reference_tokens
  r = batch.rate[..., None]
  implicit = (1.0 - r * jnp.exp(jnp.minimum(log_ratio, 30.0))) / (1.0 - r)
  per_token = -jnp.log(jnp.maximum(implicit, setup.nft_epsilon))
  return jnp.sum(jnp.where(keep, per_token, 0.0), axis=-1)


def _pmpo_positive(head, out, batch, setup):
  """PMPO (Abdolmaleki et al. 2024, arXiv 2410.04166) on an accepted answer: ``alpha`` times
  its NLL, plus ``beta`` times the sample estimate of KL(pi_ref || pi) (the NLL of the
  sample, less a constant)."""
  return (setup.pmpo_alpha + setup.pmpo_beta) * head.nll(out, batch.label)


def _pmpo_negative(head, out, batch, setup):
  """PMPO on a rejected answer: ``-(1 - alpha)`` times its NLL, plus the KL estimate's
  ``beta`` times its NLL."""
  return (setup.pmpo_beta - (1.0 - setup.pmpo_alpha)) * head.nll(out, batch.label)


def _simnpo(head, out, batch, setup):
  """SimNPO (Fan et al. 2024, arXiv 2410.07163): ``(2/beta) softplus(beta log pi(y) / |y| +
  gamma)``, NPO without a reference, normalised by the answer's length ``|y|``."""
  beta = setup.simnpo_beta
  length = jnp.maximum(jnp.sum(batch.label >= 0, axis=-1), 1)
  log_p = -head.nll(out, batch.label)
  return (2.0 / beta) * jax.nn.softplus(beta * log_p / length + setup.simnpo_gamma)


def _mcl(name):
  return lambda head, out, batch, setup=None: head.set_loss(name, out, batch.label, batch.wrong)


def _unbiased_term(head, out, batch, setup=None):
  """Ishida et al. 2019's per-example term for a complementary label l (uniform T):
  ``sum_j -log p_j - (K - 1)(-log p_l)``, an unbiased estimate of the NLL of the unseen
  true label once averaged; it is negative whenever ``p_l`` is small enough."""
  k = setup.model.num_classes
  every = head.flat_loss("soft_cross_entropy", out, jnp.ones(out.shape, out.dtype))
  return every - (k - 1) * head.nll(out, batch.label)


def _ure(correction):
  """The batch objective of the unbiased risk estimator with a correction (Ishida et al.
  2019): per wrong label k the partial risk ``R_k = (1/K) mean_{l_i = k} term_i`` over the
  batch's negatives; ``ga`` ascends on the negative ``R_k`` when there are any (else
  descends on their sum), ``nn`` sums ``max(R_k, 0)``. Positives add their mean NLL,
  weighted by their share of the batch."""

  def objective(per_example, batch, setup):
    k, size = setup.model.num_classes, per_example.shape[0]
    positive, negative = batch.kind == POSITIVE, batch.kind == NEGATIVE
    positive_part = jnp.sum(jnp.where(positive, per_example, 0.0)) / size
    by_label = (batch.label[:, None] == jnp.arange(k)) & negative[:, None]  # [B, K]
    sums = jnp.sum(jnp.where(by_label, per_example[:, None], 0.0), axis=0)
    risks = sums / jnp.maximum(jnp.sum(by_label, axis=0), 1) / k
    if correction == "ga":
      below = risks < 0
      negative_part = jnp.where(
        jnp.any(below), -jnp.sum(jnp.where(below, risks, 0.0)), jnp.sum(risks)
      )
    else:
      negative_part = jnp.sum(jnp.maximum(risks, 0.0))
    return positive_part + jnp.mean(negative) * negative_part

  return objective


# --- several true labels per example: losses on logits and a [B, K] label mask -----------


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
  per_class = jax.vmap(lambda c: losses.complement_nll(z, jnp.full(z.shape[:-1], c)), out_axes=-1)(
    jnp.arange(k)
  )
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


def _on_sets(loss):
  return lambda head, out, batch, setup=None: loss(out, batch.labels)


@dataclasses.dataclass(frozen=True)
class Regime:
  """One way to train on the examples.

  Attributes:
    name: the name configs use.
    positive: the loss on a positive example "x is y".
    negative: the loss on a negative example "x is not l" (``batch.label`` holds l and
      ``batch.wrong`` any further wrong labels of the same input); None to ignore
      negatives, whose slots are then never drawn into a batch.
    needs: what the regime needs beyond the examples (the flat logits, the protocol's
      transition matrix, one wrong label per input).
    batch_objective: None for the mean of the per-example losses; else a function of
      the per-example losses, the batch and the setup that gives the batch's objective
      (a risk estimator defined per batch, as the unbiased risk estimators are).
    summary: one line for ``--help`` and the documentation.
    scores: for the label-set entries, how predictions are read (``softmax`` or
      ``sigmoid``); None for the others.
    positives: on judged answers, which examples the positive loss sees: ``all`` (the
      labeled ones and the answers judged right), ``labeled`` (the labeled ones alone)
      or ``none`` (no positive term).
  """

  name: str
  positive: ExampleLoss
  negative: ExampleLoss | None
  needs: tuple[str, ...] = ()
  batch_objective: Callable | None = None
  summary: str = ""
  scores: str | None = None
  positives: str = "all"


#: Every regime and objective by name, the one table the kinds train from.
REGIMES: dict[str, Regime] = {
  r.name: r
  for r in (
    Regime("positive_only", _nll, None, summary="nll on the positives; the negatives are ignored"),
    Regime(
      "negated_gradient",
      _nll,
      _negated,
      summary="nll on the positives plus +log p_l (+log P(S) for a set) on the negatives "
      "(the naive method)",
    ),
    Regime(
      "complement_likelihood",
      _nll,
      _complement,
      summary="nll on the positives plus -log(1 - p_l) (-log(1 - P(S)) for a set) on the negatives",
    ),
    Regime(
      "scl_exp",
      _nll,
      _scl_exp,
      needs=(FLAT_LOGITS, ONE_WRONG_LABEL),
      summary="nll on the positives plus exp(p_l) on the negatives (Chou et al. 2020)",
    ),
    Regime(
      "forward",
      _nll,
      _forward,
      needs=(FLAT_LOGITS, TRANSITION, ONE_WRONG_LABEL),
      summary="nll on the positives plus -log (T^T p)_l with the protocol's T (Yu et al. 2018)",
    ),
    Regime(
      "pc",
      _nll,
      _pairwise,
      needs=(FLAT_LOGITS, ONE_WRONG_LABEL),
      summary="nll on the positives plus sum_{k != l} sigmoid(z_l - z_k) (Ishida et al. 2017)",
    ),
    Regime(
      "ure_ga",
      _nll,
      _unbiased_term,
      needs=(FLAT_LOGITS, ONE_WRONG_LABEL),
      batch_objective=_ure("ga"),
      summary="nll on the positives; the unbiased risk estimator with gradient ascent on "
      "negative partial risks, per batch (Ishida et al. 2019)",
    ),
    Regime(
      "ure_nn",
      _nll,
      _unbiased_term,
      needs=(FLAT_LOGITS, ONE_WRONG_LABEL),
      batch_objective=_ure("nn"),
      summary="nll on the positives; the unbiased risk estimator with the non-negative "
      "correction, per batch (Ishida et al. 2019)",
    ),
    Regime(
      "npo",
      _nll,
      _npo,
      needs=(REFERENCE, ONE_WRONG_LABEL),
      summary="nll on the positives plus (2/beta) log(1 + (p_l / p_ref_l)^beta) against a "
      "frozen model trained on the labeled inputs alone (Zhang et al. 2024)",
    ),
    Regime(
      "mcl_log",
      _nll,
      _mcl("complement_set_nll"),
      needs=(FLAT_LOGITS,),
      summary="nll on the positives plus -log(1 - P(S)) on sets S (Feng et al. 2020)",
    ),
    Regime(
      "mcl_mae",
      _nll,
      _mcl("mcl_mae"),
      needs=(FLAT_LOGITS,),
      summary="nll on the positives plus P(S) on sets S (Feng et al. 2020)",
    ),
    Regime(
      "mcl_exp",
      _nll,
      _mcl("mcl_exp"),
      needs=(FLAT_LOGITS,),
      summary="nll on the positives plus exp(-(1 - P(S))) on sets S (Feng et al. 2020)",
    ),
    Regime(
      "labeled_only",
      _nll,
      None,
      needs=(JUDGED,),
      positives="labeled",
      summary="nll on the labeled answers alone: the control, trained as long as the others",
    ),
    Regime(
      "complement_set_likelihood",
      _nll,
      _complement_set,
      needs=(JUDGED, ANSWER_SETS),
      summary="nll on the positives plus -log(1 - sum_j P(a_j)) over each prompt's distinct "
      "wrong answers",
    ),
    Regime(
      "token_unlikelihood",
      _nll,
      _token_unlikelihood,
      needs=(JUDGED,),
      summary="nll on the positives plus sum_t -log(1 - p(a_t)) over a wrong answer's tokens "
      "(Welleck et al. 2019)",
    ),
    Regime(
      "nsr",
      _nll,
      _negated,
      needs=(JUDGED,),
      positives="none",
      summary="+log P(a) on the wrong answers alone: negative sample reinforcement "
      "(Zhu et al. 2025, arXiv 2506.01347)",
    ),
    Regime(
      "w_reinforce",
      _weighted_nll,
      _negated,
      needs=(JUDGED,),
      summary="lambda x nll on the positives plus +log P(a) on the wrong answers: "
      "W-REINFORCE (Zhu et al. 2025, arXiv 2506.01347)",
    ),
    Regime(
      "nft",
      _nll,
      _nft,
      needs=(JUDGED,),
      summary="nll on the positives plus sum_t -log max((1 - r R_t)/(1 - r), eps) on the wrong "
      "answers, R_t the token's ratio to the sampling model and r its prompt's right share: "
      "negative-aware fine-tuning (Chen et al. 2025, arXiv 2505.18116)",
    ),
    Regime(
      "pmpo",
      _pmpo_positive,
      _pmpo_negative,
      needs=(JUDGED,),
      summary="alpha x nll on the accepted answers, -(1 - alpha) x nll on the rejected, plus "
      "beta x the samples' KL(pi_ref || pi) estimate (Abdolmaleki et al. 2024, arXiv 2410.04166)",
    ),
    Regime(
      "simnpo",
      _nll,
      _simnpo,
      needs=(JUDGED,),
      summary="nll on the positives plus (2/beta) softplus(beta log P(a) / |a| + gamma) on the "
      "wrong answers (Fan et al. 2024, arXiv 2410.07163)",
    ),
    Regime(
      "softmax_y_over_size",
      _on_sets(_softmax_targets),
      None,
      needs=(LABEL_SETS, FLAT_LOGITS),
      scores="softmax",
      summary="multilabel_softmax_cross_entropy: softmax with targets Y/|Y|",
    ),
    Regime(
      "sigmoid",
      _on_sets(_sigmoid),
      None,
      needs=(LABEL_SETS, FLAT_LOGITS),
      scores="sigmoid",
      summary="sigmoid_binary_cross_entropy summed over classes",
    ),
    Regime(
      "softmax_plus_complement",
      _on_sets(_softmax_plus_complement),
      None,
      needs=(LABEL_SETS, FLAT_LOGITS),
      scores="softmax",
      summary="softmax with targets Y/|Y| plus -log(1 - p_k) for every k not in Y (complement_nll)",
    ),
    Regime(
      "clipped_softmax",
      _on_sets(_clipped),
      None,
      needs=(LABEL_SETS, FLAT_LOGITS),
      scores="softmax",
      summary="Keras-style: softmax probabilities clipped to [1e-7, 1 - 1e-7], targets Y/|Y|",
    ),
  )
}
#: The regimes of one true label per example (the classifier's and the LM's).
NAMES = tuple(n for n, r in REGIMES.items() if not {LABEL_SETS, JUDGED} & set(r.needs))
#: The regimes only judged answers serve (the language model's feedback experiment).
JUDGED_NAMES = tuple(n for n, r in REGIMES.items() if JUDGED in r.needs)
#: The objectives of several true labels per example (the multi-label kind's).
LABEL_SET_NAMES = tuple(n for n, r in REGIMES.items() if LABEL_SETS in r.needs)
