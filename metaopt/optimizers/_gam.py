"""GAM: gradient norm aware minimization (first-order flatness), with finite-difference HVPs.

Zhang, Xu, Yu, Zou and Cui, "Gradient Norm Aware Minimization Seeks First-Order Flatness and
Improves Generalization", CVPR 2023 (arXiv:2303.03108).
"""

from __future__ import annotations

import jax
import optax

from metaopt.optimizers import _common
from metaopt.optimizers._common import ScalarOrSchedule
from metaopt.optimizers._sam import GradFn, init_sharpness_state, next_sharpness_state


def scale_by_gam(
    rho: ScalarOrSchedule = 0.05,
    alpha: ScalarOrSchedule = 0.1,
    *,
    fd_radius: ScalarOrSchedule | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the gradient by the gradient of GAM's first-order-flatness-penalized loss.

    GAM minimizes :math:`L(\theta) + \alpha R^{(1)}_\rho(\theta)` where the first-order flatness
    :math:`R^{(1)}_\rho(\theta) = \rho \max_{\theta' \in B(\theta, \rho)}
    \lVert\nabla L(\theta')\rVert` is the largest gradient norm in a ball. Its gradient is
    approximated as in the paper's Algorithm 1: one ascent step on the gradient norm, then
    the gradient of the norm at that adversarial point:

    .. math::

       g &= \nabla L(\theta), \qquad
       f = \nabla\lVert\nabla L\rVert(\theta) = H(\theta)\frac{g}{\lVert g\rVert} \\
       \theta^{\mathrm{adv}} &= \theta + \rho\frac{f}{\lVert f\rVert}, \qquad
       g^{\mathrm{adv}} = \nabla L(\theta^{\mathrm{adv}}) \\
       h &= \rho\, H(\theta^{\mathrm{adv}})\frac{g^{\mathrm{adv}}}{\lVert g^{\mathrm{adv}}\rVert},
       \qquad \text{output} = g + \alpha h

    Each Hessian-vector product :math:`H(x)u` with a unit vector :math:`u` is a forward finite
    difference :math:`(\nabla L(x + r u) - \nabla L(x))/r` with :math:`r` = ``fd_radius``, so no
    second derivatives are needed and ``grad_fn`` is called three times per update (four
    gradient evaluations per step, as in the paper's implementation). On a quadratic loss the
    differences are exact. Zero gradients give zero directions, never NaN.

    Inside ``optax.masked`` or ``optax.multi_transform``, pass the whole parameter tree as
    ``all_params=`` to ``update`` (see :func:`scale_by_sam`). Hyperparameters must be finite
    numbers, arrays or schedules: anything else raises at construction, naming the argument.

    Example:
      >>> import jax, jax.numpy as jnp, metaopt
      >>> # On this loss the Hessian is I, so the flatness term's gradient is rho p / |p|.
      >>> loss = lambda p: 0.5 * jnp.sum(p**2)
      >>> params = jnp.array([3.0, 4.0])
      >>> opt = metaopt.scale_by_gam(rho=0.5, alpha=1.0)
      >>> grads, _ = opt.update(jax.grad(loss)(params), opt.init(params), params,
      ...                       grad_fn=jax.grad(loss))
      >>> print(jnp.round(grads, 4))  # (3, 4) + 1.0 * 0.5 * (0.6, 0.8)
      [3.3 4.4]

    References:
      Zhang et al., `Gradient Norm Aware Minimization Seeks First-Order Flatness and Improves
      Generalization <https://arxiv.org/abs/2303.03108>`_, CVPR 2023.

    Args:
      rho: radius :math:`\rho` of the ball in which the gradient norm is maximized.
      alpha: weight :math:`\alpha` of the first-order flatness penalty.
      fd_radius: finite-difference step :math:`r`; None uses ``rho``.
      axis_name: mesh axis over which gradients are averaged (see :func:`scale_by_sam`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``grad_fn=``.
    """
    _common.check_nonnegative("alpha", alpha)
    if fd_radius is None:
        _common.check_positive(
            "rho", rho, "rho is also the finite-difference step unless fd_radius is given."
        )
    else:
        _common.check_nonnegative("rho", rho)
        _common.check_positive("fd_radius", fd_radius, "Pass None to use rho as the step.")

    def update_fn(
        updates, state, params=None, *, grad_fn: GradFn | None = None, all_params=None, **extra_args
    ):
        del extra_args
        _common.require_grad_fn("scale_by_gam", grad_fn, params)
        grad_fn = _common.gradient_function("scale_by_gam", grad_fn, updates, params, all_params)
        rho_t = _common.value_at(rho, state.count)
        alpha_t = _common.value_at(alpha, state.count)
        radius = rho_t if fd_radius is None else _common.value_at(fd_radius, state.count)

        def gradient(x):
            return _common.mean_over_axis(grad_fn(x), axis_name)

        def hessian_times_unit(x, gradient_x):
            """H(x) u for u = gradient_x / |gradient_x|, by a forward difference of step r."""
            unit = _common.safe_divide(gradient_x, _common.global_norm(gradient_x))
            shifted = gradient(_common.add_scaled(x, unit, radius))
            # Multiply by the reciprocal: XLA does so anyway when r is a compile-time constant,
            # and the same arithmetic keeps traced and constant hyperparameters bit-identical.
            inverse_radius = 1.0 / radius
            return jax.tree.map(lambda a, b: (a - b) * inverse_radius, shifted, gradient_x)

        g = _common.mean_over_axis(updates, axis_name)
        f = hessian_times_unit(params, g)
        adversarial = _common.add_scaled(
            params, _common.safe_divide(f, _common.global_norm(f)), rho_t
        )
        h = hessian_times_unit(adversarial, gradient(adversarial))
        output = jax.tree.map(lambda a, b: a + (alpha_t * rho_t * b).astype(a.dtype), g, h)
        return _common.cast_like(output, updates), next_sharpness_state(
            state, _common.global_norm(g)
        )

    return optax.GradientTransformationExtraArgs(init_sharpness_state, update_fn)


def gam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    alpha: ScalarOrSchedule = 0.1,
    *,
    fd_radius: ScalarOrSchedule | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GAM in front of any optax optimizer: ``chain(scale_by_gam(...), base_optimizer)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, metaopt
      >>> loss = lambda p: jnp.sum(jnp.square(p - 3.0))
      >>> opt = metaopt.gam(optax.sgd(0.1), rho=0.05, alpha=0.1)
      >>> params = jnp.zeros(3)
      >>> state = opt.init(params)
      >>> for _ in range(100):
      ...     grads = jax.grad(loss)(params)
      ...     updates, state = opt.update(grads, state, params, grad_fn=jax.grad(loss))
      ...     params = optax.apply_updates(params, updates)
      >>> print(bool(loss(params) < 1e-3))
      True

    References:
      Zhang et al., `Gradient Norm Aware Minimization Seeks First-Order Flatness and Improves
      Generalization <https://arxiv.org/abs/2303.03108>`_, CVPR 2023.

    Args:
      base_optimizer: the optax transform that turns GAM's gradient into an update.
      rho: radius of the ball in which the gradient norm is maximized.
      alpha: weight of the first-order flatness penalty.
      fd_radius: finite-difference step; None uses ``rho``.
      axis_name: mesh axis over which gradients are averaged.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; call ``update(..., grad_fn=...)``.
    """
    _common.check_transform("base_optimizer", base_optimizer)
    return optax.chain(
        scale_by_gam(rho, alpha, fd_radius=fd_radius, axis_name=axis_name), base_optimizer
    )
