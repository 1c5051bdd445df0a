"""Synthetic regression data shared by the implicit-differentiation and bilevel tests."""

import jax.numpy as jnp
import numpy as np


def regression_data(n: int = 40, d: int = 6, seed: int = 0):
    """Training inputs and noisy linear targets, and a validation set from another weight vector.

    Returns ``(x, y, x_val, y_val)`` as float64 JAX arrays (under the test session's x64).
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
    x_val = rng.normal(size=(n, d))
    y_val = x_val @ rng.normal(size=d)
    return tuple(jnp.asarray(a) for a in (x, y, x_val, y_val))
