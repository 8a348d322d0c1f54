"""Datasets for the experiments, all available offline.

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes), split
  75/25 stratified with a fixed seed.
- ``mnist1d``: the mnist1d package's generator, ``make_dataset`` with its default
  arguments (4000 train / 1000 test, length-40 signals, 10 classes).
- ``synthetic``: Gaussian class clusters generated from a seed, for fast tests.

Features are standardised with the training split's mean and standard deviation
only, so no test statistic leaks into training.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NAMES = ("digits", "mnist1d", "synthetic")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A fixed train/test split; ``x`` float32 ``[n, *input_shape]``, ``y`` int32 ``[n]``."""
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  @property
  def input_shape(self) -> tuple[int, ...]:
    return self.x_train.shape[1:]


def _standardise(x_train, x_test):
  flat_train = x_train.reshape(len(x_train), -1)
  mean = flat_train.mean(axis=0)
  std = flat_train.std(axis=0)
  std = np.where(std > 0, std, 1.0)  # constant pixels (digits' borders) stay at 0
  norm = lambda x: ((x.reshape(len(x), -1) - mean) / std).reshape(x.shape).astype(np.float32)
  return norm(x_train), norm(x_test)


def _digits():
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  bunch = load_digits()
  x = bunch.images.astype(np.float64)  # [1797, 8, 8]
  x_train, x_test, y_train, y_test = train_test_split(
      x, bunch.target, test_size=0.25, random_state=0, stratify=bunch.target)
  return x_train, y_train, x_test, y_test, 10


def _mnist1d():
  from mnist1d.data import get_dataset_args, make_dataset

  data = make_dataset(get_dataset_args())
  return data["x"], data["y"], data["x_test"], data["y_test"], 10


def _synthetic(num_classes=5, dim=10, n_train=500, n_test=250, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(0.0, 1.5, (num_classes, dim))
  def draw(n):
    y = rng.integers(0, num_classes, n)
    return centres[y] + rng.normal(0.0, 1.0, (n, dim)), y
  x_train, y_train = draw(n_train)
  x_test, y_test = draw(n_test)
  return x_train, y_train, x_test, y_test, num_classes


def load(name: str) -> Dataset:
  """Loads a dataset by name (one of ``NAMES``), standardised on its training split."""
  makers = {"digits": _digits, "mnist1d": _mnist1d, "synthetic": _synthetic}
  if name not in makers:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}.")
  x_train, y_train, x_test, y_test, num_classes = makers[name]()
  x_train, x_test = _standardise(np.asarray(x_train), np.asarray(x_test))
  return Dataset(name, x_train, np.asarray(y_train, np.int32), x_test,
                 np.asarray(y_test, np.int32), num_classes)
