"""Truncated Neumann series and the dense solve for small systems."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from metaopt.implicit import _linear_solve_info as lsi
from metaopt.implicit._linear_solve_info import LinearSolver


@dataclasses.dataclass(frozen=True)
class Neumann(LinearSolver):
    r"""Truncated Neumann series :math:`A^{-1} b \approx \alpha\sum_{k=0}^{K}(I-\alpha A)^k b`.

    The approximation of Lorraine, Vicol and Duvenaud ("Optimizing Millions of
    Hyperparameters by Implicit Differentiation", AISTATS 2020): ``steps`` products with the
    matrix, no inner products, constant memory. It converges when the eigenvalues of
    :math:`\alpha A` lie in :math:`(0, 2)`, i.e. ``scale`` below :math:`2/\lambda_{\max}`; with
    few steps it is a biased, damped inverse (useful in its own right as a regularizer). It
    always runs ``steps`` iterations and never raises; ``info`` reports how far from solved
    the result is.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.implicit import Neumann
      >>> A = jnp.array([[1.0, 0.2], [0.2, 0.5]])
      >>> x, info = Neumann(steps=200, scale=1.0, tol=1e-6)(lambda v: A @ v, jnp.ones(2))
      >>> print(jnp.round(x, 4), bool(info.converged))
      [0.6522 1.7391] True

    Attributes:
      steps: number of series terms :math:`K`.
      scale: :math:`\alpha`, should be below :math:`2/\lambda_{\max}(A)`; may be traced.
      tol: relative residual at which the result counts as converged (for the info only).
    """

    steps: int = 10
    scale: Any = 1.0

    symmetric = True

    def __post_init__(self):
        lsi.check_tolerance(self.tol)
        lsi.check_iterations("steps", self.steps, allow_none=False)
        if isinstance(self.scale, int | float) and not self.scale > 0:
            raise ValueError(f"scale must be > 0, got scale={self.scale!r}.")

    def _solve(self, matvec, b, x0):
        del x0  # the series starts from b

        def body(carry, _):
            term, total = carry
            term = lsi.axpy(-self.scale, matvec(term), term)
            return (term, lsi.axpy(1.0, term, total)), None

        (_, total), _ = jax.lax.scan(body, (b, b), None, length=self.steps)
        return lsi.scale(self.scale, total), self.steps, False


@dataclasses.dataclass(frozen=True)
class Dense(LinearSolver):
    r"""Materializes the matrix and solves with an LU factorization: for small systems only.

    The matrix is built from :math:`n` matrix-vector products (vectorized with ``vmap``), so
    the cost is :math:`O(n)` products, :math:`O(n^2)` memory and :math:`O(n^3)` time. Exact up
    to round-off for a non-singular matrix; a singular one gives a non-finite or large residual
    and ``converged=False``.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.implicit import Dense
      >>> A = jnp.array([[2.0, 1.0], [1.0, 3.0]])
      >>> x, info = Dense()(lambda v: A @ v, jnp.array([3.0, 5.0]))
      >>> print(x, bool(info.converged))
      [0.8 1.4] True

    Attributes:
      tol: relative residual at which the result counts as converged (for the info only).
    """

    def __post_init__(self):
        lsi.check_tolerance(self.tol)

    def _solve(self, matvec, b, x0):
        del x0
        b_flat, unravel = ravel_pytree(b)

        def column(e):
            return ravel_pytree(matvec(unravel(e)))[0]

        matrix = jax.vmap(column, out_axes=1)(jnp.eye(b_flat.shape[0], dtype=b_flat.dtype))
        return unravel(jnp.linalg.solve(matrix, b_flat)), 1, False
