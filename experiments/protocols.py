"""Where the training examples come from: true labels, judged predictions, wrong labels.

An experiment's examples live in a fixed-size table with one slot per training
example per feedback round (slot ``r * n + i`` holds round ``r``'s example for input
``i``). Each slot is empty, a positive example ("x_i is label") or a negative
example ("x_i is not label"). A negative slot may also hold a set of further wrong
labels of the same input (``wrong``: int32 ``[..., rounds * n, M]``, -1 where unused),
which the complement losses then take as one set: ``complementary`` draws sets of
``num_negatives`` labels, and :func:`judge` on a table made by :func:`with_sets`
accumulates each input's wrong predictions over the feedback rounds into one set. Every
function here is pure and works on any leading batch shape (seeds, regimes), so a whole
experiment's tables are built at once.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxsoftmax_experiments import _deferred

jax = _deferred.module("jax")
jnp = _deferred.module("jax.numpy")

EMPTY, POSITIVE, NEGATIVE = 0, 1, 2


class Examples(NamedTuple):
  """A table of examples: ``label`` and ``kind`` int32 ``[..., rounds * n]``, and
  optionally ``wrong`` int32 ``[..., rounds * n, M]``, further wrong labels per slot."""

  label: jax.Array
  kind: jax.Array
  wrong: jax.Array | None = None
  reference: jax.Array | None = None  # float32 [..., slots]: log p_ref(label | x), for NPO

  def counts(self) -> tuple[jax.Array, jax.Array]:
    """The numbers of positive and of negative examples, over the last axis."""
    return (jnp.sum(self.kind == POSITIVE, axis=-1), jnp.sum(self.kind == NEGATIVE, axis=-1))


def labeled_mask(key: jax.Array, n: int, num_labeled: int) -> jax.Array:
  """A bool ``[n]`` mask of ``num_labeled`` inputs drawn without replacement."""
  chosen = jax.random.permutation(key, n)[:num_labeled]
  return jnp.zeros(n, bool).at[chosen].set(True)


def _table(label, kind, rounds):
  """Round 0's slots from ``label`` and ``kind`` ``[..., n]``; later rounds empty."""
  pad = [(0, 0)] * (label.ndim - 1) + [(0, (rounds - 1) * label.shape[-1])]
  return Examples(jnp.pad(label.astype(jnp.int32), pad), jnp.pad(kind.astype(jnp.int32), pad))


def supervised(y: jax.Array, rounds: int = 1) -> Examples:
  """Every input with its true label."""
  return _table(y, jnp.full(y.shape, POSITIVE), rounds)


def labeled_only(y: jax.Array, labeled: jax.Array, rounds: int = 1) -> Examples:
  """The labeled inputs with their true labels; the rest empty."""
  return _table(y, jnp.where(labeled, POSITIVE, EMPTY), rounds)


def transition_matrix(num_classes: int, bias: float) -> jax.Array:
  """``T[y, l]``: the probability that the wrong label shown for class y is l.

  With probability ``bias`` it is ``(y + 1) mod K``; otherwise it is uniform over the
  K - 1 wrong labels. ``bias = 0`` is the uniform complementary-label setting.
  """
  k = num_classes
  uniform = (1.0 - jnp.eye(k)) / (k - 1)
  shift = jnp.roll(jnp.eye(k), 1, axis=1)
  return bias * shift + (1.0 - bias) * uniform


def wrong_labels(key: jax.Array, y: jax.Array, num_classes: int, bias: float = 0.0) -> jax.Array:
  """One wrong label per input, drawn from ``transition_matrix(num_classes, bias)[y]``."""
  if num_classes < 2:
    raise ValueError(f"wrong labels need at least 2 classes, got {num_classes}.")
  log_t = jnp.log(transition_matrix(num_classes, bias))
  return jax.random.categorical(key, log_t[y]).astype(jnp.int32)


def wrong_label_sets(
  key: jax.Array, y: jax.Array, num_classes: int, count: int, bias: float = 0.0
) -> jax.Array:
  """``count`` distinct wrong labels per input, int32 ``[n, count]``.

  Drawn without replacement from ``transition_matrix(num_classes, bias)[y]`` by the
  Gumbel top-k trick; ``count = 1`` draws exactly what :func:`wrong_labels` draws.
  """
  if not 1 <= count <= num_classes - 1:
    raise ValueError(
      f"count must be in [1, {num_classes - 1}] (the wrong labels of "
      f"{num_classes} classes), got {count}."
    )
  if count == 1:
    return wrong_labels(key, y, num_classes, bias)[..., None]
  log_t = jnp.log(transition_matrix(num_classes, bias))[y]
  noisy = log_t + jax.random.gumbel(key, log_t.shape)
  return jax.lax.top_k(noisy, count)[1].astype(jnp.int32)


