"""BiCGSTAB for non-symmetric systems.

van der Vorst, "Bi-CGSTAB: A Fast and Smoothly Converging Variant of Bi-CG for the Solution of
Nonsymmetric Linear Systems", SIAM J. Sci. Stat. Comput. 13(2), 1992.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metaopt.implicit import _linear_solve_info as lsi
from metaopt.implicit._linear_solve_info import LinearSolver


@dataclasses.dataclass(frozen=True)
class BiCGSTAB(LinearSolver):
    r"""BiCGSTAB: a short-recurrence Krylov solver for general square systems.

    Two products with the matrix per iteration and constant memory (unlike :class:`GMRES`).
    Convergence can be irregular and the method can break down (a zero inner product); a
    breakdown stops the iteration and shows as ``converged=False`` in the info.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.implicit import BiCGSTAB
      >>> A = jnp.array([[3.0, 1.0], [-1.0, 2.0]])
      >>> x, info = BiCGSTAB(tol=1e-10)(lambda v: A @ v, jnp.array([1.0, 0.0]))
      >>> print(x, bool(info.converged))
      [0.28571429 0.14285714] True

    Attributes:
      tol: relative residual at which the solve stops.
      maxiter: iteration cap; None means 10 times the number of unknowns.
    """

    maxiter: int | None = None

    def __post_init__(self):
        lsi.check_tolerance(self.tol)
        lsi.check_iterations("maxiter", self.maxiter)

    def _solve(self, matvec, b, x0):
        maxiter = self.maxiter or 10 * sum(int(jnp.size(x)) for x in jax.tree.leaves(b))
        r = lsi.sub(b, matvec(x0))
        threshold = self.tol * lsi.norm(b)
        one = jnp.ones([], lsi.dot(r, r).dtype)
        zero = lsi.zeros_like(b)
        state = (x0, r, r, zero, zero, one, one, one, jnp.zeros([], jnp.int32), jnp.array(False))

        def active(s):
            _, r, _, _, _, _, _, _, k, broken = s
            return (lsi.norm(r) > threshold) & (k < maxiter) & ~broken

        def step(s):
            x, r, r_hat, p, v, rho, alpha, omega, k, _ = s
            rho_next = lsi.dot(r_hat, r)
            beta = lsi.safe_ratio(rho_next, rho) * lsi.safe_ratio(alpha, omega)
            p = lsi.axpy(1.0, r, lsi.scale(beta, lsi.axpy(-omega, v, p)))
            v = matvec(p)
            alpha = lsi.safe_ratio(rho_next, lsi.dot(r_hat, v))
            s_vec = lsi.axpy(-alpha, v, r)
            t = matvec(s_vec)
            tt = lsi.dot(t, t)
            omega = lsi.safe_ratio(lsi.dot(t, s_vec), tt)
            x = lsi.axpy(omega, s_vec, lsi.axpy(alpha, p, x))
            r = lsi.axpy(-omega, t, s_vec)
            broken = (rho_next == 0) | ((tt == 0) & (lsi.norm(s_vec) > threshold))
            return x, r, r_hat, p, v, rho_next, alpha, omega, k + 1, broken

        state = jax.lax.while_loop(active, step, state)
        return lsi.nan_unless(jnp.isfinite(lsi.norm(state[1])), state[0]), state[8], False
