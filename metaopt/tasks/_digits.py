"""The 8x8 handwritten digits of scikit-learn as a small, deterministic train/test split.

scikit-learn ships the data (1797 images, 64 pixels, 10 classes) inside its wheel, so the task
needs no download; scikit-learn itself is an optional dependency, imported only when the data
are loaded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class ClassificationData(NamedTuple):
    """A train/test split of a classification data set (a pytree of NumPy arrays).

    Example:
      >>> from metaopt.tasks import load_digits
      >>> data = load_digits(seed=0)
      >>> x_train, y_train, x_test, y_test = data  # a NamedTuple: unpacks in field order
      >>> x_train.shape, y_test.shape
      ((1438, 64), (359,))
      >>> # Standardized with the training set's statistics.
      >>> print(abs(float(x_train.mean())) < 1e-3)
      True

    Attributes:
      x_train: training inputs, float32, shape ``(n_train, n_features)``.
      y_train: training labels, int32, shape ``(n_train,)``.
      x_test: test inputs, float32, shape ``(n_test, n_features)``.
      y_test: test labels, int32, shape ``(n_test,)``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> ClassificationData:
    r"""Loads scikit-learn's digits, shuffles them with ``seed`` and splits off a test set.

    Each pixel is standardized with the training set's statistics,
    :math:`x \leftarrow (x - \mu_{\mathrm{train}}) / \sigma_{\mathrm{train}}`, where pixels that
    are constant on the training set keep :math:`\sigma = 1`, so the test set is never used to
    fit anything. The same ``seed`` gives the same split, bit for bit.

    Example:
      >>> from metaopt.tasks import load_digits
      >>> data = load_digits(seed=0)
      >>> data.x_train.shape, data.x_test.shape
      ((1438, 64), (359, 64))
      >>> data.x_train.dtype, data.y_train.dtype
      (dtype('float32'), dtype('int32'))
      >>> sorted(set(data.y_test.tolist()))
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]

    Args:
      seed: seed of the NumPy generator that shuffles the 1797 examples before splitting.
      test_fraction: fraction of the examples held out for testing, strictly between 0 and 1
        (rounded to a whole number of examples).

    Returns:
      A :class:`ClassificationData` with float32 inputs and int32 labels in ``0..9``.

    Raises:
      ImportError: if scikit-learn is not installed.
      ValueError: if ``test_fraction`` leaves the training or the test set empty.
    """
    bunch = _sklearn_datasets("metaopt.tasks.load_digits").load_digits()
    inputs = np.asarray(bunch.data, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int32)
    return ClassificationData(*_split_and_standardize(inputs, labels, seed, test_fraction))


def _sklearn_datasets(caller: str) -> Any:
    """``sklearn.datasets``, or an ImportError that says how to install scikit-learn."""
    try:
        from sklearn import datasets
    except ImportError as error:
        raise ImportError(
            f"{caller} needs scikit-learn, which is an optional dependency. "
            'Install it with: pip install "metaopt-jax[examples]"'
        ) from error
    return datasets


def _split_and_standardize(
    inputs: np.ndarray, targets: np.ndarray, seed: int, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shuffled train/test split, features standardized with the training statistics.

    Returns float32 ``(x_train, targets_train, x_test, targets_test)``; targets keep their dtype.
    """
    num_examples = len(targets)
    num_test = round(test_fraction * num_examples)
    if not 0 < num_test < num_examples:
        raise ValueError(
            f"test_fraction must leave at least one training and one test example out of "
            f"{num_examples}, got test_fraction={test_fraction!r}. Use a value such as 0.2."
        )

    order = np.random.default_rng(seed).permutation(num_examples)
    test_index, train_index = order[:num_test], order[num_test:]
    mean = inputs[train_index].mean(axis=0)
    std = inputs[train_index].std(axis=0)
    std = np.where(std > 0, std, 1.0)

    def standardize(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)

    return (
        standardize(inputs[train_index]),
        targets[train_index],
        standardize(inputs[test_index]),
        targets[test_index],
    )
