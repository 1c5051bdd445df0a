"""N-way K-shot classification episodes drawn from scikit-learn's 8x8 digits.

Omniglot-style few-shot learning without a download: every digit seen at every rotation is a
class of its own (as Omniglot's characters are usually augmented with rotations by multiples of
90 degrees), and the digits are split so that meta-training and meta-testing never share one.
The pools are built once with NumPy; the episodes are drawn with ``jax.random`` and compile.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.tasks._digits import _sklearn_datasets
from metaopt.tasks._regression import Task, _check_count

_ROTATIONS = (0, 90, 180, 270)


class FewShotPool(NamedTuple):
    """The classes episodes are drawn from, each with its images, padded to a common count.

    Example:
      >>> from metaopt.tasks import digits_fewshot_pools
      >>> train_pool, _ = digits_fewshot_pools()
      >>> c = train_pool.names.index("3@90")  # the digit 3 rotated by 90 degrees
      >>> n = int(train_pool.counts[c])
      >>> bool((train_pool.images[c, n:] == 0).all())  # the rows after counts[c] are padding
      True

    Attributes:
      images: float32 array of shape ``(num_classes, max_count, 64)``: image ``j`` of class
        ``c`` is ``images[c, j]``, flattened row by row, for ``j < counts[c]``; the rows after
        that are zero padding and are never sampled.
      counts: int32 array of shape ``(num_classes,)``, the number of images of each class.
      names: one name per class, ``"<digit>@<degrees>"``, for example ``"3@90"``: the digit 3
        rotated by 90 degrees counterclockwise.
    """

    images: jax.Array
    counts: jax.Array
    names: tuple[str, ...]


def _check_choices(name: str, value: object, allowed: Sequence[int], example: str) -> list[int]:
    """Returns ``value`` as a list of distinct ints taken from ``allowed``."""
    try:
        items = list(value)  # type: ignore[call-overload]
    except TypeError:
        items = None
    if (
        not items
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items)
        or any(v not in allowed for v in items)
        or len(set(items)) != len(items)
    ):
        raise ValueError(
            f"{name} must be a non-empty sequence of distinct values from {tuple(allowed)}, got "
            f"{name}={value!r}. Pass for example {name}={example}."
        )
    return [int(v) for v in items]


def digits_fewshot_pools(
    *, test_digits: Sequence[int] = (7, 8, 9), rotations: Sequence[int] = _ROTATIONS
) -> tuple[FewShotPool, FewShotPool]:
    r"""The meta-training and meta-testing class pools of rotated 8x8 digits.

    Each digit :math:`d` at each rotation :math:`r` (``np.rot90`` of the 8x8 image, :math:`r/90`
    quarter turns counterclockwise) is a class named ``"d@r"``. The digits not in
    ``test_digits`` make the meta-training pool and ``test_digits`` the meta-testing pool, so
    the two share no class and not even a digit. By default digits 0 to 6 give
    :math:`7 \times 4 = 28` meta-training classes and digits 7 to 9 give 12 meta-testing
    classes, with 174 to 183 images each.

    Pixel values (0 to 16) are standardized by one scalar affine map,
    :math:`x \leftarrow (x - \mu) / \sigma`, where :math:`\mu` and :math:`\sigma` are the mean
    and standard deviation of all pixels of the meta-training images; the meta-testing pool is
    mapped with the same numbers, so it is used to fit nothing. A single scalar map commutes
    with rotations: a rotated class is exactly the rotation of the unrotated one. The result
    is deterministic.

    Example:
      >>> from metaopt.tasks import digits_fewshot_pools
      >>> train_pool, test_pool = digits_fewshot_pools()
      >>> train_pool.images.shape, test_pool.images.shape
      ((28, 183, 64), (12, 180, 64))
      >>> test_pool.names[:5]
      ('7@0', '7@90', '7@180', '7@270', '8@0')
      >>> test_pool.counts.tolist()[:5]
      [179, 179, 179, 179, 174]

    Args:
      test_digits: the digits (distinct, from 0 to 9, not all ten) held out for meta-testing.
      rotations: the rotations in degrees counterclockwise (distinct, from 0, 90, 180, 270)
        applied to every digit, in the order the classes of a digit are listed.

    Returns:
      ``(train_pool, test_pool)``, two :class:`FewShotPool`. Classes are ordered by digit,
      then by rotation in the order of ``rotations``.

    Raises:
      ImportError: if scikit-learn is not installed.
      ValueError: if ``test_digits`` or ``rotations`` is not as described above.
    """
    test_digits = _check_choices("test_digits", test_digits, range(10), "(7, 8, 9)")
    rotations = _check_choices("rotations", rotations, _ROTATIONS, "(0, 90, 180, 270)")
    train_digits = [d for d in range(10) if d not in test_digits]
    if not train_digits:
        raise ValueError(
            f"test_digits must leave at least one digit for meta-training, got "
            f"test_digits={tuple(test_digits)!r}. Hold out fewer digits, for example (7, 8, 9)."
        )
    bunch = _sklearn_datasets("metaopt.tasks.digits_fewshot_pools").load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target)
    # Rotations permute pixels, so these are also the statistics of the augmented training set.
    train_pixels = images[np.isin(labels, train_digits)]
    mean, std = train_pixels.mean(), train_pixels.std()

    def pool(digits: list[int]) -> FewShotPool:
        classes, names = [], []
        for digit in sorted(digits):
            of_digit = (images[labels == digit] - mean) / std
            for degrees in rotations:
                rotated = np.rot90(of_digit, k=degrees // 90, axes=(1, 2))
                classes.append(rotated.reshape(len(rotated), 64))
                names.append(f"{digit}@{degrees}")
        counts = np.array([len(c) for c in classes], dtype=np.int32)
        padded = np.zeros((len(classes), counts.max(), 64), dtype=np.float32)
        for index, class_images in enumerate(classes):
            padded[index, : len(class_images)] = class_images
        return FewShotPool(jnp.asarray(padded), jnp.asarray(counts), tuple(names))

    return pool(train_digits), pool(test_digits)


def fewshot_tasks(
    key: jax.Array,
    pool: FewShotPool,
    num_tasks: int,
    *,
    ways: int = 5,
    shots: int = 1,
    query_shots: int = 15,
) -> Task:
    r"""A batch of N-way K-shot classification episodes drawn from ``pool``.

    For each task: ``ways`` distinct classes are drawn uniformly from the pool, in a random
    order, and the :math:`i`-th of them gets label :math:`i`, so the mapping from classes to
    labels is random in every task. From each chosen class, ``shots + query_shots`` distinct
    images are drawn uniformly without replacement; the first ``shots`` go to the support set
    and the others to the query set. Examples are grouped by label: the support labels are
    :math:`0, \dots, 0, 1, \dots, 1, \dots` (``shots`` of each), so
    ``inputs.reshape(ways, shots, 64)`` lists the images of each label.

    The function is jit-compatible when the pool is a constant: close over it,
    ``jax.jit(lambda key: fewshot_tasks(key, pool, 16))``, rather than passing it as a traced
    argument (its ``names`` are strings, and its ``counts`` are checked in Python).

    Example:
      >>> from metaopt.tasks import digits_fewshot_pools
      >>> train_pool, _ = digits_fewshot_pools()
      >>> tasks = fewshot_tasks(jax.random.key(0), train_pool, 4, ways=5, shots=2, query_shots=3)
      >>> (x, y), (x_query, y_query) = tasks.support, tasks.query
      >>> x.shape, x_query.shape, tasks.info["classes"].shape
      ((4, 10, 64), (4, 15, 64), (4, 5))
      >>> y[0].tolist()
      [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
      >>> sample = jax.jit(lambda key: fewshot_tasks(key, train_pool, 4, ways=5, shots=2,
      ...                                            query_shots=3))
      >>> bool((sample(jax.random.key(0)).support[0] == x).all())
      True

    References:
      Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016 (the N-way
      K-shot episode); Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast
      Adaptation of Deep Networks", ICML 2017, section 5.2 (rotations as new classes).

    Args:
      key: a JAX PRNG key; the same key gives the same episodes.
      pool: the classes to draw from, for example from :func:`digits_fewshot_pools`.
      num_tasks: number of episodes in the batch (the leading axis of every leaf).
      ways: number of classes per episode, at most the number of classes in the pool.
      shots: number of support images per class.
      query_shots: number of query images per class; ``shots + query_shots`` must not exceed
        the number of images of the smallest class of the pool.

    Returns:
      A :class:`Task` with support inputs of shape ``(num_tasks, ways * shots, 64)`` (float32)
      and int32 labels of shape ``(num_tasks, ways * shots)``, the query likewise with
      ``query_shots``, and ``info`` a dict whose ``"classes"``, int32 of shape
      ``(num_tasks, ways)``, gives the pool index of the class behind each label.

    Raises:
      ValueError: if a size is not a positive integer, ``ways`` exceeds the number of classes,
        or a class has fewer than ``shots + query_shots`` images.
      TypeError: if the pool's arrays are traced.
    """
    num_tasks = _check_count("num_tasks", num_tasks)
    ways = _check_count("ways", ways)
    shots = _check_count("shots", shots)
    query_shots = _check_count("query_shots", query_shots)
    try:
        counts = np.asarray(pool.counts)
    except jax.errors.TracerArrayConversionError as error:
        raise TypeError(
            "pool must hold concrete arrays, but its counts are traced. Close over the pool "
            "instead of passing it to jax.jit or jax.vmap: "
            "jax.jit(lambda key: fewshot_tasks(key, pool, num_tasks))."
        ) from error
    num_classes = pool.images.shape[0]
    if ways > num_classes:
        raise ValueError(
            f"ways must be at most the number of classes in the pool, {num_classes}, got "
            f"ways={ways}. Use ways <= {num_classes}, or a pool with more classes."
        )
    if shots + query_shots > counts.min():
        raise ValueError(
            f"shots + query_shots must be at most {counts.min()}, the number of images of the "
            f"smallest class of the pool, got shots={shots} and query_shots={query_shots}. "
            f"Draw fewer images per class."
        )

    return _fewshot_tasks(
        key,
        jnp.asarray(pool.images),
        jnp.asarray(pool.counts),
        num_tasks=num_tasks,
        ways=ways,
        shots=shots,
        query_shots=query_shots,
    )


@functools.partial(jax.jit, static_argnames=("num_tasks", "ways", "shots", "query_shots"))
def _fewshot_tasks(key, images, counts, *, num_tasks, ways, shots, query_shots):
    num_classes, max_count, features = images.shape
    per_class = shots + query_shots

    def episode(task_key: jax.Array) -> tuple[jax.Array, jax.Array]:
        class_key, image_key = jax.random.split(task_key)
        classes = jax.random.permutation(class_key, num_classes)[:ways]

        def draw(draw_key: jax.Array, label_class: jax.Array) -> jax.Array:
            # A uniform permutation of all rows, with the valid rows moved to the front by a
            # stable sort, is a uniform permutation of the valid rows: no padding is drawn.
            order = jax.random.permutation(draw_key, max_count)
            order = order[jnp.argsort(order >= counts[label_class], stable=True)]
            return images[label_class, order[:per_class]]

        drawn = jax.vmap(draw)(jax.random.split(image_key, ways), classes)
        return drawn, classes.astype(jnp.int32)

    drawn, classes = jax.vmap(episode)(jax.random.split(key, num_tasks))
    support = drawn[:, :, :shots].reshape(num_tasks, ways * shots, features)
    query = drawn[:, :, shots:].reshape(num_tasks, ways * query_shots, features)

    def labels(count: int) -> jax.Array:
        per_task = jnp.repeat(jnp.arange(ways, dtype=jnp.int32), count)
        return jnp.broadcast_to(per_task, (num_tasks, ways * count))

    return Task(
        support=(support, labels(shots)),
        query=(query, labels(query_shots)),
        info={"classes": classes},
    )
