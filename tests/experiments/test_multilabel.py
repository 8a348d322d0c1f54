"""The multi-label study: its metrics on hand-made cases, its data, its objectives against
their formulas, and a short run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsoftmax_experiments import run
from jaxsoftmax_experiments.kinds import multilabel as ml

Y = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0]], bool)
S = np.array([[0.9, 0.8, 0.1, 0.0], [0.2, 0.9, 0.3, 0.1], [0.5, 0.4, 0.3, 0.9]])


def test_precision_and_recall_at_k_by_hand():
  # top-1: {0}, {1}, {3} -> hits 1, 1, 0; top-2: {0,1}, {1,2}, {3,0} -> hits 1, 1, 1.
  assert ml.precision_recall_at_k(S, Y, 1) == pytest.approx((2 / 3, (1 / 2 + 1 + 0) / 3))
  assert ml.precision_recall_at_k(S, Y, 2) == pytest.approx((1 / 2, (1 / 2 + 1 + 1 / 3) / 3))


def test_mean_average_precision_by_hand():
  # class 0: order 0 (0.9, +), 2 (0.5, +), 1 -> AP (1 + 1) / 2 = 1
  # class 1: order 1 (0.9, +), 0 (0.8, -), 2 (0.4, +) -> (1 + 2/3) / 2
  # class 2: order 1 (0.3, -), 2 (0.3, +), 0 (0.1, +) with a stable sort of -score:
  #          1 then 2 (tie kept in index order), then 0 -> (1/2 + 2/3) / 2
  # class 3: no positive: left out.
  want = (1 + (1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 3
  assert ml.mean_average_precision(S, Y) == pytest.approx(want)


def test_example_f1_and_calibration_by_hand():
  predicted = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
  # 2*1/(1+2), 2*1/(1+1), 0/(0+3)
  assert ml.example_f1(predicted, Y) == pytest.approx((2 / 3 + 1 + 0) / 3)
  q = np.array([[0.05, 0.95], [0.05, 0.95]])
  y = np.array([[0, 1], [1, 1]], bool)
  # bin 0: q 0.05, y mean 0.5 (weight 1/2); bin 9: q 0.95, y mean 1 (weight 1/2)
  assert ml.calibration_error(q, y) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)


def test_softmax_sets_take_the_top_count_of_one_over_the_largest_probability():
  p = np.array([[0.5, 0.5, 0.0], [0.34, 0.33, 0.33], [0.9, 0.05, 0.05]])
  got = ml.predict_sets(p, "softmax", 1.0)
  np.testing.assert_array_equal(got, [[1, 1, 0], [1, 1, 1], [1, 0, 0]])


def test_canvases_draw_two_digits_for_classes_0_to_4_and_four_for_5_to_9():
  images = np.stack([np.full((8, 8), c + 1.0) for c in range(10)])  # class c's image is c + 1
  x, y = ml.canvases(images, np.arange(10), 500, seed=0)
  for canvas, labels in zip(x, y):
    shown = [int(canvas[0, 8 * s]) - 1 for s in range(4) if canvas[0, 8 * s] > 0]
    assert len(shown) == (2 if shown[0] < 5 else 4)
    np.testing.assert_array_equal(np.flatnonzero(labels), sorted(set(shown)))
  # The label count depends on the labels: canvases holding a 9 average more labels.
  has9 = y[:, 9]
  assert y[has9].sum(1).mean() > y[~has9].sum(1).mean() + 0.5


@pytest.mark.parametrize(
  "y, message",
  [
    (np.zeros((3, 4, 1)), r"must be \[n, K\] with n = 3"),
    (np.zeros((2, 4)), r"must be \[n, K\] with n = 3"),
    (np.array([[0, 2], [1, 0], [0, 1]]), r"must be binary \(0/1 or bool\), found \[2\]"),
  ],
)
def test_bad_label_masks_are_a_clear_error(y, message):
  with pytest.raises(ml.MultiLabelError, match=message):
    ml.check_labels(y, np.zeros((3, 5)), "y_train")


def test_objectives_match_their_formulas_in_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(4, 5)) * 3)
    y = jnp.asarray(rng.random((4, 5)) < 0.5).at[:, 0].set(True)
    p = jax.nn.softmax(z, -1)
    t = y / y.sum(-1, keepdims=True)
    # Expected: the definitions, with probabilities in float64.
    np.testing.assert_allclose(
      ml.OBJECTIVES["softmax_y_over_size"].loss(z, y), -(t * jnp.log(p)).sum(-1), rtol=1e-10
    )
    np.testing.assert_allclose(
      ml.OBJECTIVES["softmax_plus_complement"].loss(z, y),
      -(t * jnp.log(p)).sum(-1) - jnp.where(y, 0, jnp.log1p(-p)).sum(-1),
      rtol=1e-10,
    )
    np.testing.assert_allclose(
      ml.OBJECTIVES["sigmoid"].loss(z, y),
      -(y * jax.nn.log_sigmoid(z) + ~y * jax.nn.log_sigmoid(-z)).sum(-1),
      rtol=1e-10,
    )
    np.testing.assert_allclose(
      ml.OBJECTIVES["clipped_softmax"].loss(z, y),
      -(t * jnp.log(jnp.clip(p, 1e-7, 1 - 1e-7))).sum(-1),
      rtol=1e-10,
    )


def test_clipping_stops_the_gradient_of_a_confidently_wrong_example():
  z = jnp.array([[-20.0, 0, 0, 0, 0]])  # p_true = e^-20 / 4 ~ 5e-10 < 1e-7
  y = jnp.array([[True, False, False, False, False]])
  exact = jax.grad(lambda z: ml.OBJECTIVES["softmax_y_over_size"].loss(z, y).sum())(z)
  clipped = jax.grad(lambda z: ml.OBJECTIVES["clipped_softmax"].loss(z, y).sum())(z)
  np.testing.assert_allclose(exact[0, 0], -1.0, atol=1e-6)  # p - 1
  np.testing.assert_array_equal(clipped, 0.0)
  # An example without labels: weight 0 for the softmax objective, all-negative for sigmoid.
  empty = jnp.zeros((1, 5), bool)
  assert float(ml.OBJECTIVES["softmax_y_over_size"].loss(z, empty)[0]) == 0.0
  assert np.all(
    jax.grad(lambda z: ml.OBJECTIVES["softmax_y_over_size"].loss(z, empty).sum())(z) == 0
  )
  assert float(ml.OBJECTIVES["sigmoid"].loss(z, empty)[0]) > 0


def test_the_gradient_figure_shows_the_clipped_push_vanish(tmp_path):
  curves = ml.gradient_figure(str(tmp_path / "g.png"))
  assert (tmp_path / "g.png").stat().st_size > 10_000
  gaps = np.array(curves["gaps"])
  far = gaps < -20  # p_true < 1e-7 for K = 10
  assert np.all(np.array(curves["clipped_softmax"])[far] == 0)
  np.testing.assert_allclose(np.array(curves["softmax_y_over_size"])[far], -1.0, atol=1e-5)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("multilabel")
  args = [
    "--config=multilabel_generated",
    f"--workdir={workdir}",
    "--config.steps=300",
    "--config.num_seeds=2",
    "--config.eval_every=150",
    "--config.hidden=(32,)",
    "--progress=false",
    "--compilation_cache=",
  ]
  assert run.main(args) == 0
  return workdir, args, json.loads((workdir / "results.json").read_text())


def test_a_short_run_learns_with_every_objective(short_run):
  workdir, _, results = short_run
  assert list(results["objectives"]) == list(ml.OBJECTIVES)
  for name, r in results["objectives"].items():
    # Chance precision@1 is the mean label density, about 0.2 here.
    assert min(r["precision@1"]) > 0.5, (name, r["precision@1"])
    assert len(r["mAP"]) == 2
  for name in ("softmax_y_over_size", "sigmoid", "softmax_plus_complement"):
    assert results["objectives"][name]["clipped_wrong_steps"] == [0.0, 0.0]
  text = (workdir / "summary.md").read_text()
  assert all(f"| {n} |" in text for n in ml.OBJECTIVES)
  assert (workdir / "curves.png").stat().st_size > 10_000


def test_rerunning_is_a_no_op_and_another_config_is_refused(short_run, capsys):
  workdir, args, results = short_run
  before = (workdir / "results.json").read_text()
  assert run.main(args) == 0
  assert "is complete" in capsys.readouterr().out
  assert run.main([*args, "--config.steps=301"]) == 2
  assert "differing keys: steps (300 -> 301)" in capsys.readouterr().err
  assert (workdir / "results.json").read_text() == before


def test_the_scikit_learn_metrics_equal_their_definitions_on_a_run_sized_case():
  # Reference: the definitions, written out (the by-hand versions they replaced).
  rng = np.random.default_rng(1)
  scores = rng.random((500, 10))
  y = rng.random((500, 10)) < 0.3
  aps = []
  for k in range(10):
    order = np.argsort(-scores[:, k], kind="stable")
    hits = y[order, k]
    aps.append((np.cumsum(hits) / np.arange(1, 501))[hits].mean())
  assert ml.mean_average_precision(scores, y) == pytest.approx(np.mean(aps), rel=1e-12)
  predicted = scores > 0.6
  inter, denom = (predicted & y).sum(-1), predicted.sum(-1) + y.sum(-1)
  want = np.mean(np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0))
  assert ml.example_f1(predicted, y) == pytest.approx(want, rel=1e-12)
  z = rng.normal(size=(4, 10)) * 30
  p = ml._probabilities(z, "softmax")
  e = np.exp(z - z.max(-1, keepdims=True))
  np.testing.assert_allclose(p, e / e.sum(-1, keepdims=True), rtol=1e-12)


def test_a_run_past_the_logit_bound_is_recorded_as_diverged_and_frozen(tmp_path):
  # The one divergence rule (training.apply_update) in this kind too: with a bound below
  # any logit, every run diverges at its first step and stays at its initial parameters.
  args = [
    "--config=multilabel_generated",
    f"--workdir={tmp_path}",
    "--config.steps=20",
    "--config.eval_every=10",
    "--config.num_seeds=2",
    "--config.hidden=(8,)",
    "--config.regimes=('sigmoid',)",
    "--config.logit_bound=1e-6",
    "--progress=false",
    "--compilation_cache=",
  ]
  assert run.main(args) == 0
  r = json.loads((tmp_path / "results.json").read_text())["objectives"]["sigmoid"]
  assert r["diverged"] == [True, True] and r["diverged_at_step"] == [1, 1]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  first = [l["mAP"] for l in lines if l["step"] == 0]
  assert [l["mAP"] for l in lines if l["step"] == 20] == first  # frozen at the start
  assert all(l["diverged"] == (l["step"] > 0) for l in lines)
  assert "| 2/2 |" in (tmp_path / "summary.md").read_text()
