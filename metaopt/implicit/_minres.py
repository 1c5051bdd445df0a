"""MINRES for symmetric (possibly indefinite) systems.

Paige and Saunders, "Solution of Sparse Indefinite Systems of Linear Equations", SIAM J. Numer.
Anal. 12(4), 1975.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metaopt.implicit import _linear_solve_info as lsi
from metaopt.implicit._linear_solve_info import LinearSolver


@dataclasses.dataclass(frozen=True)
class MINRES(LinearSolver):
    r"""MINRES: minimal residual on the Krylov space of a symmetric, possibly indefinite, matrix.

    Where CG needs a positive definite matrix (a strictly convex inner problem), MINRES only
    needs symmetry, so it handles the indefinite Hessians of non-convex inner problems (saddle
    points, MLP losses away from a minimum). Each iteration costs one product with the matrix.
    The residual norm decreases monotonically.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.implicit import MINRES
      >>> A = jnp.array([[2.0, 0.0], [0.0, -1.0]])  # indefinite: CG would fail
      >>> x, info = MINRES(tol=1e-10)(lambda v: A @ v, jnp.array([1.0, 1.0]))
      >>> print(x, bool(info.converged))
      [ 0.5 -1. ] True

    Attributes:
      tol: relative residual at which the solve stops.
      maxiter: iteration cap; None means 10 times the number of unknowns.
      ridge: added to the diagonal; may be negative or traced.
    """

    maxiter: int | None = None
    ridge: float = 0.0

    symmetric = True

    def __post_init__(self):
        lsi.check_tolerance(self.tol)
        lsi.check_iterations("maxiter", self.maxiter)

    def operator(self, matvec):
        if isinstance(self.ridge, int | float) and self.ridge == 0:
            return matvec
        return lambda v: lsi.axpy(self.ridge, v, matvec(v))

    def _solve(self, matvec, b, x0):
        maxiter = self.maxiter or 10 * sum(int(jnp.size(x)) for x in jax.tree.leaves(b))
        r = lsi.sub(b, matvec(x0))
        beta = lsi.norm(r)
        threshold = self.tol * lsi.norm(b)
        zero = lsi.zeros_like(b)
        scalar = jnp.zeros([], beta.dtype)
        # Lanczos vectors (previous and current), rotation (cs, sn), the recurrences of the
        # QR factorization of the tridiagonal matrix, and the search directions w, w1.
        state = dict(
            x=x0,
            v_prev=zero,
            v=lsi.scale(lsi.safe_ratio(1.0, beta), r),
            beta=beta,
            cs=-jnp.ones([], beta.dtype),
            sn=scalar,
            dbar=scalar,
            epsilon=scalar,
            phibar=beta,
            w=zero,
            w1=zero,
            k=jnp.zeros([], jnp.int32),
        )

        def active(s):
            return (s["phibar"] > threshold) & (s["k"] < maxiter) & (s["beta"] > 0)

        def step(s):
            # Lanczos: A v = beta_prev v_prev + alpha v + beta_next v_next.
            p = matvec(s["v"])
            alpha = lsi.dot(s["v"], p)
            p = lsi.axpy(-alpha, s["v"], lsi.axpy(-s["beta"], s["v_prev"], p))
            beta_next = lsi.norm(p)
            # Apply the previous rotation to the new column, then compute the next rotation.
            delta = s["cs"] * s["dbar"] + s["sn"] * alpha
            gbar = s["sn"] * s["dbar"] - s["cs"] * alpha
            epsilon_next = s["sn"] * beta_next
            dbar = -s["cs"] * beta_next
            gamma = jnp.maximum(jnp.hypot(gbar, beta_next), jnp.finfo(gbar.dtype).tiny)
            cs, sn = gbar / gamma, beta_next / gamma
            phi = cs * s["phibar"]
            w = lsi.scale(
                1.0 / gamma, lsi.axpy(-delta, s["w"], lsi.axpy(-s["epsilon"], s["w1"], s["v"]))
            )
            return dict(
                x=lsi.axpy(phi, w, s["x"]),
                v_prev=s["v"],
                v=lsi.scale(lsi.safe_ratio(1.0, beta_next), p),
                beta=beta_next,
                cs=cs,
                sn=sn,
                dbar=dbar,
                epsilon=epsilon_next,
                phibar=sn * s["phibar"],
                w=w,
                w1=s["w"],
                k=s["k"] + 1,
            )

        state = jax.lax.while_loop(active, step, state)
        finite = jnp.isfinite(state["phibar"]) & jnp.isfinite(state["beta"])
        return lsi.nan_unless(finite, state["x"]), state["k"], False
