"""Restarted GMRES for non-symmetric systems.

Saad and Schultz, "GMRES: A Generalized Minimal Residual Algorithm for Solving Nonsymmetric
Linear Systems", SIAM J. Sci. Stat. Comput. 7(3), 1986.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from metaopt.implicit import _linear_solve_info as lsi
from metaopt.implicit._linear_solve_info import LinearSolver


@dataclasses.dataclass(frozen=True)
class GMRES(LinearSolver):
    r"""GMRES(m): minimal residual over a Krylov space of dimension ``restart``, restarted.

    The most robust choice for a general (non-symmetric) square system, at the cost of storing
    ``restart`` basis vectors. The basis is orthogonalized with classical Gram-Schmidt applied
    twice, which is as accurate as modified Gram-Schmidt and vectorizes.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.implicit import GMRES
      >>> A = jnp.array([[3.0, 1.0, 0.0], [-1.0, 2.0, 1.0], [0.0, 1.0, 4.0]])
      >>> x, info = GMRES(tol=1e-10)(lambda v: A @ v, jnp.array([1.0, 0.0, 1.0]))
      >>> print(jnp.round(A @ x, 6) + 0.0, bool(info.converged))
      [1. 0. 1.] True

    Attributes:
      tol: relative residual at which the solve stops.
      restart: Krylov dimension between restarts (memory: ``restart`` vectors).
      maxiter: cap on restart cycles; None means 10 times the cycles that span all unknowns.
    """

    restart: int = 20
    maxiter: int | None = None

    def __post_init__(self):
        lsi.check_tolerance(self.tol)
        lsi.check_iterations("restart", self.restart, allow_none=False)
        lsi.check_iterations("maxiter", self.maxiter)

    def _solve(self, matvec, b, x0):
        b_flat, unravel = ravel_pytree(b)
        x0_flat, _ = ravel_pytree(x0)
        n = b_flat.shape[0]
        m = min(self.restart, n)
        cycles = self.maxiter or 10 * -(-n // m)

        def flat_matvec(v):
            return ravel_pytree(matvec(unravel(v)))[0]

        threshold = self.tol * jnp.linalg.norm(b_flat)

        def cycle(state):
            x, _, k = state
            r = b_flat - flat_matvec(x)
            beta = jnp.linalg.norm(r)
            basis = jnp.zeros((m + 1, n), b_flat.dtype).at[0].set(r / jnp.where(beta > 0, beta, 1))
            hessenberg = jnp.zeros((m + 1, m), b_flat.dtype)

            def arnoldi(j, carry):
                basis, hessenberg = carry
                w = flat_matvec(basis[j])
                mask = (jnp.arange(m + 1) <= j).astype(w.dtype)
                h = (basis @ w) * mask
                w = w - basis.T @ h
                h2 = (basis @ w) * mask  # the second pass of classical Gram-Schmidt
                w = w - basis.T @ h2
                h = h + h2
                norm = jnp.linalg.norm(w)
                h = h.at[j + 1].set(norm)
                basis = basis.at[j + 1].set(w / jnp.where(norm > 0, norm, 1))
                return basis, hessenberg.at[:, j].set(h)

            basis, hessenberg = jax.lax.fori_loop(0, m, arnoldi, (basis, hessenberg))
            rhs = jnp.zeros(m + 1, b_flat.dtype).at[0].set(beta)
            y = jnp.linalg.lstsq(hessenberg, rhs)[0]
            x = x + basis[:m].T @ y
            return x, jnp.linalg.norm(b_flat - flat_matvec(x)), k + 1

        def active(state):
            _, residual, k = state
            return (residual > threshold) & (k < cycles)

        initial = (
            x0_flat,
            jnp.linalg.norm(b_flat - flat_matvec(x0_flat)),
            jnp.zeros([], jnp.int32),
        )
        x, residual, k = jax.lax.while_loop(active, cycle, initial)
        return lsi.nan_unless(jnp.isfinite(residual), unravel(x)), k * m, False
