"""A short demonstration of the losses on one confidently wrong prediction.

For logits ``[gap, 0, 0, 0]`` and the negative feedback "class 0 is wrong", it
prints the complement likelihood and its gradient on class 0 from the naive forms
and from :func:`jaxsoftmax.losses.complement_nll`, then trains the logits on that
feedback with the negated-gradient objective and with the complement likelihood.
Run:

    python -m experiments.benchmarks.demo_losses
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsoftmax import losses, naive

GAPS = (5.0, 10.0, 15.0, 17.0, 20.0, 50.0, 1e3, 1e4)
FORMS = {
  "log(1 - softmax)": naive.log1m_softmax,
  "clipped to [1e-7, 1 - 1e-7]": naive.clipped_log1m_softmax,
  "complement_nll": losses.complement_nll,
}


def gap_rows() -> list[tuple[float, list[tuple[float, float]]]]:
  """For each gap, (loss, d/dz_0) of -log(1 - p_0) from each form, in FORMS order."""
  rows = []
  for gap in GAPS:
    z = jnp.array([gap, 0.0, 0.0, 0.0], jnp.float32)
    cells = []
    for fn in FORMS.values():
      loss, grad = jax.value_and_grad(lambda z: fn(z, 0))(z)
      cells.append((float(loss), float(grad[0])))
    rows.append((gap, cells))
  return rows


def gap_table() -> str:
  """Markdown table of gap_rows()."""
  lines = [
    "| gap | " + " | ".join(f"{name}: loss, d/dz0" for name in FORMS) + " |",
    "|---:|" + "---|" * len(FORMS),
  ]
  for gap, cells in gap_rows():
    lines.append(f"| {gap:g} | " + " | ".join(f"{l:.6g}, {g:.3g}" for l, g in cells) + " |")
  return "\n".join(lines)


def train(objective, steps: int = 200, lr: float = 0.5) -> list[tuple[int, float, float]]:
  """Gradient descent on the logits [2, 1, 0] with feedback "class 0 is wrong".

  Returns (step, objective, logit gap z_1 - z_0) every 50 steps.
  """
  step = jax.jit(lambda z: z - lr * jax.grad(lambda z: objective(z, 0))(z))
  z = jnp.array([2.0, 1.0, 0.0], jnp.float32)
  rows = []
  for i in range(steps + 1):
    if i % 50 == 0:
      rows.append((i, float(objective(z, 0)), float(z[1] - z[0])))
    z = step(z)
  return rows


def main() -> None:
  print("-log p(y != 0 | x) for logits [gap, 0, 0, 0] in float32, and its gradient on z_0")
  print()
  print(gap_table())
  print()
  print("Training the logits [2, 1, 0] on 'class 0 is wrong' (gradient descent, lr 0.5):")
  print()
  print("| step | negated_nll: objective, gap z1-z0 | complement_nll: objective, gap z1-z0 |")
  print("|---:|---|---|")
  for (i, neg, neg_gap), (_, comp, comp_gap) in zip(
    train(losses.negated_nll), train(losses.complement_nll)
  ):
    print(f"| {i} | {neg:.4g}, {neg_gap:.4g} | {comp:.3g}, {comp_gap:.4g} |")
  print()
  print(
    "negated_nll keeps pushing the gap apart without bound; complement_nll stops "
    "once p(class 0) is small."
  )


if __name__ == "__main__":
  main()
