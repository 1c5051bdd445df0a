"""sl-BAMM: a single-loop bilevel method that needs no lower-level strong convexity.

Liu, Liu, Yao, Zeng and Zhang, "Averaged Method of Multipliers for Bi-Level Optimization without
Lower-Level Strong Convexity", ICML 2023 (arXiv:2302.03407).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metaopt.bilevel._checks import all_finite, check_scalar_loss
from metaopt.optimizers import _common
from metaopt.optimizers._common import ScalarOrSchedule, global_norm


class SLBAMMState(NamedTuple):
    r"""Where sl-BAMM stands: both levels' variables, the multiplier and the step counts.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt import bilevel
      >>> method = bilevel.SLBAMM(learning_rate=0.3, inner_learning_rate=0.9,
      ...                         multiplier_learning_rate=0.9)
      >>> state = method.init(jnp.zeros(2), {"w": jnp.ones(3)})
      >>> state.z["w"], int(state.step), int(state.skipped_steps)  # z has y's structure
      (Array([0., 0., 0.], dtype=float64), 0, 0)

    Attributes:
      x: the upper-level variable (a pytree).
      y: the lower-level variable (a pytree).
      z: the multiplier of the lower-level optimality condition
        :math:`\nabla_y f(x, y) = 0`, with the structure of ``y``.
      step: steps taken (int32), the :math:`k` of the schedules; a skipped step does not count.
      skipped_steps: steps skipped because a new value was not finite (int32).
    """

    x: Any
    y: Any
    z: Any
    step: jax.Array
    skipped_steps: jax.Array


class SLBAMMInfo(NamedTuple):
    r"""What one sl-BAMM step saw: the KKT residuals at the new point, and whether it was kept.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt import bilevel
      >>> method = bilevel.SLBAMM(learning_rate=0.3, inner_learning_rate=0.9,
      ...                         multiplier_learning_rate=0.9)
      >>> inner = lambda y, x: 0.5 * jnp.sum((y - x) ** 2)
      >>> outer = lambda y, x: 0.5 * jnp.sum(y**2) + 0.5 * jnp.sum((x - 1.0) ** 2)
      >>> state, info = method.step(outer, inner, method.init(jnp.zeros(2), jnp.ones(2)))
      >>> bool(info.finite), int(state.step)
      (True, 1)
      >>> _, info = method.step(outer, inner, state._replace(y=jnp.full(2, jnp.nan)))
      >>> bool(info.finite)  # a NaN is never written into the state: the step is skipped
      False

    Attributes:
      outer_loss: :math:`F(x_k, y_{k+1})`.
      inner_gradient_norm: :math:`\lVert\nabla_y f(x_k, y_{k+1})\rVert`, the lower-level
        optimality residual.
      multiplier_residual_norm: :math:`\lVert\nabla^2_{yy} f(x_k, y_{k+1})\, z_k -
        \nabla_y F(x_k, y_{k+1})\rVert`, the residual of the multiplier's equation.
      hypergradient_norm: :math:`\lVert\nabla_x F(x_k, y_{k+1}) -
        \nabla^2_{xy} f(x_k, y_{k+1})\, z_{k+1}\rVert`, the norm of the direction of ``x``.
      mu: the averaging weight :math:`\mu_k` used.
      finite: whether the new ``x``, ``y``, ``z`` and the residuals were all finite; when
        False the state was left as it was and ``skipped_steps`` counts the step.
    """

    outer_loss: jax.Array
    inner_gradient_norm: jax.Array
    multiplier_residual_norm: jax.Array
    hypergradient_norm: jax.Array
    mu: jax.Array
    finite: jax.Array


@dataclasses.dataclass(frozen=True)
class SLBAMM:
    r"""Single-loop Bi-level Averaged Method of Multipliers (sl-BAMM), one step at a time.

    Solves :math:`\min_{x, y} F(x, y)` subject to :math:`y \in \arg\min_{y'} f(x, y')` (the
    optimistic bilevel problem) with a lower level :math:`f(x, \cdot)` that is convex but may
    have many minimizers: no lower-level strong convexity, so implicit differentiation's
    :math:`(\nabla^2_{yy} f)^{-1}` may not exist. The lower level is written as the constraint
    :math:`\nabla_y f(x, y) = 0` with multiplier :math:`z`; a KKT point satisfies
    :math:`\nabla_y f = 0`, :math:`\nabla^2_{yy} f\, z = \nabla_y F` and
    :math:`\nabla^2_{xy} f\, z = \nabla_x F`. One step updates all three variables, with
    :math:`\mu_k = \mu\,(k+1)^{-1/p}`:

    .. math::

       y_{k+1} &= y_k - \beta_k\,[\mu_k \nabla_y F(x_k, y_k) + (1-\mu_k)\nabla_y f(x_k, y_k)] \\
       z_{k+1} &= z_k - \eta_k\,[\nabla^2_{yy} f(x_k, y_{k+1})\, z_k - \nabla_y F(x_k, y_{k+1})] \\
       x_{k+1} &= x_k - \alpha_k\,[\nabla_x F(x_k, y_{k+1}) - \nabla^2_{xy} f(x_k, y_{k+1})\,
       z_{k+1}]

    The lower-level step descends the average :math:`\mu_k F + (1-\mu_k) f` of both objectives
    with a weight :math:`\mu_k \to 0`: among the lower-level minimizers it drifts to the one the
    upper level prefers, which is what replaces strong convexity. The multiplier takes one
    gradient step on its linear equation per iteration, instead of a linear solve. The
    Hessian-vector products are forward-over-reverse (``jax.jvp`` of ``jax.grad``); the mixed
    one uses the symmetry of second derivatives,
    :math:`\nabla^2_{xy} f\, z = \partial_t \nabla_x f(x, y + t z)|_{t=0}`, so a step costs two
    gradients of each loss and two Hessian-vector products, and never forms a Hessian.

    The losses follow :func:`solve`'s convention with one hyperparameter pytree:
    ``inner_loss(y, x)`` is :math:`f` and ``outer_loss(y, x)`` is :math:`F` (several
    hyperparameters: make ``x`` a tuple). ``x`` is unconstrained (the paper's projection onto a
    set :math:`X` is left to the caller). :meth:`step` is a pure function of the state: it
    jit-compiles and vmaps over tasks. A step whose new values are not finite is skipped: the
    state is kept, ``skipped_steps`` counts it, and the ``finite`` field of
    :class:`SLBAMMInfo` is False.

    Example: the paper's toy problem with a lower level that has many minimizers. Here
    :math:`f = \tfrac12\lVert y_1\rVert^2 - x^\top y_1` ignores :math:`y_2` entirely, and
    :math:`F = \tfrac12\lVert x - y_2\rVert^2 + \tfrac12\lVert y_1 - e\rVert^2`; the bilevel
    solution is :math:`x = y_1 = y_2 = e`.

      >>> import jax, jax.numpy as jnp
      >>> from metaopt import bilevel
      >>> e = jnp.ones(3)
      >>> inner = lambda y, x: 0.5 * jnp.sum(y[0] ** 2) - x @ y[0]
      >>> outer = lambda y, x: 0.5 * jnp.sum((x - y[1]) ** 2) + 0.5 * jnp.sum((y[0] - e) ** 2)
      >>> method = bilevel.SLBAMM(learning_rate=0.3, inner_learning_rate=0.9,
      ...                         multiplier_learning_rate=0.9, mu=0.9, mu_power=10.0)
      >>> step = jax.jit(lambda state: method.step(outer, inner, state))
      >>> state = method.init(jnp.zeros(3), (jnp.zeros(3), jnp.zeros(3)))
      >>> for _ in range(300):
      ...     state, info = step(state)
      >>> print(state.x, state.y[1], f"{info.hypergradient_norm:.0e}")
      [1. 1. 1.] [1. 1. 1.] 0e+00

    References:
      Liu, Liu, Yao, Zeng and Zhang, `Averaged Method of Multipliers for Bi-Level Optimization
      without Lower-Level Strong Convexity <https://arxiv.org/abs/2302.03407>`_, ICML 2023
      (the single-loop method, sl-BAMM).

    Attributes:
      learning_rate: :math:`\alpha_k`, the step size of ``x`` (a number, an array or a
        schedule of the step count).
      inner_learning_rate: :math:`\beta_k`, the step size of ``y``; below
        :math:`2/L` for :math:`L` the Lipschitz constant of :math:`\nabla_y f`.
      multiplier_learning_rate: :math:`\eta_k`, the step size of the multiplier ``z``; below
        :math:`2/L` too, since its step is a gradient step on
        :math:`\tfrac12 z^\top\nabla^2_{yy} f z - z^\top\nabla_y F`.
      mu: :math:`\mu` in :math:`(0, 1]`, the initial weight of the upper level in the
        lower-level step (a number or an array).
      mu_power: :math:`p > 0`: :math:`\mu_k = \mu\,(k+1)^{-1/p}` decays more slowly for a
        larger ``p``.

    Choosing ``mu`` and ``mu_power``: a weight that stays large selects the upper level's
    favourite lower-level solution faster, but where the two levels disagree about ``y`` the
    iterate trails the solution by :math:`O(\mu_k)` (on :math:`f = \tfrac12\lVert y\rVert^2
    - x^\top y`, :math:`F = \tfrac12\lVert y\rVert^2 + \tfrac12\lVert x - e\rVert^2` the fixed
    point is :math:`x = e/(2 - \mu_k)` instead of :math:`e/2`). Measured with the step sizes
    of the example below, relative error of ``x`` after 400 steps: on the example's problem
    (the levels agree) :math:`2\cdot10^{-4}` with the defaults (``mu=0.5, mu_power=2``),
    :math:`4\cdot10^{-16}` with ``mu=0.9, mu_power=10`` (the defaults of the authors'
    script for this problem); on the problem above (they disagree) :math:`1.3\cdot10^{-2}`
    with the defaults and :math:`0.33` with ``mu=0.9, mu_power=10``. The defaults are the
    compromise.
    """

    learning_rate: ScalarOrSchedule
    inner_learning_rate: ScalarOrSchedule
    multiplier_learning_rate: ScalarOrSchedule
    mu: Any = 0.5
    mu_power: float = 2.0

    def __post_init__(self):
        for name, symbol in (
            ("learning_rate", "x"),
            ("inner_learning_rate", "y"),
            ("multiplier_learning_rate", "the multiplier z"),
        ):
            _common.check_positive(
                name,
                getattr(self, name),
                fix=f"It is the step size of {symbol}: pass a small positive number such as 0.1.",
            )
        if callable(self.mu):
            raise TypeError(
                f"mu must be a number or an array in (0, 1], got mu={self.mu!r}; it decays as "
                "mu * (k + 1) ** (-1 / mu_power): set mu_power for its schedule."
            )
        _common.check_number("mu", self.mu)
        mu = _common._concrete(self.mu)
        if mu is not None and not 0.0 < mu <= 1.0:
            raise ValueError(
                f"mu must lie in (0, 1], got mu={self.mu!r}. It is the initial weight of the "
                "upper-level objective in the lower-level step: for example mu=0.5."
            )
        power = self.mu_power
        if isinstance(power, bool) or not isinstance(power, numbers.Real) or not power > 0:
            raise ValueError(
                f"mu_power must be a positive number, got mu_power={power!r}. The averaging "
                "weight is mu * (k + 1) ** (-1 / mu_power): for example mu_power=2.0."
            )

    def init(self, x: Any, y: Any, z: Any = None) -> SLBAMMState:
        """The state at ``x``, ``y``, with the multiplier ``z`` (zeros of ``y``'s shape if None).

        Example:
          >>> import jax.numpy as jnp
          >>> from metaopt import bilevel
          >>> method = bilevel.SLBAMM(learning_rate=0.1, inner_learning_rate=0.5,
          ...                         multiplier_learning_rate=0.5)
          >>> state = method.init(jnp.zeros(2), jnp.ones(4))
          >>> state.z.shape, int(state.step)
          ((4,), 0)

        Args:
          x: the upper-level variable (a pytree of arrays).
          y: the lower-level variable (a pytree of arrays).
          z: the starting multiplier, a pytree with the structure and shapes of ``y``.

        Returns:
          An :class:`SLBAMMState` at step 0.
        """
        x, y = jax.tree.map(jnp.asarray, (x, y))
        for name, tree in (("x", x), ("y", y)):
            for leaf in jax.tree.leaves(tree):
                if not jnp.issubdtype(leaf.dtype, jnp.inexact):
                    raise TypeError(
                        f"{name} must hold floating-point arrays, got a leaf of dtype "
                        f"{leaf.dtype}; pass for example jnp.asarray({name}, jnp.float32)."
                    )
        if z is None:
            z = jax.tree.map(jnp.zeros_like, y)
        else:
            z = jax.tree.map(jnp.asarray, z)
            shapes = jax.tree.map(jnp.shape, y), jax.tree.map(jnp.shape, z)
            if jax.tree.structure(y) != jax.tree.structure(z) or shapes[0] != shapes[1]:
                raise ValueError(
                    "z must have the structure and shapes of y, got "
                    f"y: {shapes[0]} and z: {shapes[1]}; pass z=None for zeros."
                )
            z = jax.tree.map(lambda a, b: a.astype(b.dtype), z, y)
        zero = jnp.zeros([], jnp.int32)
        return SLBAMMState(x, y, z, zero, zero)

    def step(
        self,
        outer_loss: Callable[..., jax.Array],
        inner_loss: Callable[..., jax.Array],
        state: SLBAMMState,
    ) -> tuple[SLBAMMState, SLBAMMInfo]:
        r"""One iteration of sl-BAMM: ``y``, then ``z``, then ``x`` (see the class docstring).

        Example:
          >>> import jax.numpy as jnp
          >>> from metaopt import bilevel
          >>> method = bilevel.SLBAMM(learning_rate=0.1, inner_learning_rate=0.5,
          ...                         multiplier_learning_rate=0.5, mu=0.5, mu_power=2.0)
          >>> inner = lambda y, x: 0.5 * jnp.sum((y - x) ** 2)
          >>> outer = lambda y, x: 0.5 * jnp.sum(y**2)
          >>> state, info = method.step(outer, inner, method.init(jnp.ones(1), jnp.zeros(1)))
          >>> # y moves towards x (weight 1 - mu) and 0 (weight mu): 0 - 0.5 * 0.5 * (0 - 1).
          >>> print(state.y, float(info.mu))
          [0.25] 0.5

        Args:
          outer_loss: ``outer_loss(y, x) -> scalar``, the upper-level objective :math:`F`.
          inner_loss: ``inner_loss(y, x) -> scalar``, the lower-level objective :math:`f`.
          state: an :class:`SLBAMMState`.

        Returns:
          ``(state, info)``: the new state and an :class:`SLBAMMInfo`.
        """
        x, y, z, k = state.x, state.y, state.z, state.step
        check_scalar_loss("outer_loss", outer_loss, y, x)
        check_scalar_loss("inner_loss", inner_loss, y, x)
        alpha, beta, eta = (
            _common.value_at(rate, k)
            for rate in (
                self.learning_rate,
                self.inner_learning_rate,
                self.multiplier_learning_rate,
            )
        )
        mu = self.mu * (k + 1.0) ** (-1.0 / self.mu_power)

        outer_y = jax.grad(outer_loss)(y, x)
        inner_y = jax.grad(inner_loss)(y, x)
        y_new = _tree_step(y, beta, _tree_add(outer_y, inner_y, mu, 1.0 - mu))

        def inner_gradients(y):
            return jax.grad(inner_loss, argnums=(0, 1))(y, x)

        outer_loss_value, (outer_y, outer_x) = jax.value_and_grad(outer_loss, argnums=(0, 1))(
            y_new, x
        )
        (inner_y, _), (hessian_z, _) = jax.jvp(inner_gradients, (y_new,), (z,))
        multiplier_direction = _tree_add(hessian_z, outer_y, 1.0, -1.0)
        z_new = _tree_step(z, eta, multiplier_direction)
        _, (_, mixed_z) = jax.jvp(inner_gradients, (y_new,), (z_new,))
        x_direction = _tree_add(outer_x, mixed_z, 1.0, -1.0)
        x_new = _tree_step(x, alpha, x_direction)

        norms = [global_norm(t) for t in (inner_y, multiplier_direction, x_direction)]
        values = (x_new, y_new, z_new, outer_loss_value, *norms)
        finite = all_finite(values)
        kept = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), (x_new, y_new, z_new), (x, y, z)
        )
        new_state = SLBAMMState(
            *kept,
            step=jnp.where(finite, _common.increment(k), k),
            skipped_steps=jnp.where(
                finite, state.skipped_steps, _common.increment(state.skipped_steps)
            ),
        )
        info = SLBAMMInfo(outer_loss_value, *norms, jnp.asarray(mu), finite)
        return new_state, info


def _tree_add(a: Any, b: Any, wa: Any, wb: Any) -> Any:
    """``wa * a + wb * b`` leaf by leaf, in each leaf's dtype."""
    return jax.tree.map(lambda u, v: (wa * u + wb * v).astype(u.dtype), a, b)


def _tree_step(params: Any, rate: Any, direction: Any) -> Any:
    """``params - rate * direction`` leaf by leaf, in the parameters' dtype."""
    return jax.tree.map(lambda p, d: (p - rate * d).astype(p.dtype), params, direction)
