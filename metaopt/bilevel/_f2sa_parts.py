"""F2SA's pieces as plain functions: the multiplier check, the inner loops, the estimate."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.bilevel._solve import _Position


def run_batched(outer_loss, inner_loss, loops, contexts, starts, steps):
    """Both solves in one ``scan``: the inner loss's gradient at ``y`` and ``z`` in one vmap."""
    (y_loop, z_loop), (y_context, z_context) = loops, contexts
    hparams, multiplier = z_context
    inner_gradients = jax.vmap(jax.grad(inner_loss), in_axes=(0, None))
    outer_gradient = jax.grad(outer_loss)

    def body(carry, _):
        (y, y_opt_state), (z, z_opt_state) = carry
        both = inner_gradients(jax.tree.map(lambda a, b: jnp.stack([a, b]), y, z), hparams)
        y_gradient = jax.tree.map(lambda g: g[0], both)
        z_gradient = jax.tree.map(
            lambda f, g: f / multiplier + g[1], outer_gradient(z, hparams), both
        )
        y_next = y_loop.step(y_context, y, y_opt_state, y_gradient)
        z_next = z_loop.step(z_context, z, z_opt_state, z_gradient)
        return (y_next, z_next), None

    start = tuple((p.params, p.opt_state) for p in starts)
    (y, z), _ = jax.lax.scan(body, start, None, length=steps)
    return tuple(
        _Position(params, opt_state, p.step + steps)
        for (params, opt_state), p in zip((y, z), starts, strict=True)
    )


def start_position(params, opt_state) -> _Position:
    return _Position(params, opt_state, jnp.asarray(0, jnp.int32))


def estimate(outer_loss, inner_loss, hparams, y, z, multiplier):
    """:math:`\\nabla_x f(z, x) + \\lambda(\\nabla_x g(z, x) - \\nabla_x g(y, x))`, by jax.grad."""

    def at_z(x):
        return outer_loss(z, x) + multiplier * inner_loss(z, x)

    def at_y(x):
        return multiplier * inner_loss(y, x)

    return jax.tree.map(lambda a, b: a - b, jax.grad(at_z)(hparams), jax.grad(at_y)(hparams))


def run_with_momentum(loop, context, start, previous_context, memory, started, momentum, steps):
    """The inner steps with recursive-momentum (STORM) directions, and the new memory.

    Each step's direction is :math:`d_t = \\nabla\\ell(p_t) + (1 - \\eta)(d_{t-1} -
    \\nabla\\ell(p_{t-1}))`, both gradients of this call's loss :math:`\\ell`; the previous
    point of the first step is the last of the previous call, with its context
    (hyperparameters, multiplier). With a loss that does not change between calls,
    :math:`d_t` is the plain gradient.
    """
    keep = 1.0 - momentum

    def body(carry, _):
        params, opt_state, point, point_context, direction, active = carry
        gradient = loop.gradient(params, context)
        correction = jax.tree.map(
            lambda d, g: d - g, direction, loop.gradient(point, point_context)
        )
        # A select, not a product: at the very first step the correction may be inf.
        new_direction = jax.tree.map(
            lambda g, c: jnp.where(active, g + keep * c, g), gradient, correction
        )
        params_next, opt_state = loop.step(context, params, opt_state, new_direction)
        carry = (params_next, opt_state, params, context, new_direction, jnp.asarray(True))
        return carry, None

    point, direction = memory
    # The previous context in this call's dtypes (an init from Python floats is weak).
    previous_context = jax.tree.map(
        lambda p, c: jnp.asarray(p, jnp.result_type(c)), previous_context, context
    )
    carry = (start.params, start.opt_state, point, previous_context, direction, started)
    carry = jax.lax.scan(body, carry, None, length=steps)[0]
    params, opt_state, point, _, direction, _ = carry
    end = _Position(params, opt_state, start.step + steps)
    return end, (point, direction)


def check_multiplier(multiplier, check_steps):
    if not callable(multiplier):
        if isinstance(multiplier, bool):
            raise TypeError(f"multiplier must be a number or a schedule, got {multiplier!r}.")
        try:
            value = float(multiplier)
        except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
            if isinstance(multiplier, jax.core.Tracer):
                return  # a traced multiplier is checked by nothing but the diagnostics
            raise TypeError(
                "multiplier must be a number, a scalar array or a schedule (a callable of the "
                f"outer step count), got multiplier={multiplier!r}."
            ) from None
        if not value > 0 or not math.isfinite(value):
            raise ValueError(
                "multiplier must be a finite number > 0 (the penalty lambda of F2SA), got "
                f"multiplier={multiplier!r}."
            )
        return
    counts = np.arange(check_steps + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            values = np.asarray(jax.vmap(multiplier)(jnp.asarray(counts)), dtype=float)
        except Exception:  # a schedule written with Python control flow
            values = np.asarray([float(multiplier(int(k))) for k in counts])
    if values.shape != counts.shape:
        raise ValueError(
            "multiplier, a schedule, must return a scalar for each outer step count, got "
            f"values of shape {values.shape[1:]}."
        )
    bad = np.flatnonzero(~(values > 0) | ~np.isfinite(values))
    if bad.size:
        k = int(bad[0])
        raise ValueError(
            f"multiplier must be finite and > 0 at every step, but the schedule gives "
            f"multiplier({k}) = {float(values[k])!r}. Start the schedule at a positive value (for "
            "example optax.linear_schedule(1.0, 1000.0, 1000))."
        )
    drops = np.flatnonzero(np.diff(values) < 0)
    if drops.size:
        k = int(drops[0])
        raise ValueError(
            f"multiplier must not decrease (F2SA's lambda only grows), but the schedule gives "
            f"multiplier({k}) = {float(values[k])!r} > multiplier({k + 1}) = "
            f"{float(values[k + 1])!r}. Use a "
            "non-decreasing schedule, for example optax.linear_schedule(init, peak, steps) "
            "with peak >= init, or a constant."
        )
