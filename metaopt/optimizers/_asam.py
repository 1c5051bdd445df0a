"""ASAM: SAM with a scale-invariant (adaptive) neighbourhood.

Kwon, Kim, Park and Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
Learning of Deep Neural Networks", ICML 2021 (arXiv:2102.11600).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from metaopt.optimizers import _common
from metaopt.optimizers._common import ScalarOrSchedule
from metaopt.optimizers._sam import GradFn, init_sharpness_state, next_sharpness_state


def scale_by_asam(
    rho: ScalarOrSchedule = 0.5,
    eta: ScalarOrSchedule = 0.01,
    *,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the gradient by ASAM's gradient at the worst point of an adaptive neighbourhood.

    With :math:`g = \nabla L(\theta)` and the element-wise normalization operator
    :math:`T_\theta = |\theta| + \eta` (the paper's choice for element-wise adaptivity):

    .. math::

       \hat\epsilon = \rho\, \frac{T_\theta^2\, g}{\lVert T_\theta\, g \rVert_2}, \qquad
       g^{\mathrm{ASAM}} = \nabla L(\theta + \hat\epsilon)

    The neighbourhood :math:`\lVert T_\theta^{-1}\epsilon\rVert_2 \le \rho` grows with the
    weights, so the sharpness it measures does not change when a layer is rescaled. Calls
    ``grad_fn`` exactly once per update; a zero gradient gives a zero perturbation.

    Inside ``optax.masked`` or ``optax.multi_transform``, pass the whole parameter tree as
    ``all_params=`` to ``update`` (see :func:`scale_by_sam`). Hyperparameters must be finite
    numbers, arrays or schedules: anything else raises at construction, naming the argument.

    Example:
      >>> import jax, jax.numpy as jnp, metaopt
      >>> loss = lambda p: 0.5 * jnp.sum(p**2)  # gradient p
      >>> params = jnp.array([1.0, 2.0])
      >>> opt = metaopt.scale_by_asam(rho=0.5, eta=0.0)
      >>> grads, _ = opt.update(jax.grad(loss)(params), opt.init(params), params,
      ...                       grad_fn=jax.grad(loss))
      >>> # The perturbation is proportional to |params|**2 * gradient: the weight twice as
      >>> # large moves 8 times as far (SAM would move it twice as far).
      >>> perturbation = grads - params
      >>> print(round(float(perturbation[1] / perturbation[0]), 4))
      8.0

    References:
      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning
      of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

    Args:
      rho: radius of the adaptive neighbourhood (the paper uses about 10 times SAM's rho,
        0.5 to 1.0 on CIFAR).
      eta: offset of the normalization operator, keeps zero weights perturbable (paper: 0.01).
      axis_name: mesh axis over which gradients are averaged (see :func:`scale_by_sam`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``grad_fn=``.
    """
    _common.check_nonnegative("rho", rho, "The paper uses rho between 0.5 and 2.")
    _common.check_nonnegative("eta", eta, "The paper uses eta=0.01.")

    def update_fn(
        updates, state, params=None, *, grad_fn: GradFn | None = None, all_params=None, **extra_args
    ):
        del extra_args
        _common.require_grad_fn("scale_by_asam", grad_fn, params)
        grad_fn = _common.gradient_function("scale_by_asam", grad_fn, updates, params, all_params)
        rho_t = _common.value_at(rho, state.count)
        eta_t = _common.value_at(eta, state.count)
        direction = _common.mean_over_axis(updates, axis_name)
        scale = jax.tree.map(lambda p: (jnp.abs(p) + eta_t).astype(p.dtype), params)
        scaled = jax.tree.map(jnp.multiply, scale, direction)
        norm = _common.global_norm(scaled)
        perturbation = jax.tree.map(jnp.multiply, scale, _common.safe_divide(scaled, norm))
        perturbed = _common.add_scaled(params, perturbation, rho_t)
        asam_gradient = _common.mean_over_axis(grad_fn(perturbed), axis_name)
        gradient_norm = _common.global_norm(direction)
        return _common.cast_like(asam_gradient, updates), next_sharpness_state(state, gradient_norm)

    return optax.GradientTransformationExtraArgs(init_sharpness_state, update_fn)


def asam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.5,
    eta: ScalarOrSchedule = 0.01,
    *,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ASAM with any optax optimizer as the base: ``chain(scale_by_asam(...), base_optimizer)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, metaopt
      >>> loss = lambda p: jnp.sum(jnp.square(p - 3.0))
      >>> opt = metaopt.asam(optax.sgd(0.1), rho=0.1)
      >>> params = jnp.ones(3)
      >>> state = opt.init(params)
      >>> for _ in range(100):
      ...     grads = jax.grad(loss)(params)
      ...     updates, state = opt.update(grads, state, params, grad_fn=jax.grad(loss))
      ...     params = optax.apply_updates(params, updates)
      >>> print(bool(loss(params) < 0.01))
      True

    References:
      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning
      of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

    Args:
      base_optimizer: the optax transform that turns ASAM's gradient into an update.
      rho: radius of the adaptive neighbourhood.
      eta: offset of the normalization operator.
      axis_name: mesh axis over which gradients are averaged.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; call ``update(..., grad_fn=...)``.
    """
    _common.check_transform("base_optimizer", base_optimizer)
    return optax.chain(scale_by_asam(rho, eta, axis_name=axis_name), base_optimizer)
