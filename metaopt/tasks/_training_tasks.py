"""Training tasks for meta-training learned optimizers: MLPs on real and synthetic data.

A :class:`TrainingTask` is one inner training problem as pure functions: initial parameters from
a key, the loss of a minibatch, a minibatch from a key, the full training and test losses, and the
per-tensor update multipliers of muLO. :func:`mlp_task` builds one for an MLP classifier or
regressor on scikit-learn's bundled data or on synthetic data made from a fixed seed, so nothing
is downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.tasks._digits import _sklearn_datasets, _split_and_standardize
from metaopt.tasks._mlp import MLPParams, mlp_apply
from metaopt.tasks._regression import _check_count

_ACTIVATION_FUNCTIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
}
#: The activations of :func:`mlp_task`: ``("relu", "tanh", "gelu", "silu")``.
ACTIVATIONS = tuple(_ACTIVATION_FUNCTIONS)
_CLASSIFICATION = ("digits", "wine", "breast_cancer", "blobs")
_REGRESSION = ("diabetes", "teacher")
#: The data sets of :func:`mlp_task`: ``("digits", "wine", "breast_cancer", "blobs",
#: "diabetes", "teacher")``, classification first.
DATASETS = _CLASSIFICATION + _REGRESSION
PARAMETERIZATIONS = ("standard", "mup")
# The synthetic data sets and every train/test split are made from this seed, so a data set's
# name fixes its numbers.
_DATA_SEED = 0
_TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingTask:
    """One inner training problem of a learned optimizer, as pure functions (hashable, static).

    Every function is pure in its arguments, with the data captured as constants, so
    ``jax.vmap(task.init)(keys)`` initializes a batch of seeds of one configuration and
    ``jax.vmap(task.sample_batch)(keys)`` draws a minibatch for each. The object is compared and
    hashed by identity, which makes it a valid static argument of ``jax.jit``; the constructors
    :func:`mlp_task` and :func:`transformer_task` return the same object for the same
    configuration, so a jitted function compiles once per configuration.

    Example:
      >>> import jax, optax
      >>> from metaopt.tasks import mlp_task
      >>> task = mlp_task("digits", hidden_sizes=(32,), batch_size=64)
      >>> task.name
      'mlp-digits-w32-relu-b64-init1-standard'
      >>> params = task.init(jax.random.key(0))
      >>> optimizer = optax.adam(1e-2)
      >>> state = optimizer.init(params)
      >>> @jax.jit
      ... def step(params, state, key):
      ...     grads = jax.grad(task.loss)(params, task.sample_batch(key))
      ...     updates, state = optimizer.update(grads, state)
      ...     return optax.apply_updates(params, updates), state
      >>> before = task.evaluate(params)["train_loss"]
      >>> for key in jax.random.split(jax.random.key(1), 100):
      ...     params, state = step(params, state, key)
      >>> bool(task.evaluate(params)["train_loss"] < before / 5)
      True

    Attributes:
      name: the configuration, for example ``"mlp-digits-w32-32-relu-b64-init1-standard"``.
      init: ``key -> params``, the initial parameters (a pytree of float32 arrays).
      loss: ``(params, batch) -> scalar``, the mean loss of a minibatch.
      sample_batch: ``key -> batch``, one training minibatch, drawn uniformly with replacement
        from the training set.
      evaluate: ``params -> dict`` of float32 scalars: ``"train_loss"`` and ``"test_loss"`` on
        the whole training and test sets, and ``"train_accuracy"`` and ``"test_accuracy"`` for
        classification tasks.
      update_multipliers: ``params -> pytree`` with the structure of ``params`` and one Python
        float per leaf, muLO's multiplier on the learned update of that tensor (Therien et al.,
        2024): 1 for the input layer's weights and for every bias or other vector,
        :math:`1/\\mathrm{fan\\_in}` for hidden and output weight matrices. The values depend on
        the configuration only (``params`` gives the structure), and they are returned in either
        parameterization: the optimizer decides whether to use them.
    """

    name: str
    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, Any], jax.Array]
    sample_batch: Callable[[jax.Array], Any]
    evaluate: Callable[[Any], dict[str, jax.Array]]
    update_multipliers: Callable[[Any], Any]


def _jitted_task(
    name: str,
    init: Callable,
    loss: Callable,
    sample_batch: Callable,
    evaluate: Callable,
    update_multipliers: Callable,
) -> TrainingTask:
    """A :class:`TrainingTask` whose array functions are jitted, so that eager calls are fast.

    Under an outer ``jax.jit``, ``vmap`` or ``grad`` the inner ``jit`` is traced through.
    """
    jit = jax.jit
    return TrainingTask(
        name, jit(init), jit(loss), jit(sample_batch), jit(evaluate), update_multipliers
    )


def _normal_weights(
    key: jax.Array,
    weights: Sequence[tuple[str, tuple[int, int]]],
    parameterization: str,
    scale: float,
) -> list[jax.Array]:
    """Weight matrices drawn by the rule of their roles, for ``(role, shape)`` pairs.

    Every weight is :math:`\\mathcal{N}(0, 1/\\mathrm{fan\\_in})` times ``scale``, except
    ``"output"`` weights under muP, which are :math:`\\mathcal{N}(0, 1/\\mathrm{fan\\_in}^2)`
    (Yang et al., Tensor Programs V, Table 3, without forward multipliers); ``fan_in = shape[0]``.
    All are cut from one draw of normals, which compiles much faster than one draw per matrix.
    """
    sizes = [math.prod(shape) for _, shape in weights]
    normals = jnp.split(jax.random.normal(key, (sum(sizes),), jnp.float32), np.cumsum(sizes)[:-1])
    drawn = []
    for (role, shape), normal in zip(weights, normals, strict=True):
        fan_in = shape[0]
        std = 1.0 / fan_in if role == "output" and parameterization == "mup" else fan_in**-0.5
        drawn.append(scale * std * normal.reshape(shape))
    return drawn


def _update_multiplier(shape: tuple[int, ...], role: str) -> float:
    """muLO's multiplier: 1 for vectors and input weights, 1/fan_in for other matrices."""
    return 1.0 if len(shape) < 2 or role == "input" else 1.0 / shape[0]


