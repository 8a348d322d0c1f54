"""Datasets for the experiments, all available offline.

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes), split
  75/25 stratified with a fixed seed.
- ``mnist1d``: the mnist1d package's generator, ``make_dataset`` with its default
  arguments (4000 train / 1000 test, length-40 signals, 10 classes).
- ``synthetic``: Gaussian class clusters generated from a seed, for fast tests.
- ``npz:PATH``: a user's own data, a NumPy ``.npz`` file with ``x_train``, ``y_train``,
  ``x_test``, ``y_test`` and optionally ``num_classes`` (default: the largest label
  plus one). Inputs are vectors ``[n, d]`` or images ``[n, h, w]`` of real numbers,
  labels integers in ``[0, num_classes)``. Anything else is a :class:`DataError`
  naming the key and what is wrong.

Features are standardised with the training split's mean and standard deviation
only, so no test statistic leaks into training.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NAMES = ("digits", "mnist1d", "synthetic")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
  """A user's data file that cannot be used; the message names the key and the problem."""


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


def standardise(x_train, *others):
  """``x_train`` and ``others`` as float32, each feature shifted and scaled by the training
  split's mean and standard deviation (shapes kept)."""
  flat_train = x_train.reshape(len(x_train), -1)
  mean = flat_train.mean(axis=0)
  std = flat_train.std(axis=0)
  std = np.where(std > 0, std, 1.0)  # constant pixels (digits' borders) stay at 0
  norm = lambda x: ((x.reshape(len(x), -1) - mean) / std).reshape(x.shape).astype(np.float32)
  return [norm(x) for x in (x_train, *others)]


def digits():
  """scikit-learn's digits as images ``[n, 8, 8]``, split 3:1 (stratified, seed 0):
  ``x_train, y_train, x_test, y_test, 10``."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  bunch = load_digits()
  x = bunch.images.astype(np.float64)  # [1797, 8, 8]
  x_train, x_test, y_train, y_test = train_test_split(
    x, bunch.target, test_size=0.25, random_state=0, stratify=bunch.target
  )
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


def check_inputs(path: str, key: str, x: np.ndarray) -> None:
  """The check every kind's npz inputs pass: real numbers, ``[n, d]`` or ``[n, h, w]``,
  all finite; a :class:`DataError` names the first bad entry."""
  if x.dtype.kind not in "fiu":
    raise DataError(f"{path}: {key} must hold real numbers, got dtype {x.dtype}.")
  if x.ndim not in (2, 3):
    raise DataError(
      f"{path}: {key} must be [n, d] vectors or [n, h, w] images, got shape {x.shape}."
    )
  if x.shape[0] == 0:
    raise DataError(f"{path}: {key} holds no examples (shape {x.shape}); every split needs one.")
  if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
    raise DataError(f"{path}: {key}{list(bad)} = {x[bad]} is not finite.")


def _npz(path: str):
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {key: f[key] for key in f.files}
  except (OSError, ValueError, EOFError) as e:
    raise DataError(f"cannot read {path} as a .npz file: {e}") from None
  missing = [k for k in NPZ_KEYS if k not in arrays]
  if missing:
    raise DataError(
      f"{path} has no {', '.join(missing)}; it needs {', '.join(NPZ_KEYS)} "
      f"(and optionally num_classes), found {', '.join(sorted(arrays)) or 'nothing'}."
    )
  x_train, y_train, x_test, y_test = (arrays[k] for k in NPZ_KEYS)
  for key, x in (("x_train", x_train), ("x_test", x_test)):
    check_inputs(path, key, x)
  if x_test.shape[1:] != x_train.shape[1:]:
    raise DataError(
      f"{path}: x_test inputs have shape {x_test.shape[1:]}, x_train's "
      f"{x_train.shape[1:]}; they must match."
    )
  for key, y, x in (("y_train", y_train, x_train), ("y_test", y_test, x_test)):
    if y.dtype.kind not in "iu":
      raise DataError(f"{path}: {key} must hold integer labels, got dtype {y.dtype}.")
    if y.shape != x.shape[:1]:
      raise DataError(
        f"{path}: {key} has shape {y.shape}; it needs one label per input of "
        f"x_{key[2:]}, shape ({x.shape[0]},)."
      )
  if len(y_train) == 0 or len(y_test) == 0:
    raise DataError(f"{path}: both splits need at least one example.")
  if "num_classes" in arrays:
    num_classes = arrays["num_classes"]
    if num_classes.shape != () or num_classes.dtype.kind not in "iu":
      raise DataError(f"{path}: num_classes must be one integer, got {num_classes!r}.")
    num_classes = int(num_classes)
  else:
    num_classes = int(max(y_train.max(), y_test.max())) + 1
  if num_classes < 2:
    raise DataError(f"{path}: num_classes must be at least 2, got {num_classes}.")
  for key, y in (("y_train", y_train), ("y_test", y_test)):
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
      i = int(np.argmax(bad))
      raise DataError(f"{path}: {key}[{i}] = {y[i]} is outside [0, {num_classes}).")
  return x_train.astype(np.float64), y_train, x_test.astype(np.float64), y_test, num_classes


def load(name: str) -> Dataset:
  """Loads a dataset by name (one of ``NAMES``, or ``npz:PATH``), standardised on its
  training split."""
  makers = {"digits": digits, "mnist1d": _mnist1d, "synthetic": _synthetic}
  if name.startswith("npz:"):
    x_train, y_train, x_test, y_test, num_classes = _npz(name[len("npz:") :])
    x_train, x_test = standardise(x_train, x_test)
    return Dataset(
      name,
      x_train,
      np.asarray(y_train, np.int32),
      x_test,
      np.asarray(y_test, np.int32),
      num_classes,
    )
  if name not in makers:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}, or npz:PATH.")
  x_train, y_train, x_test, y_test, num_classes = makers[name]()
  x_train, x_test = standardise(np.asarray(x_train), np.asarray(x_test))
  return Dataset(
    name, x_train, np.asarray(y_train, np.int32), x_test, np.asarray(y_test, np.int32), num_classes
  )
