"""SAM: sharpness-aware minimization as a gradient transform that calls ``grad_fn`` once.

Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021 (arXiv:2010.01412).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.optimizers import _common
from metaopt.optimizers._common import ScalarOrSchedule

GradFn = Callable[[optax.Params], optax.Updates]


class SharpnessAwareState(NamedTuple):
    """State of the sharpness-aware transforms (:func:`scale_by_sam` and its family).

    Example:
      >>> import jax, jax.numpy as jnp, optax, metaopt
      >>> loss = lambda p: 0.5 * jnp.sum(p**2)
      >>> params = jnp.array([3.0, 4.0])
      >>> opt = metaopt.sam(optax.sgd(0.1), rho=0.05)
      >>> _, state = opt.update(jax.grad(loss)(params), opt.init(params), params,
      ...                       grad_fn=jax.grad(loss))
      >>> sam_state = state[0]  # the chain's first member is scale_by_sam's state
      >>> print(int(sam_state.count), float(sam_state.gradient_norm))
      1 5.0

    Attributes:
      count: number of updates made so far (int32); schedules of rho and the other
        hyperparameters are evaluated at it.
      gradient_norm: Euclidean norm of the last incoming gradient (averaged over ``axis_name``
        when one is given), a cheap diagnostic of how large the perturbation direction was; a
        non-finite value here means a non-finite gradient reached the transform.
    """

    count: jax.Array
    gradient_norm: jax.Array


def init_sharpness_state(params: optax.Params) -> SharpnessAwareState:
    """Zero counters for a sharpness-aware transform."""
    del params
    return SharpnessAwareState(
        count=jnp.zeros([], jnp.int32), gradient_norm=jnp.zeros([], jnp.float32)
    )


def next_sharpness_state(state: SharpnessAwareState, norm: jax.Array) -> SharpnessAwareState:
    """Advances the counter and records the gradient norm."""
    return SharpnessAwareState(
        count=_common.increment(state.count), gradient_norm=norm.astype(jnp.float32)
    )


def scale_by_sam(
    rho: ScalarOrSchedule = 0.05, *, axis_name: str | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the gradient by SAM's gradient at the worst nearby point.

    With :math:`g = \nabla L(\theta)` the incoming gradient:

    .. math::

       \hat\epsilon = \rho\, \frac{g}{\lVert g \rVert_2}, \qquad
       g^{\mathrm{SAM}} = \nabla L(\theta + \hat\epsilon)

    :math:`\hat\epsilon` is the first-order solution of
    :math:`\max_{\lVert\epsilon\rVert_2 \le \rho} L(\theta + \epsilon)`. The update needs the
    keyword argument ``grad_fn`` (parameters to gradient on the current batch) and calls it
    exactly once, so a SAM step costs two gradient evaluations: the one that produced ``g`` and
    this one. Chain it in front of any optax optimizer (see :func:`sam`). A zero gradient gives a
    zero perturbation (no NaN), in values and in derivatives; a NaN or inf in the gradient shows
    in ``state.gradient_norm`` (NaN or inf) and in the returned gradient.

    Inside ``optax.masked`` or ``optax.multi_transform`` the transform sees only its part of the
    parameters (``optax.MaskedNode`` elsewhere), so ``update`` also needs the whole tree as the
    keyword argument ``all_params``; the perturbation, and its norm, then cover only the leaves
    the transform sees, and the other leaves keep their values when ``grad_fn`` is called.

    Data parallelism: under ``jax.jit`` with a batch sharded over devices, the gradient is
    already the global one and nothing more is needed. Inside ``shard_map`` (or ``pmap``) with
    per-replica gradients, pass the mesh axis as ``axis_name``: the perturbation then uses the
    gradient averaged over that axis, as in the paper's data-parallel SAM, and the returned
    gradient is averaged over it too. Leave ``axis_name`` unset to get per-replica perturbations
    (the paper's m-sharpness).

    Example:
      >>> import jax, jax.numpy as jnp, metaopt
      >>> loss = lambda p: 0.5 * jnp.sum(p**2)  # gradient p
      >>> params = jnp.array([3.0, 4.0])
      >>> opt = metaopt.scale_by_sam(rho=0.5)
      >>> grads, _ = opt.update(jax.grad(loss)(params), opt.init(params), params,
      ...                       grad_fn=jax.grad(loss))
      >>> print(grads)  # the gradient at params + 0.5 * (3, 4) / 5
      [3.3 4.4]

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving Generalization
      <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

    Args:
      rho: radius of the neighbourhood, nonnegative: a float, traced array or schedule.
      axis_name: mesh axis over which gradients are averaged, or None.

    Raises:
      ValueError: ``rho`` is negative, infinite or NaN.
      TypeError: ``rho`` is not a number, an array or a schedule (a string, for example).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``grad_fn=`` (and
      ``all_params=`` inside ``optax.masked``).
    """
    _common.check_nonnegative("rho", rho, "The paper uses rho between 0.01 and 0.5.")

    def update_fn(
        updates, state, params=None, *, grad_fn: GradFn | None = None, all_params=None, **extra_args
    ):
        del extra_args
        _common.require_grad_fn("scale_by_sam", grad_fn, params)
        grad_fn = _common.gradient_function("scale_by_sam", grad_fn, updates, params, all_params)
        rho_t = _common.value_at(rho, state.count)
        direction = _common.mean_over_axis(updates, axis_name)
        norm = _common.global_norm(direction)
        perturbed = _common.add_scaled(params, _common.safe_divide(direction, norm), rho_t)
        sam_gradient = _common.mean_over_axis(grad_fn(perturbed), axis_name)
        return _common.cast_like(sam_gradient, updates), next_sharpness_state(state, norm)

    return optax.GradientTransformationExtraArgs(init_sharpness_state, update_fn)


def sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    *,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SAM with any optax optimizer as the base: ``chain(scale_by_sam(rho), base_optimizer)``.

    One call of ``update`` is one SAM step. The learning rate and weight decay belong to
    ``base_optimizer`` (for example ``optax.sgd(0.1, momentum=0.9)`` as in the paper, or
    ``optax.adamw``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, metaopt
      >>> loss = lambda p: jnp.sum(jnp.square(p - 3.0))
      >>> opt = metaopt.sam(optax.sgd(0.1), rho=0.05)
      >>> params = jnp.zeros(3)
      >>> state = opt.init(params)
      >>> for _ in range(50):
      ...     grads = jax.grad(loss)(params)
      ...     updates, state = opt.update(grads, state, params, grad_fn=jax.grad(loss))
      ...     params = optax.apply_updates(params, updates)
      >>> print(f"{loss(params):.4f}")
      0.0000

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving Generalization
      <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

    Args:
      base_optimizer: the optax transform that turns SAM's gradient into an update; anything
        else (a name such as ``"adam"``, None) is a TypeError.
      rho: neighbourhood radius.
      axis_name: mesh axis over which gradients are averaged (see :func:`scale_by_sam`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; call ``update(grads, state, params,
      grad_fn=...)``.
    """
    _common.check_transform("base_optimizer", base_optimizer)
    return optax.chain(scale_by_sam(rho, axis_name=axis_name), base_optimizer)
