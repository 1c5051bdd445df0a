"""Checks shared by the bilevel methods, which take their losses at call time."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def all_finite(tree: Any) -> jax.Array:
    """A boolean scalar: every entry of every leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return functools.reduce(jnp.logical_and, leaves, jnp.asarray(True))


def check_scalar_loss(name: str, loss: Callable[..., jax.Array], *args: Any) -> None:
    """Raises ValueError naming ``name`` unless ``loss(*args)`` is a scalar (checked abstractly,
    with ``jax.eval_shape``: nothing is computed)."""
    shape = jax.eval_shape(loss, *args)
    if not isinstance(shape, jax.ShapeDtypeStruct) or shape.shape != ():
        got = getattr(shape, "shape", shape)
        raise ValueError(
            f"{name} must return a scalar, got a value of shape {got}. Sum or average it "
            f"(for example jnp.mean of the per-example losses)."
        )
