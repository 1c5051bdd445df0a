"""The distribution of training tasks that learned optimizers are meta-trained on."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from metaopt.tasks._regression import _check_count
from metaopt.tasks._training_tasks import (
    ACTIVATIONS,
    DATASETS,
    PARAMETERIZATIONS,
    TrainingTask,
    _check_choice,
    _check_scale,
    mlp_task,
)
from metaopt.tasks._transformer import transformer_task

#: The data sets that learned optimizers are evaluated on, never met in meta-training by
#: default: ``("wine", "breast_cancer")``.
HELD_OUT_DATASETS = ("wine", "breast_cancer")
#: The default data sets of :func:`sample_training_task`, :data:`DATASETS` without
#: :data:`HELD_OUT_DATASETS`: ``("digits", "blobs", "diabetes", "teacher")``.
TRAINING_DATASETS = tuple(name for name in DATASETS if name not in HELD_OUT_DATASETS)
# Transformers of the distribution: (width, heads, layers) drawn from these.
_TRANSFORMER_SHAPES = tuple((w, h, n) for w in (32, 64) for h in (2, 4) for n in (1, 2))


def _generator(key: Any) -> np.random.Generator:
    """A NumPy generator seeded by the data of a concrete PRNG key, or by an integer."""
    if isinstance(key, numbers.Integral) and not isinstance(key, bool) and key >= 0:
        return np.random.default_rng(int(key))
    try:
        typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        data = np.asarray(jax.random.key_data(key) if typed else key)
    except (AttributeError, TypeError) as error:  # not an array, or a tracer
        raise TypeError(
            f"key must be a concrete PRNG key or a non-negative int, got {key!r}. The sampled "
            "configuration fixes array shapes, so sample the task outside jax.jit and vmap."
        ) from error
    if data.dtype != np.uint32 or data.ndim != 1:
        raise TypeError(
            f"key must be a single PRNG key (jax.random.key(0)) or a non-negative int, got an "
            f"array of dtype {data.dtype} and shape {data.shape}."
        )
    return np.random.default_rng(data.tolist())


def _check_options(name: str, values: Any, check: Callable[[str, Any], Any], example: str) -> tuple:
    """``values`` as a non-empty tuple, each element checked by ``check(name, element)``."""
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(
            f"{name} must be a non-empty sequence, got {name}={values!r}. "
            f"Use for example {name}={example}."
        )
    try:
        return tuple(check(name, value) for value in values)
    except ValueError as error:
        raise ValueError(f"{name}={tuple(values)!r} has an invalid entry: {error}") from error


def sample_training_task(
    key: Any,
    *,
    datasets: Sequence[str] = TRAINING_DATASETS,
    widths: Sequence[int] = (8, 16, 32, 64),
    depths: Sequence[int] = (1, 2, 3),
    activations: Sequence[str] = ACTIVATIONS,
    batch_sizes: Sequence[int] = (16, 32, 64, 128),
    init_scales: Sequence[float] = (0.5, 0.71, 1.0, 1.41, 2.0),
    parameterization: str = "standard",
    transformer_probability: float = 0.0,
) -> TrainingTask:
    """Draws one training task from the meta-training distribution of learned optimizers.

    With probability ``transformer_probability`` the task is a :func:`transformer_task` of
    width 32 or 64, 2 or 4 heads and 1 or 2 blocks; otherwise it is an :func:`mlp_task` whose
    data set, width, depth, activation, batch size and initial scale are each drawn uniformly
    from the given choices (every hidden layer gets the same width). The batch size, initial
    scale and parameterization apply to both kinds.

    The configuration fixes array shapes, so it is a Python value: it is drawn with NumPy from
    the data of ``key``, the same key always gives the same task, and ``key`` must be concrete
    (call this outside ``jax.jit``). The choices are finite sets so that meta-training meets a
    bounded number of configurations, and compiles each once (the constructors return the same
    object for the same configuration). Meta-training in the style of Metz et al. (2022, VeLO)
    draws a new task of this kind for each truncated unroll; ``jax.vmap`` over seeds then gives
    a batch of tasks of that configuration.

    The default data sets, :data:`TRAINING_DATASETS`, leave out :data:`HELD_OUT_DATASETS`
    (``"wine"`` and ``"breast_cancer"``), on which learned optimizers are evaluated; pass them
    in ``datasets`` explicitly to train on them.

    Example:
      >>> import jax
      >>> from metaopt.tasks import sample_training_task
      >>> task = sample_training_task(jax.random.key(3))
      >>> task.name
      'mlp-diabetes-w32-tanh-b64-init2-standard'
      >>> task is sample_training_task(jax.random.key(3))  # deterministic in the key
      True
      >>> params = jax.vmap(task.init)(jax.random.split(jax.random.key(0), 8))  # 8 seeds
      >>> params[0]["w"].shape
      (8, 10, 32)

    Args:
      key: a concrete JAX PRNG key, or a non-negative int.
      datasets: names from :data:`DATASETS` to draw from.
      widths: hidden widths to draw from (positive integers).
      depths: numbers of hidden layers to draw from (positive integers).
      activations: names from :data:`ACTIVATIONS` to draw from.
      batch_sizes: minibatch sizes to draw from (positive integers).
      init_scales: factors on the initial weights to draw from (positive numbers); the default
        is spaced by :math:`\\sqrt{2}` from 0.5 to 2.
      parameterization: ``"standard"`` or ``"mup"``, for every task drawn.
      transformer_probability: the probability, in [0, 1], of drawing a transformer task.

    Returns:
      A :class:`TrainingTask`.

    Raises:
      TypeError: if ``key`` is not a concrete key or a non-negative int.
      ValueError: if a choice is empty or not as described above.
    """
    datasets = _check_options("datasets", datasets, _dataset_name, "TRAINING_DATASETS")
    widths = _check_options("widths", widths, _check_count, "(16, 32)")
    depths = _check_options("depths", depths, _check_count, "(1, 2)")
    activations = _check_options("activations", activations, _activation_name, '("relu",)')
    batch_sizes = _check_options("batch_sizes", batch_sizes, _check_count, "(32, 64)")
    init_scales = _check_options("init_scales", init_scales, _check_scale, "(0.5, 1.0, 2.0)")
    _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    probability = transformer_probability
    if isinstance(probability, bool) or not isinstance(probability, numbers.Real):
        probability = math.nan
    if not 0 <= probability <= 1:
        raise ValueError(
            f"transformer_probability must be a number in [0, 1], got "
            f"transformer_probability={transformer_probability!r}. Use 0.0 for MLPs only."
        )

    rng = _generator(key)
    pick = lambda choices: choices[rng.integers(len(choices))]
    batch_size, init_scale = pick(batch_sizes), pick(init_scales)
    if rng.random() < probability:
        width, heads, layers = pick(_TRANSFORMER_SHAPES)
        return transformer_task(width, heads, layers, batch_size, init_scale, parameterization)
    hidden_sizes = (pick(widths),) * pick(depths)
    return mlp_task(
        pick(datasets), hidden_sizes, pick(activations), batch_size, init_scale, parameterization
    )


def _dataset_name(name: str, value: Any) -> str:
    return _check_choice(name, value, DATASETS)


def _activation_name(name: str, value: Any) -> str:
    return _check_choice(name, value, ACTIVATIONS)
