"""Conjugate gradient, with preconditioner and ridge, and CG on the normal equations."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from metaopt.implicit import _linear_solve_info as lsi
from metaopt.implicit._linear_solve_info import LinearSolver, Matvec, Vector


def _size(tree: Vector) -> int:
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))


def conjugate_gradient(
    matvec: Matvec,
    b: Vector,
    x0: Vector,
    *,
    tol: float,
    maxiter: int,
    preconditioner: Callable[[Vector], Vector] | None,
    fixed_iterations: bool,
) -> tuple[Vector, jax.Array, jax.Array]:
    """Preconditioned CG; returns ``(x, iterations, negative_curvature)``.

    Stops when the recursive residual falls to ``tol * |b|``, at ``maxiter``, or at the first
    direction with :math:`p^\\top A p \\le 0` (flagged), where CG's step would be meaningless.
    With ``fixed_iterations`` it runs exactly ``maxiter`` iterations as a ``scan`` (no early
    exit, so it can be differentiated by unrolling); steps after convergence or negative
    curvature change nothing.
    """
    precondition = (lambda r: r) if preconditioner is None else preconditioner
    r = lsi.sub(b, matvec(x0))
    z = precondition(r)
    # Stop on the recursive residual a little below the target: the residual recomputed from
    # the returned x (what the info reports) drifts from it in low precision.
    threshold = 0.5 * tol * lsi.norm(b)
    state = (x0, r, z, lsi.dot(r, z), jnp.zeros([], jnp.int32), jnp.zeros([], bool))

    def active(state):
        _, r, _, _, _, negative = state
        return (lsi.norm(r) > threshold) & ~negative

    def step(state):
        x, r, p, rz, k, negative = state
        ap = matvec(p)
        curvature = lsi.dot(p, ap)
        negative = curvature <= 0
        alpha = jnp.where(negative, 0.0, lsi.safe_ratio(rz, curvature))
        x = lsi.axpy(alpha, p, x)
        r = lsi.axpy(-alpha, ap, r)
        z = precondition(r)
        rz_new = lsi.dot(r, z)
        p = lsi.axpy(lsi.safe_ratio(rz_new, rz), p, z)
        return x, r, p, rz_new, k + 1, negative

    if fixed_iterations:

        def body(state, _):
            new = step(state)
            keep = active(state)
            return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, state), None

        state, _ = jax.lax.scan(body, state, None, length=maxiter)
    else:
        state = jax.lax.while_loop(lambda s: active(s) & (s[4] < maxiter), step, state)
        # Residual replacement: in low precision the recursive residual drifts below the true
        # one; restart once from the true residual with the iterations left (costs one product
        # when already converged).
        x, _, _, _, k, negative = state
        r = lsi.sub(b, matvec(x))
        z = precondition(r)
        restart = (x, r, z, lsi.dot(r, z), k, negative)
        state = jax.lax.while_loop(lambda s: active(s) & (s[4] < maxiter), step, restart)
    x, r, _, _, k, negative = state
    return lsi.nan_unless(jnp.isfinite(lsi.norm(r)), x), k, negative


@dataclasses.dataclass(frozen=True)
class CG(LinearSolver):
    r"""Conjugate gradient for symmetric positive definite systems, matrix-free on pytrees.

    Solves :math:`(A + \lambda I) x = b` with ``ridge`` :math:`\lambda`, optionally
    preconditioned by ``preconditioner`` (a function approximating :math:`A^{-1}`). Meeting a
    direction with :math:`p^\top (A + \lambda I) p \le 0` stops the solve and sets
    ``info.negative_curvature``: the matrix is indefinite (a non-convex inner problem), and the
    answer should not be trusted; add ``ridge`` or use :class:`MINRES`.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.implicit import CG
      >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
      >>> x, info = CG(tol=1e-10)(lambda v: A @ v, jnp.array([1.0, 2.0]))
      >>> print(x, int(info.iterations), bool(info.converged))
      [0.09090909 0.63636364] 2 True

    Attributes:
      tol: relative residual at which the solve stops.
      maxiter: iteration cap; None means 10 times the number of unknowns.
      ridge: :math:`\lambda`, added to the diagonal (damping); may be a traced array.
      preconditioner: optional function :math:`r \mapsto M^{-1} r`.
      fixed_iterations: run exactly ``maxiter`` iterations with no early exit (iMAML's "a few
        CG steps"); the residual left is reported in the info, and the ``on_failure`` policies
        of implicit differentiation do not count it as a failure (negative curvature they
        do).
    """

    maxiter: int | None = None
    ridge: Any = 0.0
    preconditioner: Callable[[Vector], Vector] | None = None
    fixed_iterations: bool = False

    symmetric = True

    def __post_init__(self):
        lsi.check_tolerance(self.tol)
        lsi.check_iterations("maxiter", self.maxiter)
        if self.fixed_iterations and self.maxiter is None:
            raise ValueError("fixed_iterations=True needs maxiter, for example CG(maxiter=5, ...).")
        if isinstance(self.ridge, int | float) and self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got ridge={self.ridge!r}.")

    def operator(self, matvec):
        if _is_zero(self.ridge):
            return matvec
        return lambda v: lsi.axpy(self.ridge, v, matvec(v))

    def _solve(self, matvec, b, x0):
        return conjugate_gradient(
            matvec,
            b,
            x0,
            tol=self.tol,
            maxiter=self.maxiter or 10 * _size(b),
            preconditioner=self.preconditioner,
            fixed_iterations=self.fixed_iterations,
        )


def _is_zero(value: Any) -> bool:
    return isinstance(value, int | float) and value == 0


@dataclasses.dataclass(frozen=True)
class NormalCG(LinearSolver):
    r"""CG on the normal equations :math:`A^\top A x = A^\top b`, for any square system.

    :math:`A^\top` is obtained by transposing ``matvec`` (``jax.linear_transpose``), so no
    transposed product needs to be supplied. Convergence is judged on the original residual
    :math:`\lVert b - A x\rVert / \lVert b \rVert`. The normal equations square the condition
    number; prefer :class:`GMRES` or :class:`BiCGSTAB` for badly conditioned non-symmetric
    systems.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.implicit import NormalCG
      >>> A = jnp.array([[1.0, 2.0], [0.0, 1.0]])  # not symmetric: plain CG does not apply
      >>> x, info = NormalCG(tol=1e-8)(lambda v: A @ v, jnp.array([3.0, 1.0]))
      >>> print(jnp.round(x, 4), bool(info.converged))
      [1. 1.] True

    Attributes:
      tol: relative residual of the original system at which the solve counts as converged.
      maxiter: CG iteration cap; None means 10 times the number of unknowns.
      ridge: added to :math:`A^\top A` (Tikhonov damping).
      fixed_iterations: run exactly ``maxiter`` CG iterations.
    """

    maxiter: int | None = None
    ridge: Any = 0.0
    fixed_iterations: bool = False

    def __post_init__(self):
        lsi.check_tolerance(self.tol)
        lsi.check_iterations("maxiter", self.maxiter)
        if self.fixed_iterations and self.maxiter is None:
            raise ValueError("fixed_iterations=True needs maxiter.")

    def _solve(self, matvec, b, x0):
        transpose = jax.linear_transpose(matvec, b)

        def normal_matvec(v):
            (w,) = transpose(matvec(v))
            return w if _is_zero(self.ridge) else lsi.axpy(self.ridge, v, w)

        (rhs,) = transpose(b)
        # CG's own tolerance is on the normal residual; squaring the requested tolerance keeps
        # it from stopping well before the original residual reaches `tol`.
        return conjugate_gradient(
            normal_matvec,
            rhs,
            x0,
            tol=self.tol**2,
            maxiter=self.maxiter or 10 * _size(b),
            preconditioner=None,
            fixed_iterations=self.fixed_iterations,
        )
