"""Gradient regularization by finite differences (F-GR, B-GR and the central variant).

Karakida, Takase, Hayase and Osawa, "Understanding Gradient Regularization in Deep Learning:
Efficient Finite-Difference Computation and Implicit Bias", ICML 2023 (arXiv:2210.02720).
"""

from __future__ import annotations

from typing import Literal

import jax
import optax

from metaopt.optimizers import _common
from metaopt.optimizers._common import ScalarOrSchedule
from metaopt.optimizers._sam import GradFn, init_sharpness_state, next_sharpness_state

Direction = Literal["forward", "backward", "central"]
_DIRECTIONS = ("forward", "backward", "central")


def scale_by_gradient_regularization(
    gamma: ScalarOrSchedule = 0.05,
    epsilon: ScalarOrSchedule = 0.05,
    *,
    direction: Direction = "forward",
    normalize: bool = False,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the gradient by the gradient of the gradient-norm-penalized loss.

    The penalized loss is :math:`L(\theta) + \frac{\gamma}{2}\lVert\nabla L(\theta)\rVert_2^2`,
    whose gradient is :math:`g + \gamma H g` with :math:`g = \nabla L(\theta)` and Hessian
    :math:`H`. The Hessian-vector product is taken by a finite difference along :math:`g`
    with step :math:`\epsilon`, with no second derivative:

    .. math::

       \text{forward (F-GR)}:&\quad H g \approx
         \frac{\nabla L(\theta + \epsilon g) - g}{\epsilon} \\
       \text{backward (B-GR)}:&\quad H g \approx
         \frac{g - \nabla L(\theta - \epsilon g)}{\epsilon} \\
       \text{central}:&\quad H g \approx
         \frac{\nabla L(\theta + \epsilon g) - \nabla L(\theta - \epsilon g)}{2\epsilon}

    Forward and backward call ``grad_fn`` once (two gradient evaluations per step, the cost of
    SAM); central calls it twice and is exact to second order. The paper finds the forward
    (ascent) difference generalizes best and that its implicit bias strengthens as the ascent
    step :math:`\epsilon` grows; with :math:`\epsilon = \gamma` F-GR is SAM without the
    normalization of the ascent direction.

    The paper's difference steps along the raw gradient, so the step length
    :math:`\epsilon\lVert g\rVert` follows the gradient's scale: large gradients (early
    training, badly scaled losses) make it coarse, tiny ones make it cancel in floating point.
    ``normalize=True`` steps along :math:`g/\lVert g\rVert` instead, a fixed length
    :math:`\epsilon` as in SAM, and rescales the difference by :math:`\lVert g\rVert`; it
    approximates the same :math:`Hg`.

    Inside ``optax.masked`` or ``optax.multi_transform``, pass the whole parameter tree as
    ``all_params=`` to ``update`` (see :func:`scale_by_sam`). Hyperparameters must be finite
    numbers, arrays or schedules: anything else raises at construction, naming the argument.

    Example:
      >>> import jax, jax.numpy as jnp, metaopt
      >>> loss = lambda p: 0.5 * jnp.sum(p**2)  # Hessian I, so g + gamma H g = (1 + gamma) g
      >>> params = jnp.array([3.0, 4.0])
      >>> opt = metaopt.scale_by_gradient_regularization(gamma=0.1)
      >>> grads, _ = opt.update(jax.grad(loss)(params), opt.init(params), params,
      ...                       grad_fn=jax.grad(loss))
      >>> print(jnp.round(grads, 4))
      [3.3 4.4]

    References:
      Karakida et al., `Understanding Gradient Regularization in Deep Learning: Efficient
      Finite-Difference Computation and Implicit Bias <https://arxiv.org/abs/2210.02720>`_,
      ICML 2023.

    Args:
      gamma: penalty strength :math:`\gamma`, nonnegative.
      epsilon: finite-difference step :math:`\epsilon` along the raw gradient, positive.
      direction: ``"forward"``, ``"backward"`` or ``"central"``.
      normalize: step a fixed length :math:`\epsilon` along the normalized gradient instead of
        :math:`\epsilon g`.
      axis_name: mesh axis over which gradients are averaged (see :func:`scale_by_sam`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``grad_fn=``.
    """
    _common.check_nonnegative("gamma", gamma)
    _common.check_positive("epsilon", epsilon, "The finite-difference step must be above 0.")
    if direction not in _DIRECTIONS:
        raise ValueError(
            f"direction must be one of {_DIRECTIONS}, got direction={direction!r}. "
            f"'forward' (F-GR) is the paper's recommended choice."
        )

    def update_fn(
        updates, state, params=None, *, grad_fn: GradFn | None = None, all_params=None, **extra_args
    ):
        del extra_args
        _common.require_grad_fn("scale_by_gradient_regularization", grad_fn, params)
        grad_fn = _common.gradient_function(
            "scale_by_gradient_regularization", grad_fn, updates, params, all_params
        )
        gamma_t = _common.value_at(gamma, state.count)
        epsilon_t = _common.value_at(epsilon, state.count)
        g = _common.mean_over_axis(updates, axis_name)
        norm = _common.global_norm(g)
        # The difference is taken along `probe`; `scale` converts it back to a product with g.
        probe, scale = (_common.safe_divide(g, norm), norm) if normalize else (g, 1.0)

        def gradient_at(step):
            perturbed = _common.add_scaled(params, probe, step)
            return _common.mean_over_axis(grad_fn(perturbed), axis_name)

        if direction == "forward":
            difference, width = jax.tree.map(lambda a, b: a - b, gradient_at(epsilon_t), g), 1.0
        elif direction == "backward":
            difference, width = jax.tree.map(lambda a, b: a - b, g, gradient_at(-epsilon_t)), 1.0
        else:
            plus, minus = gradient_at(epsilon_t), gradient_at(-epsilon_t)
            difference, width = jax.tree.map(lambda a, b: a - b, plus, minus), 2.0
        # The hyperparameters' scalar first, with a reciprocal: XLA folds constant factors
        # together (and divides by a constant as a product), and the same arithmetic keeps
        # traced and constant hyperparameters bit-identical.
        coefficient = (gamma_t * (1.0 / (width * epsilon_t))) * scale
        regularized = jax.tree.map(
            lambda a, d: a + (coefficient * d).astype(a.dtype), g, difference
        )
        return _common.cast_like(regularized, updates), next_sharpness_state(state, norm)

    return optax.GradientTransformationExtraArgs(init_sharpness_state, update_fn)


def gradient_regularization(
    base_optimizer: optax.GradientTransformation,
    gamma: ScalarOrSchedule = 0.05,
    epsilon: ScalarOrSchedule = 0.05,
    *,
    direction: Direction = "forward",
    normalize: bool = False,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Finite-difference gradient regularization in front of any optax optimizer.

    ``chain(scale_by_gradient_regularization(...), base_optimizer)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, metaopt
      >>> loss = lambda p: jnp.sum(jnp.square(p - 3.0))
      >>> opt = metaopt.gradient_regularization(optax.sgd(0.05), gamma=0.1, epsilon=0.1)
      >>> params = jnp.zeros(3)
      >>> state = opt.init(params)
      >>> for _ in range(100):
      ...     grads = jax.grad(loss)(params)
      ...     updates, state = opt.update(grads, state, params, grad_fn=jax.grad(loss))
      ...     params = optax.apply_updates(params, updates)
      >>> print(params)
      [3. 3. 3.]

    References:
      Karakida et al., `Understanding Gradient Regularization in Deep Learning: Efficient
      Finite-Difference Computation and Implicit Bias <https://arxiv.org/abs/2210.02720>`_,
      ICML 2023.

    Args:
      base_optimizer: the optax transform that turns the regularized gradient into an update.
      gamma: penalty strength.
      epsilon: finite-difference step.
      direction: ``"forward"``, ``"backward"`` or ``"central"``.
      normalize: step along the normalized gradient (see
        :func:`scale_by_gradient_regularization`).
      axis_name: mesh axis over which gradients are averaged.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; call ``update(..., grad_fn=...)``.
    """
    _common.check_transform("base_optimizer", base_optimizer)
    return optax.chain(
        scale_by_gradient_regularization(
            gamma, epsilon, direction=direction, normalize=normalize, axis_name=axis_name
        ),
        base_optimizer,
    )
