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

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.implicit import CG
      >>> A = jnp.array([[2.0, 1.0], [1.0, 2.0]])
      >>> x, info = CG(tol=1e-8)(lambda v: A @ v, jnp.array([3.0, 3.0]))
      >>> print(x, bool(info.relative_residual < 1e-6), bool(info.converged))
      [1. 1.] True True
      >>> bool(info.negative_curvature)
      False
      >>> _, info = CG()(lambda v: -A @ v, jnp.array([3.0, 3.0]))  # not positive definite
      >>> bool(info.negative_curvature)
      True

    Attributes:
      iterations: iterations (matrix-vector products, roughly) used, int32.
      relative_residual: :math:`\\lVert b - A x\\rVert / \\lVert b\\rVert` of the returned
        :math:`x`, recomputed from :math:`x` (not the solver's running estimate); the absolute
        residual when :math:`b = 0`.
      converged: whether ``relative_residual <= tol``; False when the right-hand side or the
        operator's output is not finite, and then the solution is NaN (never a plausible
        number such as the zero starting point).
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

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt import implicit
      >>> A = jnp.array([[3.0, 1.0], [1.0, 2.0]])
      >>> b = jnp.array([4.0, 3.0])  # solution (1, 1)
      >>> solvers = [implicit.CG(), implicit.GMRES(), implicit.Neumann(steps=40, scale=0.4),
      ...            implicit.Dense()]
      >>> for solver in solvers:  # every solver is called the same way and reports the same info
      ...     x, info = solver(lambda v: A @ v, b)
      ...     assert isinstance(solver, implicit.LinearSolver)
      ...     print(type(solver).__name__, jnp.round(x, 4), bool(info.converged))
      CG [1. 1.] True
      GMRES [1. 1.] True
      Neumann [1. 1.] True
      Dense [1. 1.] True

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
        return finish(operator, b, x, iterations, negative_curvature, self.tol, trusted=True)

    def operator(self, matvec: Matvec) -> Matvec:
        """The operator actually solved for (for example with a ridge added)."""
        return matvec

    def _solve(self, matvec: Matvec, b: Vector, x0: Vector) -> tuple[Vector, Any, Any]:
        raise NotImplementedError


def finish(
    matvec: Matvec,
    b: Vector,
    x: Vector,
    iterations: Any,
    negative_curvature: Any,
    tol: Any,
    *,
    trusted: bool = False,
) -> tuple[Vector, LinearSolveInfo]:
    """``(x, info)`` with the residual recomputed from ``x``; x is NaN if it is not finite.

    A non-finite right-hand side (a NaN outer loss) or operator output stops the Krylov loops
    at once (their ``residual > threshold`` test is False for NaN), leaving the zero starting
    point: poisoning the solution makes the NaN reach the caller instead. metaopt's own solvers
    (``trusted``) poison ``x`` themselves from their running residual (:func:`nan_unless`), so
    here only ``x`` and ``b`` are tested and the recomputed residual (one more product) stays
    in the info alone, where XLA drops it when nothing reads it (``on_failure="ignore"``). For
    an outside solve function the residual decides.
    """
    residual = relative_residual(matvec, x, b)
    finite = _all_finite(x) & _all_finite(b) if trusted else jnp.isfinite(residual)
    x = nan_unless(finite, x)
    info = LinearSolveInfo(
        iterations=jnp.asarray(iterations, jnp.int32),
        relative_residual=residual,
        converged=finite & (residual <= tol),
        negative_curvature=jnp.asarray(negative_curvature, bool),
    )
    return x, info


def nan_unless(finite: jax.Array, x: Vector) -> Vector:
    """``x`` where ``finite`` is true, NaN elsewhere (a solver's non-finite residual)."""
    return jax.tree.map(lambda v: jnp.where(finite, v, jnp.nan).astype(v.dtype), x)


def _all_finite(tree: Vector) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


@dataclasses.dataclass(frozen=True)
class FunctionSolver(LinearSolver):
    """A jaxopt-style ``solve(matvec, b) -> x`` function used as a linear solver.

    The function reports no tolerance, so only a non-finite solution (or residual) counts as
    not converged; the residual of its solution is recomputed for the info (one product).

    Attributes:
      solve: the function; it may also return ``(x, LinearSolveInfo)``.
    """

    solve: Callable[..., Any] | None = None
    tol: float = float("inf")

    def __call__(self, matvec, b, x0=None):
        del x0  # a jaxopt-style solve chooses its own starting point
        out = self.solve(matvec, b)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], LinearSolveInfo):
            return out
        return finish(matvec, b, out, 0, False, self.tol)


def as_linear_solver(solve: Callable[..., Any]) -> LinearSolver:
    """``solve`` itself if it is a :class:`LinearSolver`, else wrapped as a function solver."""
    return solve if isinstance(solve, LinearSolver) else FunctionSolver(solve=solve)


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
