"""A multilayer perceptron classifier as plain functions of a parameter pytree."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

# One {"w": (fan_in, fan_out), "b": (fan_out,)} dict per layer, input layer first
# (documented in docs/api/tasks.md: a type alias carries no docstring of its own).
MLPParams = list[dict[str, jax.Array]]


def init_mlp(key: jax.Array, sizes: Sequence[int], dtype: Any = jnp.float32) -> MLPParams:
    r"""Initial parameters of an MLP with layer widths ``sizes`` (input first, classes last).

    Weights are drawn from :math:`\mathcal{N}(0, 2/\mathrm{fan\_in})` (He et al., 2015, suited
    to the ReLU of :func:`mlp_apply`); biases start at zero.

    Example:
      >>> import jax
      >>> from metaopt.tasks import init_mlp
      >>> params = init_mlp(jax.random.key(0), [64, 32, 10])
      >>> [(layer["w"].shape, layer["b"].shape) for layer in params]
      [((64, 32), (32,)), ((32, 10), (10,))]
      >>> params[0]["w"].dtype
      dtype('float32')

    Args:
      key: a JAX PRNG key.
      sizes: widths of the layers, at least two positive integers: input features, any hidden
        widths, number of classes.
      dtype: floating dtype of the parameters.

    Returns:
      A list with one ``{"w": ..., "b": ...}`` dict per layer.
    """
    sizes = list(sizes)
    if len(sizes) < 2 or any(not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(
            f"sizes must list at least two positive integers (inputs, ..., classes), got "
            f"sizes={sizes!r}. For digits with one hidden layer use [64, 128, 10]."
        )
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (fan_in, fan_out), dtype) * math.sqrt(2.0 / fan_in),
            "b": jnp.zeros((fan_out,), dtype),
        }
        for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_apply(
    params: MLPParams,
    x: jax.Array,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
) -> jax.Array:
    r"""Logits of the MLP: hidden layers with ``activation`` (ReLU), then a linear output layer.

    .. math::  h_0 = x, \quad h_{i} = \sigma(h_{i-1} W_i + b_i), \quad
               \mathrm{logits} = h_{L-1} W_L + b_L

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt.tasks import init_mlp, mlp_apply
      >>> params = init_mlp(jax.random.key(0), [64, 32, 10])
      >>> mlp_apply(params, jnp.zeros((5, 64), jnp.float32)).shape
      (5, 10)

    Args:
      params: parameters from :func:`init_mlp`.
      x: inputs of shape ``(batch, sizes[0])``.
      activation: the elementwise nonlinearity :math:`\sigma` of the hidden layers.

    Returns:
      Logits of shape ``(batch, sizes[-1])``.
    """
    *hidden, last = params
    for layer in hidden:
        x = activation(x @ layer["w"] + layer["b"])
    return x @ last["w"] + last["b"]


def cross_entropy_loss(params: MLPParams, x: jax.Array, y: jax.Array) -> jax.Array:
    r"""Mean softmax cross-entropy of the MLP on integer labels ``y``.

    .. math::  L = -\frac{1}{n} \sum_{j=1}^{n} \log \mathrm{softmax}(\mathrm{logits}_j)_{y_j}

    Example:
      >>> import jax
      >>> from metaopt.tasks import cross_entropy_loss, init_mlp, load_digits
      >>> data = load_digits(seed=0)
      >>> params = init_mlp(jax.random.key(0), [64, 32, 10])
      >>> before = cross_entropy_loss(params, data.x_train, data.y_train)
      >>> grad = jax.grad(cross_entropy_loss)(params, data.x_train, data.y_train)
      >>> params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grad)  # one gradient step
      >>> bool(cross_entropy_loss(params, data.x_train, data.y_train) < before)
      True

    Args:
      params: parameters from :func:`init_mlp`.
      x: inputs of shape ``(batch, sizes[0])``.
      y: integer labels of shape ``(batch,)``.

    Returns:
      The mean loss, a scalar in the parameters' dtype.
    """
    logits = mlp_apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params: MLPParams, x: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of the examples whose largest logit is at the true label, as float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.tasks import accuracy
      >>> # A single linear layer that copies its two inputs to two class logits.
      >>> params = [{"w": jnp.eye(2, dtype=jnp.float32), "b": jnp.zeros(2, jnp.float32)}]
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], jnp.float32)
      >>> float(accuracy(params, x, jnp.array([0, 1, 1, 1])))
      0.75

    Args:
      params: parameters from :func:`init_mlp`.
      x: inputs of shape ``(batch, sizes[0])``.
      y: integer labels of shape ``(batch,)``.

    Returns:
      The accuracy, a float32 scalar in [0, 1].
    """
    predictions = jnp.argmax(mlp_apply(params, x), axis=-1)
    return jnp.mean((predictions == y).astype(jnp.float32))