def complementary(
  key: jax.Array,
  y: jax.Array,
  labeled: jax.Array,
  num_classes: int,
  *,
  bias: float = 0.0,
  rounds: int = 1,
  num_negatives: int = 1,
) -> Examples:
  """Labeled inputs with their true labels; every other input with ``num_negatives``
  distinct wrong labels, one negative example holding them as a set."""
  if num_negatives == 1:
    wrong = wrong_labels(key, y, num_classes, bias)
    return _table(jnp.where(labeled, y, wrong), jnp.where(labeled, POSITIVE, NEGATIVE), rounds)
  sets = wrong_label_sets(key, y, num_classes, num_negatives, bias)
  table = _table(
    jnp.where(labeled, y, sets[..., 0]), jnp.where(labeled, POSITIVE, NEGATIVE), rounds
  )
  rest = jnp.where(labeled[..., None], -1, sets[..., 1:])
  pad = [(0, 0)] * (rest.ndim - 2) + [(0, (rounds - 1) * rest.shape[-2]), (0, 0)]
  return table._replace(wrong=jnp.pad(rest, pad, constant_values=-1))


def with_reference(examples: Examples, log_probs: jax.Array) -> Examples:
  """The table with each slot's reference log-probability of its label, from a reference
  model's ``log_probs`` ``[..., n, K]`` of every training input."""
  n = log_probs.shape[-2]
  slots = examples.label.shape[-1]
  inputs = jnp.arange(slots) % n
  per_slot = jnp.take(log_probs, inputs, axis=-2)  # [..., slots, K]
  label = jnp.maximum(examples.label, 0)[..., None]
  return examples._replace(reference=jnp.take_along_axis(per_slot, label, axis=-1)[..., 0])


def with_sets(examples: Examples, size: int) -> Examples:
  """The table with room for ``size`` further wrong labels per slot (all unused), so
  that :func:`judge` accumulates each input's wrong predictions into one set."""
  return examples._replace(wrong=jnp.full((*examples.label.shape, size), -1, jnp.int32))


def judge(examples: Examples, predictions: jax.Array, y: jax.Array, round_: int) -> Examples:
  """Fills round ``round_``'s slots with a judge's verdicts on ``predictions``.

  An input that already has a positive example is not shown again. For every other
  input, a right prediction becomes a positive example with that label and a wrong one
  a negative example "not that label".

  On a table with sets (``examples.wrong``, from :func:`with_sets` with ``size >=
  rounds - 1``), a wrong prediction's negative example holds every wrong label the
  input has been given so far, each once: the new one as ``label``, the earlier ones in
  ``wrong``, and the input's earlier negative slot is emptied. Each input then has at
  most one negative example, the set of all its wrong predictions.

  Args:
    examples: the table, ``[..., rounds * n]``.
    predictions: int ``[..., n]``, the predicted class of every training input.
    y: int ``[n]``, the true labels the judge holds.
    round_: which round's slots to fill.

  Returns:
    The table with that round's slots filled.
  """
  n = y.shape[-1]
  shape = examples.kind.shape
  kind = examples.kind.reshape(*shape[:-1], -1, n)
  label = examples.label.reshape(*shape[:-1], -1, n)
  resolved = jnp.any(kind == POSITIVE, axis=-2)
  right = predictions == y
  new_kind = jnp.where(resolved, kind[..., round_, :], jnp.where(right, POSITIVE, NEGATIVE))
  new_label = jnp.where(resolved, label[..., round_, :], predictions.astype(jnp.int32))
  if examples.wrong is not None:
    return _accumulate(examples, kind, label, new_kind, new_label, resolved, round_)
  kind = kind.at[..., round_, :].set(new_kind)
  label = label.at[..., round_, :].set(new_label)
  return examples._replace(label=label.reshape(shape), kind=kind.reshape(shape))


def _accumulate(examples, kind, label, new_kind, new_label, resolved, round_):
  """:func:`judge` on a table with sets; ``kind`` and ``label`` are ``[..., rounds, n]``."""
  shape = examples.kind.shape
  size = examples.wrong.shape[-1]
  wrong = examples.wrong.reshape(*kind.shape, size)
  negative = kind == NEGATIVE  # at most one slot per input
  old_label = jnp.max(jnp.where(negative, label, -1), axis=-2)  # [..., n]
  old_wrong = jnp.max(jnp.where(negative[..., None], wrong, -1), axis=-3)  # [..., n, size]
  members = jnp.concatenate([old_label[..., None], old_wrong], axis=-1)
  members = jnp.where(members == new_label[..., None], -1, members)  # each label once
  # Sorted in decreasing order the unused -1s go last; the earlier set has at most
  # round_ <= size labels, so the first ``size`` columns keep all of them.
  members = -jnp.sort(-members, axis=-1)[..., :size]
  moved = ~resolved & (new_kind == NEGATIVE)  # [..., n]
  kind = jnp.where(moved[..., None, :] & negative, EMPTY, kind)
  wrong = jnp.where((moved[..., None, :] & negative)[..., None], -1, wrong)
  kind = kind.at[..., round_, :].set(new_kind)
  label = label.at[..., round_, :].set(new_label)
  wrong = wrong.at[..., round_, :, :].set(jnp.where(moved[..., None], members, -1))
  return examples._replace(
    label=label.reshape(shape), kind=kind.reshape(shape), wrong=wrong.reshape(*shape, size)
  )