def _matching(params: Any, multipliers: Any, name: str) -> Any:
    """``multipliers``, after checking that ``params`` has the same tree structure."""
    expected, received = jax.tree.structure(multipliers), jax.tree.structure(params)
    if expected != received:
        raise ValueError(
            f"update_multipliers of task {name!r} got parameters of structure {received}, "
            f"expected {expected}. Pass the parameters of this task (from task.init)."
        )
    return multipliers


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {name}={value!r}.")
    return value


def _check_scale(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"{name} must be a finite positive Python number, got {name}={value!r}. "
            f"Use for example {name}=1.0 (it multiplies the initial weights)."
        )
    return float(value)


class _Data(NamedTuple):
    """A standardized train/test split; ``num_outputs`` is 1 for regression."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_outputs: int


@functools.cache
def _load_dataset(name: str) -> _Data:
    """The data set ``name`` of :data:`DATASETS`, split with :data:`_DATA_SEED`."""
    rng = np.random.default_rng(_DATA_SEED)
    if name == "blobs":
        # 4 classes, each a mixture of 3 Gaussian clusters in 16 dimensions: the boundaries
        # between classes are not linear.
        num_classes, clusters, dim, size = 4, 3, 16, 1500
        centers = rng.normal(size=(num_classes * clusters, dim))
        cluster = rng.integers(num_classes * clusters, size=size)
        inputs = centers[cluster] + 0.75 * rng.normal(size=(size, dim))
        targets = (cluster % num_classes).astype(np.int32)
    elif name == "teacher":
        # A random tanh network of width 64 on 16 Gaussian inputs, plus noise of a tenth of its
        # standard deviation.
        dim, width, size = 16, 64, 1500
        inputs = rng.normal(size=(size, dim))
        hidden = np.tanh(inputs @ rng.normal(size=(dim, width)) / math.sqrt(dim))
        targets = hidden @ rng.normal(size=width) / math.sqrt(width)
        targets = targets + 0.1 * targets.std() * rng.normal(size=size)
    else:
        bunch = getattr(_sklearn_datasets("metaopt.tasks.mlp_task"), f"load_{name}")()
        inputs, targets = bunch.data, bunch.target
        if name in _CLASSIFICATION:
            targets = targets.astype(np.int32)
    split = _split_and_standardize(
        np.asarray(inputs, np.float64), np.asarray(targets), _DATA_SEED, _TEST_FRACTION
    )
    x_train, y_train, x_test, y_test = split
    if name in _CLASSIFICATION:
        return _Data(x_train, y_train, x_test, y_test, int(y_train.max()) + 1)
    mean, std = y_train.mean(), y_train.std()
    y_train, y_test = ((y - mean) / std for y in (y_train, y_test))
    return _Data(x_train, y_train.astype(np.float32), x_test, y_test.astype(np.float32), 1)


@functools.cache
def _device_arrays(name: str) -> tuple[jax.Array, ...]:
    """The arrays of :func:`_load_dataset` on the device, shared by every task on them."""
    return tuple(jnp.asarray(array) for array in _load_dataset(name)[:4])


def mlp_task(
    dataset: str = "digits",
    hidden_sizes: Sequence[int] = (32,),
    activation: str = "relu",
    batch_size: int = 32,
    init_scale: float = 1.0,
    parameterization: str = "standard",
) -> TrainingTask:
    r"""An MLP classifier (cross-entropy) or regressor (squared error) as a :class:`TrainingTask`.

    The network is :func:`mlp_apply` with ``activation`` in the hidden layers. Its weights are
    drawn, times ``init_scale``, by

    - ``"standard"``: every weight :math:`\sim \mathcal{N}(0, 1/\mathrm{fan\_in})`, the output
      layer too;
    - ``"mup"``, the maximal update parameterization (Yang et al., "Tensor Programs V", 2021,
      Table 3, in the variant without forward multipliers that muLO uses, Therien et al., 2024):
      input and hidden weights :math:`\sim \mathcal{N}(0, 1/\mathrm{fan\_in})`, output weights
      :math:`\sim \mathcal{N}(0, 1/\mathrm{fan\_in}^2)`;

    and biases start at zero. muP's other half, the per-tensor learning rates, is the task's
    ``update_multipliers``: :math:`1` for the input layer's weights and for biases,
    :math:`1/\mathrm{fan\_in}` for hidden and output weights.

    Data sets (:data:`DATASETS`), all without download, features standardized with the
    training statistics, split 80/20 by a fixed seed:

    - classification: scikit-learn's ``"digits"`` (64 features, 10 classes), ``"wine"``
      (13, 3), ``"breast_cancer"`` (30, 2), and synthetic ``"blobs"`` (16 features, 4 classes,
      each a mixture of 3 Gaussian clusters, 1500 examples);
    - regression, with the target standardized: scikit-learn's ``"diabetes"`` (10 features)
      and synthetic ``"teacher"`` (a random tanh network of width 64 on 16 Gaussian features,
      plus noise of a tenth of its standard deviation, 1500 examples).

    The regression loss is the mean of :math:`(\hat y - y)^2`, so a constant prediction of
    zero scores about 1 on the training set.

    Example:
      >>> import jax
      >>> from metaopt.tasks import mlp_task
      >>> task = mlp_task("wine", hidden_sizes=(16, 16), activation="tanh", parameterization="mup")
      >>> params = task.init(jax.random.key(0))
      >>> [layer["w"].shape for layer in params]
      [(13, 16), (16, 16), (16, 3)]
      >>> [layer["w"] for layer in task.update_multipliers(params)]
      [1.0, 0.0625, 0.0625]
      >>> x, y = task.sample_batch(jax.random.key(1))
      >>> x.shape, y.dtype, task.loss(params, (x, y)).shape
      ((32, 13), dtype('int32'), ())
      >>> sorted(task.evaluate(params))
      ['test_accuracy', 'test_loss', 'train_accuracy', 'train_loss']

    Args:
      dataset: a name in :data:`DATASETS`.
      hidden_sizes: the widths of the hidden layers, at least one positive integer.
      activation: a name in :data:`ACTIVATIONS` (``"relu"``, ``"tanh"``, ``"gelu"``,
        ``"silu"``).
      batch_size: the number of examples of a minibatch.
      init_scale: a positive factor on every initial weight.
      parameterization: ``"standard"`` or ``"mup"``.

    Returns:
      The :class:`TrainingTask`; the same object for the same arguments.

    Raises:
      ImportError: for a scikit-learn data set, if scikit-learn is not installed
        (``pip install "metaopt-jax[examples]"``).
      ValueError: if an argument is not as described above.
    """
    _check_choice("dataset", dataset, DATASETS)
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if isinstance(hidden_sizes, numbers.Integral) or not isinstance(hidden_sizes, Sequence):
        raise ValueError(
            f"hidden_sizes must be a sequence of positive integers, got "
            f"hidden_sizes={hidden_sizes!r}. Use for example hidden_sizes=(32, 32)."
        )
    if not hidden_sizes:
        raise ValueError(
            f"hidden_sizes must list at least one width, got hidden_sizes={hidden_sizes!r}. "
            "Use for example hidden_sizes=(32,)."
        )
    if any(
        isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 for w in hidden_sizes
    ):
        raise ValueError(
            f"hidden_sizes must be positive integers, got hidden_sizes={tuple(hidden_sizes)!r}. "
            "Use for example hidden_sizes=(32, 32)."
        )
    hidden_sizes = tuple(int(width) for width in hidden_sizes)
    batch_size = _check_count("batch_size", batch_size)
    init_scale = _check_scale("init_scale", init_scale)
    return _mlp_task(dataset, hidden_sizes, activation, batch_size, init_scale, parameterization)


@functools.lru_cache(maxsize=256)
def _mlp_task(dataset, hidden_sizes, activation, batch_size, init_scale, parameterization):
    data = _load_dataset(dataset)
    sizes = (data.x_train.shape[1], *hidden_sizes, data.num_outputs)
    shapes = list(itertools.pairwise(sizes))
    roles = ["input"] + ["hidden"] * (len(shapes) - 2) + ["output"]
    weight_roles = list(zip(roles, shapes, strict=True))
    function = _ACTIVATION_FUNCTIONS[activation]
    classification = dataset in _CLASSIFICATION
    x_train, y_train, x_test, y_test = _device_arrays(dataset)
    name = (
        f"mlp-{dataset}-w{'-'.join(map(str, hidden_sizes))}-{activation}-b{batch_size}"
        f"-init{init_scale:g}-{parameterization}"
    )

    def init(key: jax.Array) -> MLPParams:
        weights = _normal_weights(key, weight_roles, parameterization, init_scale)
        return [{"w": w, "b": jnp.zeros(w.shape[1], jnp.float32)} for w in weights]

    def loss_of(params: MLPParams, x: jax.Array, y: jax.Array) -> jax.Array:
        outputs = mlp_apply(params, x, function)
        if classification:
            return optax.softmax_cross_entropy_with_integer_labels(outputs, y).mean()
        return jnp.mean((outputs[:, 0] - y) ** 2)

    def loss(params: MLPParams, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        return loss_of(params, *batch)

    def sample_batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        # int32 indices, so that the batches are the same with and without jax_enable_x64.
        index = jax.random.randint(key, (batch_size,), 0, x_train.shape[0], jnp.int32)
        return x_train[index], y_train[index]

    def evaluate(params: MLPParams) -> dict[str, jax.Array]:
        metrics = {"train_loss": loss_of(params, x_train, y_train)}
        metrics["test_loss"] = loss_of(params, x_test, y_test)
        if classification:
            for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
                correct = jnp.argmax(mlp_apply(params, x, function), axis=-1) == y
                metrics[f"{split}_accuracy"] = jnp.mean(correct.astype(jnp.float32))
        return metrics

    multipliers = [{"w": _update_multiplier(shape, role), "b": 1.0} for role, shape in weight_roles]

    def update_multipliers(params: MLPParams) -> list[dict[str, float]]:
        return _matching(params, multipliers, name)

    return _jitted_task(name, init, loss, sample_batch, evaluate, update_multipliers)
