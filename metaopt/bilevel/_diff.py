"""How derivatives flow back through an inner solve: the ``diff`` objects of :func:`solve`.

The inner loop knows nothing about differentiation; each object here decides how the loop is
run so that ``jax.grad`` of an outer loss through :func:`metaopt.bilevel.solve` gives the
hypergradient it stands for.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from metaopt.implicit import CG, Factorized, LinearSolver

OnFailure = Literal["warn", "nan", "raise", "ignore"]
_POLICIES = ("warn", "nan", "raise", "ignore")


@dataclasses.dataclass(frozen=True)
class Unrolled:
    r"""Backpropagation through every inner step (exact for the iterate actually returned).

    Memory grows linearly with the number of steps. With ``checkpoint=True`` the steps run in
    :math:`\lceil\sqrt{K}\rceil` segments whose insides are recomputed in the backward pass
    (``jax.checkpoint``), so memory grows as :math:`O(\sqrt{K})` for one extra forward pass.
    ``checkpoint`` may also be an int: the segment length.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import bilevel
      >>> def inner(w, lam):  # minimized at w* = 1 / (1 + lam), so dw*/dlam = -1 / (1 + lam)**2
      ...     return 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w**2)
      >>> def outer(lam, steps):
      ...     w, _ = bilevel.solve(inner, jnp.zeros(1), lam, optimizer=optax.sgd(0.2), steps=steps,
      ...                          diff=bilevel.Unrolled(checkpoint=True))
      ...     return w[0]
      >>> # The derivative of the iterate actually returned: after 3 steps it is far from w*'s.
      >>> print(f"{jax.grad(outer)(1.0, 3):.4f} {jax.grad(outer)(1.0, 100):.4f}")
      -0.0880 -0.2500

    Attributes:
      checkpoint: False, True (segments of about :math:`\sqrt{K}` steps) or a segment length.
    """

    checkpoint: bool | int = False

    def __post_init__(self):
        c = self.checkpoint
        if not isinstance(c, bool) and (not isinstance(c, int) or c < 1):
            raise ValueError(
                f"checkpoint must be True, False or a positive segment length, got "
                f"checkpoint={c!r}."
            )


@dataclasses.dataclass(frozen=True)
class Truncated:
    r"""Backpropagation through the last ``k`` inner steps only.

    One run of the optimizer: the first steps run without recording anything, and the last
    ``k`` continue from where they stopped, optimizer state included (momentum, moments, step
    count and schedules run on), so the iterate is exactly :class:`Unrolled`'s; only its
    derivative is truncated. Memory is that of ``k`` steps; the hypergradient is biased (it
    ignores how earlier steps depended on the hyperparameters), less so as ``k`` grows. The
    derivative with respect to ``init`` is zero unless ``k`` covers every step. With ``tol``,
    the differentiated steps are the last ``k`` of the budget ``steps``: a solve that reaches
    ``tol`` before them is differentiated through none (its derivative is zero).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import bilevel
      >>> def inner(w, lam):  # minimized at w* = 1 / (1 + lam), so dw*/dlam = -1 / (1 + lam)**2
      ...     return 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w**2)
      >>> def outer(lam, k):
      ...     w, _ = bilevel.solve(inner, jnp.zeros(1), lam, optimizer=optax.sgd(0.2), steps=100,
      ...                          diff=bilevel.Truncated(k))
      ...     return w[0]
      >>> # Each step contracts by 1 - 0.2 * (1 + lam) = 0.6, so the last k steps carry
      >>> # 1 - 0.6**k of the exact -0.25: -0.2306 for k = 5.
      >>> print(f"{jax.grad(outer)(1.0, 5):.4f} {jax.grad(outer)(1.0, 30):.4f}")
      -0.2306 -0.2500

    Attributes:
      k: number of final steps differentiated.
    """

    k: int

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got k={self.k!r}.")


@dataclasses.dataclass(frozen=True)
class FirstOrder:
    r"""No second derivatives: the solution is treated as ``init`` plus a constant.

    :math:`\partial x^\star/\partial\,\mathrm{init} = I` and
    :math:`\partial x^\star/\partial\theta = 0`: first-order MAML (FOMAML) when the
    meta-parameters are the initialization. The cheapest mode: the backward pass costs
    nothing beyond the outer gradient.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import bilevel
      >>> def inner(w, lam):
      ...     return 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w**2)
      >>> def outer(init, lam):
      ...     w, _ = bilevel.solve(inner, init, lam, optimizer=optax.sgd(0.2), steps=10,
      ...                          diff=bilevel.FirstOrder())
      ...     return jnp.sum(w)
      >>> # d(solution)/d(init) is taken as the identity, d(solution)/d(lam) as zero.
      >>> d_init, d_lam = jax.grad(outer, argnums=(0, 1))(jnp.zeros(2), 1.0)
      >>> print(d_init, float(d_lam))
      [1. 1.] 0.0

    """


@dataclasses.dataclass(frozen=True)
class Implicit:
    r"""Implicit differentiation: :math:`\partial_\theta x^\star = -H^{-1}\partial_\theta
    \nabla_x f` at the solution.

    Memory and time of the backward pass do not depend on the number of inner steps: one
    linear solve with the inner Hessian :math:`H` (Hessian-vector products only). Exact once
    the inner problem is solved; wrong by an amount proportional to the remaining inner
    gradient if it is not. The derivative with respect to ``init`` is zero.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import bilevel, implicit
      >>> def inner(w, lam):  # minimized at w* = 1 / (1 + lam), so dw*/dlam = -1 / (1 + lam)**2
      ...     return 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w**2)
      >>> def outer(lam):
      ...     w, _ = bilevel.solve(inner, jnp.zeros(1), lam, optimizer=optax.sgd(0.2), steps=200,
      ...                          tol=1e-6, diff=bilevel.Implicit(implicit.CG(tol=1e-8)))
      ...     return w[0]
      >>> print(f"{jax.grad(outer)(1.0):.4f}")
      -0.2500

    Attributes:
      linear_solver: solver for the adjoint system (:class:`metaopt.implicit.CG` for a convex
        inner problem, :class:`metaopt.implicit.MINRES` when the inner Hessian may be
        indefinite, a fixed small number of CG steps as in iMAML).
      on_failure: what happens when the inner solve did not converge (see ``rtol``) or the
        adjoint solve did not converge or met negative curvature (for a solver with a fixed
        iteration budget, such as ``CG(fixed_iterations=True)``, only negative curvature):
        ``"warn"`` (default: a warning at run time, one per batch under ``vmap``, the event is
        in the diagnostics, the derivative is returned), ``"nan"`` (the hypergradient is
        NaN), ``"raise"`` (a runtime error), ``"ignore"``, or another diff mode
        (``Unrolled(...)``, ``Truncated(k)``, ``FirstOrder()``) to fall back to when the
        inner solve did not converge: the solve is then redone and differentiated that way,
        only on the runs that need it (a ``lax.cond``); adjoint failures still warn. The
        fallback's backward memory is reserved even when it is not taken, so prefer
        ``Unrolled(checkpoint=True)`` or ``Truncated(k)`` as fallbacks.
      rtol: when :func:`solve` has no ``tol``, the inner solve counts as converged when its
        final gradient norm is at most ``rtol`` times the gradient norm at ``init``
        (default :math:`10^{-3}`), or at most ``atol``. None: a fixed budget of steps, as in
        iMAML, that counts as converged whenever the final gradient is finite. With ``tol``
        the test is ``gradient_norm <= tol``, and ``rtol`` and ``atol`` do not apply.
      atol: the absolute floor of that test, so that an ``init`` that is already a solution
        (a gradient at round-off level) counts as converged; None (default) is 100 machine
        epsilons of the parameters' dtype (2.2e-14 in float64, 1.2e-5 in float32). Set it for
        a gradient whose scale is far from 1.

    The convergence test without ``tol``: :math:`\lVert g_K\rVert \le \max(\text{rtol}\,
    \lVert g_0\rVert, \text{atol})`, with :math:`g_0` and :math:`g_K` the inner gradients at
    ``init`` and at the returned parameters. The implicit derivative's error is first order in
    :math:`\lVert g_K\rVert` (times the inverse Hessian's norm); a relative test needs no
    knowledge of the gradient's scale, and costs nothing inside the loop (both norms are
    computed once, outside it).
    """

    linear_solver: LinearSolver = dataclasses.field(default_factory=CG)
    on_failure: OnFailure | Unrolled | Truncated | FirstOrder = "warn"
    rtol: float | None = 1e-3
    atol: float | None = None

    def __post_init__(self):
        if isinstance(self.linear_solver, Factorized):
            raise ValueError(
                "linear_solver=Factorized(...) needs a factorization of the inner Hessian "
                "computed by the solver, and bilevel.solve's inner loop (an optax transform) "
                "computes none. Write the inner solver yourself and decorate it with "
                "metaopt.implicit.custom_root(..., solve=Factorized(...), has_aux=True), or "
                "use Implicit(Dense()) for a small problem."
            )
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value >= 0):
                raise ValueError(
                    f"{name} must be None or a number >= 0 (the inner convergence test "
                    f"without tol), got {name}={value!r}."
                )
        fallback = isinstance(self.on_failure, Unrolled | Truncated | FirstOrder)
        if not fallback and self.on_failure not in _POLICIES:
            raise ValueError(
                f"on_failure must be one of {_POLICIES} or a diff mode to fall back to "
                f"(Unrolled(), Truncated(k), FirstOrder()), got on_failure={self.on_failure!r}."
            )

    @property
    def adjoint_policy(self) -> OnFailure:
        """The policy for a failed adjoint solve (a fallback mode there means ``"warn"``)."""
        return self.on_failure if isinstance(self.on_failure, str) else "warn"
