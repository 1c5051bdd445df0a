"""The ridge-regression problem of the implicit benchmarks: data, outer loss, exact hypergradient.

Shared by :mod:`benchmarks.implicit` (metaopt against jaxopt) and
:mod:`benchmarks.implicit_inner_steps` (``bilevel.solve`` against the number of inner steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INITIAL_PENALTY = 1e-2  # lambda at which the hypergradients are taken, for every feature
SCALE_DECADES = 1.0  # feature standard deviations spread log-uniformly over this many decades


def ridge_data(
    rng: np.random.Generator, samples: int, features: int, validation: int, dtype: np.dtype
) -> dict[str, np.ndarray]:
    """Training and validation data of a linear model with unequally scaled features.

    Feature standard deviations are spread log-uniformly over ``SCALE_DECADES`` decades (as in
    data that has not been standardized), which makes the Hessian moderately ill-conditioned so
    that CG needs tens of iterations; targets are a random linear function plus unit noise.
    """
    scales = np.logspace(0.0, -SCALE_DECADES, features)
    truth = rng.standard_normal(features)

    def sample(count):
        x = rng.standard_normal((count, features)) * scales
        return x.astype(dtype), (x @ truth + rng.standard_normal(count)).astype(dtype)

    x, y = sample(samples)
    x_val, y_val = sample(validation)
    return {"x": x, "y": y, "x_val": x_val, "y_val": y_val}


def validation_loss(w: jax.Array, x_val: jax.Array, y_val: jax.Array) -> jax.Array:
    """Outer loss: half the mean squared validation error of the weights ``w``."""
    return 0.5 * jnp.mean((x_val @ w - y_val) ** 2)


def reference_hypergradient(
    gram: np.ndarray,
    moment: np.ndarray,
    log_penalty: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
) -> np.ndarray:
    """Exact hypergradient of :func:`validation_loss` at the ridge solution, in float64 NumPy.

    With :math:`A = G + \\operatorname{diag}(\\lambda)`, :math:`w = A^{-1} m` and
    :math:`u = A^{-1} \\nabla_w L`, differentiating :math:`A w = m` gives
    :math:`\\partial L / \\partial \\lambda_j = -u_j w_j`, and
    :math:`\\partial L / \\partial \\log\\lambda_j = -u_j w_j \\lambda_j`.
    """
    gram, moment, x_val, y_val = (np.asarray(a, np.float64) for a in (gram, moment, x_val, y_val))
    penalty = np.exp(np.asarray(log_penalty, np.float64))
    a = gram + np.diag(penalty)
    w = np.linalg.solve(a, moment)
    outer_gradient = x_val.T @ (x_val @ w - y_val) / len(y_val)
    u = np.linalg.solve(a, outer_gradient)
    return -u * w * penalty
