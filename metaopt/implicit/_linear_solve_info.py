"""What every linear solver reports, and the pytree vector arithmetic the solvers share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Vector = Any  # a pytree of arrays, treated as one vector
Matvec = Callable[[Vector], Vector]


class LinearSolveInfo(NamedTuple):
    """Diagnostics of one linear solve :math:`A x = b`; every field is an array.

    Attributes:
      iterations: iterations (matrix-vector products, roughly) used, int32.
      relative_residual: :math:`\\lVert b - A x\\rVert / \\lVert b\\rVert` of the returned
        :math:`x`, recomputed from :math:`x` (not the solver's running estimate); the absolute
        residual when :math:`b = 0`.
      converged: whether ``relative_residual <= tol``.
      negative_curvature: CG only: whether a direction with :math:`p^\\top A p \\le 0` was met,
        which means the matrix is not positive definite and CG's answer is unreliable; always
        False for the other solvers.
    """

    iterations: jax.Array
    relative_residual: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array


@dataclasses.dataclass(frozen=True)
class LinearSolver:
    """Base of the linear solvers: options are fields, calling solves.

    Subclasses implement ``_solve(matvec, b, x0) -> (x, iterations, negative_curvature)``
    and may override ``operator`` (the matrix actually solved for, for example with a ridge);
    ``__call__`` adds the residual of the returned solution and the convergence flag.

    Attributes:
      tol: relative residual at which the solve counts as converged.
      symmetric: whether the solver assumes a symmetric matrix (used when transposing).
    """

    tol: float = 1e-6

    symmetric = False

    def __call__(
        self, matvec: Matvec, b: Vector, x0: Vector | None = None
    ) -> tuple[Vector, LinearSolveInfo]:
        """Solves ``matvec(x) = b`` from ``x0`` (zeros by default); returns ``(x, info)``."""
        x0 = zeros_like(b) if x0 is None else x0
        operator = self.operator(matvec)
        x, iterations, negative_curvature = self._solve(operator, b, x0)
        residual = relative_residual(operator, x, b)
        info = LinearSolveInfo(
            iterations=jnp.asarray(iterations, jnp.int32),
            relative_residual=residual,
            converged=residual <= self.tol,
            negative_curvature=jnp.asarray(negative_curvature, bool),
        )
        return x, info

    def operator(self, matvec: Matvec) -> Matvec:
        """The operator actually solved for (for example with a ridge added)."""
        return matvec

    def _solve(self, matvec: Matvec, b: Vector, x0: Vector) -> tuple[Vector, Any, Any]:
        raise NotImplementedError


def check_iterations(name: str, value: Any, allow_none: bool = True) -> None:
    """Raises ValueError unless ``value`` is a positive int (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer{' or None' if allow_none else ''}, "
            f"got {name}={value!r}."
        )


def check_tolerance(value: Any) -> None:
    """Raises ValueError for a negative tolerance."""
    if isinstance(value, int | float) and not value >= 0:
        raise ValueError(f"tol must be >= 0, got tol={value!r}. Use for example tol=1e-6.")


def dot(x: Vector, y: Vector) -> jax.Array:
    """Euclidean inner product of two pytrees, accumulated in at least float32."""
    parts = [
        jnp.vdot(a.astype(_accumulator(a)), b.astype(_accumulator(a)))
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    ]
    return sum(parts[1:], parts[0]) if parts else jnp.zeros([])


def norm(x: Vector) -> jax.Array:
    """Euclidean norm of a pytree."""
    return jnp.sqrt(jnp.maximum(dot(x, x), 0.0))


def axpy(a: Any, x: Vector, y: Vector) -> Vector:
    """``a * x + y`` leaf by leaf, keeping ``y``'s dtypes."""
    return jax.tree.map(lambda u, v: (a * u + v).astype(v.dtype), x, y)


def scale(a: Any, x: Vector) -> Vector:
    """``a * x`` leaf by leaf, keeping dtypes."""
    return jax.tree.map(lambda u: (a * u).astype(u.dtype), x)


def sub(x: Vector, y: Vector) -> Vector:
    """``x - y`` leaf by leaf."""
    return jax.tree.map(jnp.subtract, x, y)


def zeros_like(x: Vector) -> Vector:
    """Zeros shaped like ``x``."""
    return jax.tree.map(jnp.zeros_like, x)


def safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, and 0 where the denominator is 0."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def relative_residual(matvec: Matvec, x: Vector, b: Vector) -> jax.Array:
    """``|b - A x| / |b|`` (the absolute residual when ``b`` is zero)."""
    residual = norm(sub(b, matvec(x)))
    b_norm = norm(b)
    return jnp.where(b_norm > 0, residual / jnp.where(b_norm > 0, b_norm, 1.0), residual)


def _accumulator(a: jax.Array) -> Any:
    return jnp.promote_types(a.dtype, jnp.float32)
