"""The demo's claims hold in the numbers it prints."""

import math

from experiments.benchmarks import demo_losses
from jaxsoftmax import losses


def test_gap_rows_show_the_naive_forms_failing_and_ours_not():
  for gap, (
    (naive, naive_grad),
    (clipped, clipped_grad),
    (ours, ours_grad),
  ) in demo_losses.gap_rows():
    # Closed form: -log(1 - p_0) = log1p(exp(gap) / 3) ~ gap - log 3 for a large gap.
    expected = math.log1p(math.exp(gap) / 3) if gap < 50 else gap - math.log(3.0)
    assert math.isclose(ours, expected, rel_tol=4e-7 * (1 + gap))
    assert 0.98 <= ours_grad <= 1.0
    if gap >= 17:
      assert math.isinf(naive) and math.isnan(naive_grad)
      assert clipped_grad == 0.0  # the clipped form has stopped learning
    if gap >= 20:
      assert clipped < ours  # and it under-reports the loss


def test_training_negated_diverges_complement_settles():
  neg = demo_losses.train(losses.negated_nll)
  comp = demo_losses.train(losses.complement_nll)
  # negated: the objective falls by about lr * 1 per step, without bound.
  assert neg[-1][1] < -150 and neg[-1][2] > 150
  assert all(b[1] < a[1] - 40 for a, b in zip(neg[1:], neg[2:]))
  # complement: the loss is near 0 and the gap grows ever more slowly.
  assert 0 < comp[-1][1] < 0.01
  assert comp[-1][2] - comp[-2][2] < comp[1][2] - comp[0][2]
