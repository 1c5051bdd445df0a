"""AdEMAMix: Adam with a mixture of a fast and a slow gradient EMA, and its warm-up schedulers.

Pagliardini, Ablin and Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024
(arXiv:2409.03137).
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


def ademamix_alpha_warmup(step: Any, alpha: Any, warmup_steps: int) -> jax.Array:
    r"""The paper's linear warm-up of the mixing weight alpha.

    .. math::  \alpha(t) = \min\left(\frac{t\,\alpha}{T_\alpha},\ \alpha\right)

    Args:
      step: the paper's step index :math:`t`, 1 on the first update.
      alpha: the final mixing weight :math:`\alpha`.
      warmup_steps: :math:`T_\alpha`, the number of steps to reach ``alpha``.

    Returns:
      :math:`\alpha(t)`.

    Example:
      >>> from metaopt import ademamix_alpha_warmup
      >>> [float(ademamix_alpha_warmup(t, 8.0, 4)) for t in (1, 2, 4, 9)]
      [2.0, 4.0, 8.0, 8.0]
    """
    return _warmup_fraction(step, warmup_steps, alpha) * alpha


def ademamix_b3_warmup(step: Any, b3: Any, b1: Any, warmup_steps: int) -> jax.Array:
    r"""The paper's warm-up of the slow EMA rate beta3, linear in the EMA's half-life.

    .. math::

       \beta_3(t) = \min\left(\exp\left(\frac{\ln\beta_1\,\ln\beta_3}
       {(1 - t/T_{\beta_3})\ln\beta_3 + (t/T_{\beta_3})\ln\beta_1}\right),\ \beta_3\right)

    The half-life :math:`\ln(1/2)/\ln\beta` moves linearly from that of ``b1`` at :math:`t=0` to
    that of ``b3`` at :math:`t=T_{\beta_3}`, which keeps early training from being dominated by
    a nearly frozen slow EMA.

    Args:
      step: the paper's step index :math:`t`, 1 on the first update.
      b3: the final slow rate :math:`\beta_3`.
      b1: the starting rate, the fast EMA's :math:`\beta_1`.
      warmup_steps: :math:`T_{\beta_3}`.

    Returns:
      :math:`\beta_3(t)`.

    Example:
      >>> from metaopt import ademamix_b3_warmup
      >>> round(float(ademamix_b3_warmup(0, 0.9999, 0.9, 100)), 4)
      0.9
      >>> round(float(ademamix_b3_warmup(100, 0.9999, 0.9, 100)), 4)
      0.9999
    """
    fraction = _warmup_fraction(step, warmup_steps, b3)
    log_b1 = jnp.log(jnp.maximum(b1, 1e-12))
    log_b3 = jnp.log(b3)
    log_beta = log_b1 * log_b3 / ((1.0 - fraction) * log_b3 + fraction * log_b1)
    return jnp.minimum(jnp.exp(log_beta), b3)


class ScaleByAdEMAMixState(NamedTuple):
    """State of :func:`scale_by_ademamix`.

    Example:
      >>> import jax.numpy as jnp, metaopt
      >>> opt = metaopt.scale_by_ademamix(b1=0.9, b3=0.99)
      >>> state = opt.init(jnp.zeros(1))
      >>> for _ in range(3):  # three steps of a constant gradient 1
      ...     _, state = opt.update(jnp.ones(1), state)
      >>> # The fast EMA has moved 1 - 0.9**3 of the way, the slow one 1 - 0.99**3.
      >>> print(int(state.count), round(float(state.m1[0]), 4), round(float(state.m2[0]), 4))
      3 0.271 0.0297

    Attributes:
      count: number of updates made so far (int32).
      m1: fast EMA of the gradient (rate ``b1``), in ``mu_dtype``.
      m2: slow EMA of the gradient (rate ``b3``), in ``mu_dtype``.
      nu: EMA of the squared gradient (rate ``b2``).
    """

    count: jax.Array
    m1: optax.Updates
    m2: optax.Updates
    nu: optax.Updates


def scale_by_ademamix(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    *,
    alpha_warmup_steps: int | None = None,
    b3_warmup_steps: int | None = None,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients with AdEMAMix (without learning rate or weight decay).

    With :math:`g_t` the gradient at step :math:`t = 1, 2, \dots`:

    .. math::

       m_1 &\leftarrow \beta_1 m_1 + (1-\beta_1) g_t, \qquad
       m_2 \leftarrow \beta_3(t) m_2 + (1-\beta_3(t)) g_t, \qquad
       \nu \leftarrow \beta_2 \nu + (1-\beta_2) g_t^2 \\
       u_t &= \frac{m_1 / (1-\beta_1^t) + \alpha(t)\, m_2}
                   {\sqrt{\nu / (1-\beta_2^t) + \bar\epsilon} + \epsilon}

    The slow EMA :math:`m_2` is not bias-corrected, as in the paper. :math:`\alpha(t)` and
    :math:`\beta_3(t)` are the warm-ups :func:`ademamix_alpha_warmup` and
    :func:`ademamix_b3_warmup` when ``alpha_warmup_steps``/``b3_warmup_steps`` are given (the
    paper uses both, set to the length of training), and constants otherwise.

    Every hyperparameter may be a float, a traced array (so ``jax.grad`` can differentiate with
    respect to it) or an optax schedule; a schedule is evaluated at the number of updates made so
    far (0 on the first update), like every optax schedule, and the warm-ups above are applied on
    top of its value.

    Example:
      >>> import jax.numpy as jnp, optax, metaopt
      >>> # Adam's first step is the sign of the gradient; the slow EMA adds alpha * (1 - b3) to it.
      >>> opt = metaopt.scale_by_ademamix(b3=0.9999, alpha=5.0)
      >>> updates, state = opt.update(jnp.array([2.0, -3.0]), opt.init(jnp.zeros(2)))
      >>> print(jnp.round(updates, 4))
      [ 1.0005 -1.0005]
      >>> # The core goes in any chain; the alias metaopt.ademamix adds weight decay like this.
      >>> opt = optax.chain(metaopt.scale_by_ademamix(), optax.scale_by_learning_rate(1e-3))

    References:
      Pagliardini, Ablin and Grangier, `The AdEMAMix Optimizer: Better, Faster, Older
      <https://arxiv.org/abs/2409.03137>`_, 2024 (Algorithm 1).

    Args:
      b1: rate of the fast EMA, in [0, 1).
      b2: rate of the second-moment EMA, in [0, 1).
      b3: rate of the slow EMA, in [0, 1); typically 0.999 to 0.9999.
      alpha: weight of the slow EMA, nonnegative; the paper uses 5 to 10.
      alpha_warmup_steps: if given, alpha grows linearly to its value over this many steps.
      b3_warmup_steps: if given, beta3 grows from b1 to its value over this many steps.
      eps: added to the denominator outside the square root.
      eps_root: added inside the square root. Not needed to differentiate through the
        optimizer: the square root's derivative is taken as 0 where the second moment is 0
        (where optax's Adam gives NaN second derivatives unless ``eps_root > 0``).
      mu_dtype: dtype of the two first-moment EMAs (for example ``jnp.bfloat16`` to save memory);
        None keeps the gradient dtype.

    Returns:
      An ``optax.GradientTransformation``.
    """
    _check_betas(b1=b1, b2=b2, b3=b3)
    _common.check_nonnegative("alpha", alpha, "The paper uses alpha between 5 and 10.")
    _common.check_nonnegative("eps", eps)
    _common.check_nonnegative("eps_root", eps_root)
    _common.check_steps("alpha_warmup_steps", alpha_warmup_steps)
    _common.check_steps("b3_warmup_steps", b3_warmup_steps)

    def init_fn(params: optax.Params) -> ScaleByAdEMAMixState:
        return ScaleByAdEMAMixState(
            count=jnp.zeros([], jnp.int32),
            m1=optax.tree.zeros_like(params, dtype=mu_dtype),
            m2=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        check_matching("updates", updates, "state.nu", state.nu)
        del params
        count = _common.increment(state.count)
        b1_t = _common.value_at(b1, state.count)
        b2_t = _common.value_at(b2, state.count)
        b3_t = _common.value_at(b3, state.count)
        alpha_t = _common.value_at(alpha, state.count)
        if alpha_warmup_steps is not None:
            alpha_t = ademamix_alpha_warmup(count, alpha_t, alpha_warmup_steps)
        if b3_warmup_steps is not None:
            b3_t = ademamix_b3_warmup(count, b3_t, b1_t, b3_warmup_steps)

        m1 = optax.tree.update_moment(updates, state.m1, b1_t, order=1)
        m2 = optax.tree.update_moment(updates, state.m2, b3_t, order=1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2_t, order=2)
        m1_hat = optax.tree.bias_correction(m1, b1_t, count)
        nu_hat = optax.tree.bias_correction(nu, b2_t, count)
        new_updates = jax.tree.map(
            lambda g, a, b, v: ((a + alpha_t * b) / (_common.safe_sqrt(v + eps_root) + eps)).astype(
                g.dtype
            ),
            updates,
            m1_hat,
            m2,
            nu_hat,
        )
        # Traced or float64 hyperparameters must not promote the state: keep init's dtypes.
        m1, m2, nu = (
            _common.cast_like(new, old) for new, old in zip((m1, m2, nu), state[1:], strict=True)
        )
        return new_updates, ScaleByAdEMAMixState(count=count, m1=m1, m2=m2, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def ademamix(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    *,
    alpha_warmup_steps: int | None = None,
    b3_warmup_steps: int | None = None,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""AdEMAMix with decoupled weight decay and a learning rate (the paper's full method).

    .. math::

       \theta_t = \theta_{t-1} - \eta_t \left( u_t + \lambda\, \theta_{t-1} \right)

    where :math:`u_t` is :func:`scale_by_ademamix`'s output and :math:`\lambda` is
    ``weight_decay`` (multiplied by the learning rate, as in the paper's Algorithm 1 and AdamW
    in PyTorch and optax).

    Example:
      >>> import jax, jax.numpy as jnp, optax, metaopt
      >>> loss = lambda p: jnp.sum(jnp.square(p - 3.0))
      >>> # A short run: b3=0.99 (half-life 69 steps); the paper's 0.9999 suits long runs.
      >>> opt = metaopt.ademamix(0.1, b3=0.99, alpha_warmup_steps=100, b3_warmup_steps=100)
      >>> params = jnp.zeros(3)
      >>> state = opt.init(params)
      >>> for _ in range(300):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f"{loss(params):.4f}")
      0.0000

    References:
      Pagliardini, Ablin and Grangier, `The AdEMAMix Optimizer: Better, Faster, Older
      <https://arxiv.org/abs/2409.03137>`_, 2024.

    Args:
      learning_rate: step size :math:`\eta`, a float, traced array or schedule.
      b1: rate of the fast EMA.
      b2: rate of the second-moment EMA.
      b3: rate of the slow EMA.
      alpha: weight of the slow EMA.
      alpha_warmup_steps: linear warm-up length of alpha (the paper sets it to the run length).
      b3_warmup_steps: half-life warm-up length of beta3 (the paper sets it to the run length).
      eps: added to the denominator outside the square root.
      eps_root: added inside the square root (not needed for meta-gradients).
      weight_decay: decoupled weight decay :math:`\lambda`, multiplied by the learning rate.
      mask: which leaves get weight decay (a pytree of booleans or a function of params).
      mu_dtype: dtype of the first-moment EMAs.

    Returns:
      An ``optax.GradientTransformation``.
    """
    _common.check_nonnegative("learning_rate", learning_rate, "Use a positive step size.")
    _common.check_nonnegative("weight_decay", weight_decay)
    return optax.chain(
        scale_by_ademamix(
            b1,
            b2,
            b3,
            alpha,
            alpha_warmup_steps=alpha_warmup_steps,
            b3_warmup_steps=b3_warmup_steps,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def _warmup_fraction(step: Any, warmup_steps: int, like: Any) -> jax.Array:
    """min(step / warmup_steps, 1) in the floating dtype of the hyperparameter ``like``."""
    dtype = jnp.result_type(like)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return jnp.minimum(jnp.asarray(step).astype(dtype) / warmup_steps, 1.0)


def _check_betas(**betas: Any) -> None:
    for name, value in betas.items():
        _common.check_range(name, value, 0.0, 1.0, fix="EMA rates must be at least 0 and below 1.")
