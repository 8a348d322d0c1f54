"""Datasets: fixed splits, shapes, standardisation from training statistics only."""

import numpy as np
import pytest

from jaxsoftmax_experiments import data


@pytest.mark.parametrize(
  "name, shapes",
  [
    # digits: 1797 images, 25% test stratified (scikit-learn's split sizes);
    # mnist1d: make_dataset's defaults, 4000 train / 1000 test of length 40.
    ("digits", ((1347, 8, 8), (450, 8, 8))),
    ("mnist1d", ((4000, 40), (1000, 40))),
    ("synthetic", ((500, 10), (250, 10))),
  ],
)
def test_shapes_and_labels(name, shapes):
  ds = data.load(name)
  assert (ds.x_train.shape, ds.x_test.shape) == shapes
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert set(np.unique(ds.y_train)) == set(range(ds.num_classes))
  assert ds.input_shape == shapes[0][1:]


def test_standardised_on_train_only_and_deterministic():
  ds = data.load("digits")
  flat = ds.x_train.reshape(len(ds.x_train), -1)
  varying = flat.std(axis=0) > 0
  np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(flat.std(axis=0)[varying], 1.0, rtol=1e-4)
  # The test split keeps its own, non-zero mean: its statistics were not used.
  assert np.abs(ds.x_test.reshape(len(ds.x_test), -1).mean(axis=0)).max() > 1e-3
  again = data.load("digits")
  np.testing.assert_array_equal(ds.x_test, again.x_test)
  np.testing.assert_array_equal(ds.y_train, again.y_train)


def test_unknown_name_is_a_clear_error():
  with pytest.raises(
    ValueError, match="unknown dataset 'cifar'; choose one of digits, mnist1d, synthetic"
  ):
    data.load("cifar")
