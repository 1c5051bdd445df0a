"""Simplified AdEMAMix: one accumulated momentum plus a weighted current gradient.

Morwani, Vyas, Kakade et al., "Connections between Schedule-Free Optimizers, AdEMAMix, and
Accelerated SGD Variants", 2025 (arXiv:2502.02431).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.optimizers import _common
from metaopt.optimizers._common import ScalarOrSchedule
from metaopt.optimizers._tree_checks import check_matching


class ScaleBySimplifiedAdEMAMixState(NamedTuple):
    """State of :func:`scale_by_simplified_ademamix`.

    Example:
      >>> import jax.numpy as jnp, metaopt
      >>> opt = metaopt.scale_by_simplified_ademamix(b1=0.9)
      >>> state = opt.init(jnp.zeros(1))
      >>> for _ in range(2):
      ...     _, state = opt.update(jnp.ones(1), state)
      >>> print(int(state.count), round(float(state.m[0]), 4))  # 0.9 * 1 + 1, not averaged
      2 1.9

    Attributes:
      count: number of updates made so far (int32).
      m: accumulated (not averaged) momentum :math:`\\sum_k \\beta_1^{t-k} g_k`, in ``mu_dtype``.
      nu: EMA of the squared gradient.
    """

    count: jax.Array
    m: optax.Updates
    nu: optax.Updates


def scale_by_simplified_ademamix(
    b1: ScalarOrSchedule = 0.99,
    b2: ScalarOrSchedule = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    *,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients with simplified AdEMAMix (without learning rate or weight decay).

    .. math::

       m &\leftarrow \beta_1 m + g_t, \qquad
       \nu \leftarrow \beta_2 \nu + (1-\beta_2) g_t^2 \\
       u_t &= \frac{m + \alpha\, g_t}{\sqrt{\nu / (1-\beta_2^t) + \bar\epsilon} + \epsilon}

    The momentum is a sum, not an average, so a single EMA plays the part of AdEMAMix's slow EMA
    and the current gradient, weighted by :math:`\alpha`, the part of its fast EMA. With
    :math:`\alpha = 0` it is Adam with a rescaled learning rate. Use a smaller learning rate than
    for Adam: the momentum is about :math:`1/(1-\beta_1)` times larger.

    Example:
      >>> import jax.numpy as jnp, metaopt
      >>> opt = metaopt.scale_by_simplified_ademamix(b1=0.99, alpha=0.0)
      >>> state = opt.init(jnp.zeros(2))
      >>> g = jnp.array([2.0, -3.0])
      >>> first, state = opt.update(g, state)
      >>> second, state = opt.update(g, state)
      >>> # The momentum is a sum: the same gradient twice gives 1 + b1 times the first step.
      >>> print(jnp.round(first, 4), [round(float(r), 4) for r in second / first])
      [ 1. -1.] [1.99, 1.99]

    References:
      Morwani et al., `Connections between Schedule-Free Optimizers, AdEMAMix, and Accelerated
      SGD Variants <https://arxiv.org/abs/2502.02431>`_, 2025.

    Args:
      b1: momentum decay, in [0, 1).
      b2: second-moment EMA rate, in [0, 1).
      alpha: weight of the current gradient, nonnegative.
      eps: added to the denominator outside the square root.
      eps_root: added inside the square root (not needed for meta-gradients: the square
        root's derivative is taken as 0 where the second moment is 0).
      mu_dtype: dtype of the momentum; None keeps the gradient dtype.

    Returns:
      An ``optax.GradientTransformation``.
    """
    _common.check_range("b1", b1, 0.0, 1.0, fix="The momentum decay must be in [0, 1).")
    _common.check_range("b2", b2, 0.0, 1.0, fix="The EMA rate must be in [0, 1).")
    _common.check_nonnegative("alpha", alpha)
    _common.check_nonnegative("eps", eps)
    _common.check_nonnegative("eps_root", eps_root)

    def init_fn(params):
        return ScaleBySimplifiedAdEMAMixState(
            count=jnp.zeros([], jnp.int32),
            m=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        check_matching("updates", updates, "state.nu", state.nu)
        del params
        count = _common.increment(state.count)
        b1_t = _common.value_at(b1, state.count)
        b2_t = _common.value_at(b2, state.count)
        alpha_t = _common.value_at(alpha, state.count)
        m = jax.tree.map(lambda g, m: g + b1_t * m, updates, state.m)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2_t, order=2)
        nu_hat = optax.tree.bias_correction(nu, b2_t, count)
        new_updates = jax.tree.map(
            lambda g, m, v: ((m + alpha_t * g) / (_common.safe_sqrt(v + eps_root) + eps)).astype(
                g.dtype
            ),
            updates,
            m,
            nu_hat,
        )
        return new_updates, ScaleBySimplifiedAdEMAMixState(
            count=count, m=_common.cast_like(m, state.m), nu=_common.cast_like(nu, state.nu)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def simplified_ademamix(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.99,
    b2: ScalarOrSchedule = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    *,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Simplified AdEMAMix with decoupled weight decay and a learning rate.

    .. math::  \theta_t = \theta_{t-1} - \eta_t (u_t + \lambda\,\theta_{t-1})

    with :math:`u_t` from :func:`scale_by_simplified_ademamix`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, metaopt
      >>> loss = lambda p: jnp.sum(jnp.square(p - 3.0))
      >>> opt = metaopt.simplified_ademamix(0.01, b1=0.9, alpha=1.0)
      >>> params = jnp.zeros(3)
      >>> state = opt.init(params)
      >>> for _ in range(400):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f"{loss(params):.3f}")
      0.0...

    References:
      Morwani et al., `Connections between Schedule-Free Optimizers, AdEMAMix, and Accelerated
      SGD Variants <https://arxiv.org/abs/2502.02431>`_, 2025.

    Args:
      learning_rate: step size, a float, traced array or schedule.
      b1: momentum decay.
      b2: second-moment EMA rate.
      alpha: weight of the current gradient.
      eps: added to the denominator outside the square root.
      eps_root: added inside the square root.
      weight_decay: decoupled weight decay, multiplied by the learning rate.
      mask: which leaves get weight decay.
      mu_dtype: dtype of the momentum.

    Returns:
      An ``optax.GradientTransformation``.
    """
    _common.check_nonnegative("learning_rate", learning_rate, "Use a positive step size.")
    _common.check_nonnegative("weight_decay", weight_decay)
    return optax.chain(
        scale_by_simplified_ademamix(b1, b2, alpha, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
