"""``Factorized``: the adjoint system solved with a factorization the solver already computed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.implicit import _linear_solve_info as lsi
from metaopt.implicit._linear_solve_info import LinearSolveInfo, LinearSolver, Matvec, Vector

# ``solve(aux, b) -> x`` for one system, with the solver's aux; see Factorized.
SolveWithAux = Callable[[Any, Vector], Vector]


@dataclasses.dataclass(frozen=True, init=False)
class Factorized(LinearSolver):
    r"""Solves the implicit derivative's linear system with the solver's own factorization.

    A direct solver of :math:`F(x, \theta) = 0` often factors :math:`A = \partial_x F(x^\star,
    \theta)` on the way (the Cholesky factor of :math:`G + \operatorname{diag}(\lambda)` for
    ridge regression, an LU or eigendecomposition for a small dense problem). The implicit
    derivative needs :math:`A^{-1}` (forward mode) or :math:`A^{-\top}` (reverse mode) applied
    to one vector, which with the factor costs two triangular solves instead of an iterative
    solve of tens of matrix-vector products.

    Use it with :func:`custom_root` (or :func:`custom_fixed_point`) and ``has_aux=True``: the
    solver returns ``(x_star, aux)``, and ``solve(aux, b)`` returns :math:`A^{-1} b` for a
    right-hand side ``b`` shaped like ``x_star``. The decorated function still returns
    ``(x_star, aux)``. The factor is primal data: no derivative flows through it.

    **The contract.** ``aux`` must factor :math:`\partial_x F` at the *returned* solution and
    the *same* hyperparameters, with :math:`F` exactly ``optimality_fn`` (its sign and scale
    included; for :func:`custom_fixed_point`, :math:`\partial_x T - I`). A factor of another
    matrix (a stale factor from an earlier step, the Hessian at the last iterate of an
    unconverged solver, a different ridge) gives a wrong derivative without any error. With
    ``check=True`` each solve also computes its residual
    :math:`\lVert b - A x\rVert / \lVert b\rVert` with one matrix-vector product of
    :math:`\partial_x F` (or its transpose) and reports a residual above ``tol`` through
    ``on_failure`` like any unconverged linear solve. Without it only a non-finite solution
    counts as a failure.

    Not for matrix-free iterative solvers (they compute no factor: use :class:`CG` and
    friends), nor for ``bilevel.solve``, whose inner loop is an optax transform.

    Example: ridge regression, whose inner Hessian :math:`X^\top X + \operatorname{diag}(p)` is
    factored by the forward solve; ``jax.scipy.linalg.cho_solve(factor, b)`` has exactly the
    signature ``solve(aux, b)``:

      >>> import jax, jax.numpy as jnp
      >>> from jax.scipy.linalg import cho_factor, cho_solve
      >>> from metaopt.implicit import Factorized, custom_root
      >>> X = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> y = jnp.array([1.0, 2.0, 0.0])
      >>> def optimality(w, penalty):  # gradient of 0.5 |X w - y|^2 + 0.5 sum(penalty w^2)
      ...     return X.T @ (X @ w - y) + penalty * w
      >>> @custom_root(optimality, solve=Factorized(cho_solve, symmetric=True), has_aux=True)
      ... def ridge(init, penalty):
      ...     factor = cho_factor(X.T @ X + jnp.diag(penalty))  # d optimality / dw
      ...     return cho_solve(factor, X.T @ y), factor
      >>> def exact(penalty):
      ...     return jnp.linalg.solve(X.T @ X + jnp.diag(penalty), X.T @ y)
      >>> penalty = jnp.array([0.5, 2.0])
      >>> reused = jax.jacobian(lambda p: ridge(None, p)[0])(penalty)
      >>> bool(jnp.allclose(reused, jax.jacobian(exact)(penalty), rtol=1e-6, atol=1e-7))
      True

    Attributes:
      solve: ``solve(aux, b) -> x`` with :math:`\partial_x F\, x = b`; ``aux`` is the solver's
        second output, ``b`` and ``x`` are shaped like the solution (``x`` is cast to ``b``'s
        dtypes). Used by forward mode, and by reverse mode when ``symmetric``.
      transpose_solve: ``transpose_solve(aux, b) -> x`` with :math:`(\partial_x F)^\top x =
        b`, for reverse mode (``jax.grad``) when the matrix is not symmetric, for example
        ``lambda lu, b: jax.scipy.linalg.lu_solve(lu, b, trans=1)``. Required unless
        ``symmetric``.
      symmetric: :math:`\partial_x F` is symmetric (the Hessian of an objective: Cholesky,
        eigendecomposition), so ``solve`` also solves the transposed system.
      check: recompute each solve's residual (one product) and report it when above ``tol``.
      tol: relative residual above which a checked solve counts as failed. A direct solve's
        residual is about machine epsilon times the condition number: in float32 use a looser
        value such as ``1e-3``.
    """

    solve: SolveWithAux
    transpose_solve: SolveWithAux | None
    symmetric: bool
    check: bool

    # Written out so that ``solve`` comes first (a dataclass would put the base's ``tol`` first).
    def __init__(
        self,
        solve: SolveWithAux,
        transpose_solve: SolveWithAux | None = None,
        *,
        symmetric: bool = False,
        check: bool = False,
        tol: float = 1e-6,
    ):
        for name, value in (
            ("solve", solve),
            ("transpose_solve", transpose_solve),
            ("symmetric", symmetric),
            ("check", check),
            ("tol", tol),
        ):
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self):
        lsi.check_tolerance(self.tol)
        if not callable(self.solve):
            raise TypeError(
                "solve must be a function solve(aux, b) -> x that solves the system with the "
                f"solver's factorization, got solve={self.solve!r}. For a Cholesky factor "
                "returned by the solver, pass jax.scipy.linalg.cho_solve."
            )
        for name in ("symmetric", "check"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {name}={value!r}.")
        if self.transpose_solve is not None and not callable(self.transpose_solve):
            raise TypeError(
                "transpose_solve must be None or a function transpose_solve(aux, b) -> x, got "
                f"transpose_solve={self.transpose_solve!r}."
            )
        if self.symmetric and self.transpose_solve is not None:
            raise ValueError(
                "transpose_solve is not used when symmetric=True (solve serves both systems); "
                "drop transpose_solve, or pass symmetric=False for a non-symmetric matrix."
            )
        if not self.symmetric and self.transpose_solve is None:
            raise ValueError(
                "a non-symmetric Factorized needs transpose_solve for reverse mode (jax.grad), "
                "got transpose_solve=None with symmetric=False. Pass "
                "transpose_solve=lambda aux, b: ... (for an LU factor: "
                "jax.scipy.linalg.lu_solve(aux, b, trans=1)), or symmetric=True if "
                "d optimality_fn / dx is symmetric (a Hessian)."
            )

    def __call__(self, matvec: Matvec, b: Vector, x0: Vector | None = None):
        raise TypeError(
            "Factorized solves with the factorization the solver returns as aux, so it cannot "
            "be called on a matrix-vector product alone. Use it as custom_root(optimality_fn, "
            "solve=Factorized(...), has_aux=True) with a solver that returns (x_star, aux)."
        )

    def bind(self, state: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """``(solve, transpose_solve)`` with ``state`` (the solver's aux), each called as
        ``(matvec, b) -> (x, LinearSolveInfo)`` like a linear solver (``matvec`` is only read by
        the check).
        """
        transpose = self.solve if self.symmetric else self.transpose_solve
        return (
            _bound(self.solve, state, self.check, self.tol),
            _bound(transpose, state, self.check, self.tol),
        )


def _bound(solve: SolveWithAux, state: Any, check: bool, tol: float) -> Callable[..., Any]:
    def solve_with_state(matvec: Matvec, b: Vector) -> tuple[Vector, LinearSolveInfo]:
        x = _like(solve(state, b), b)
        if check:
            return lsi.finish(matvec, b, x, 0, False, tol)
        # Unchecked, nothing is measured: the solution fails only when it is not finite (a
        # NaN cotangent, or a singular factor).
        info = LinearSolveInfo(
            iterations=jnp.zeros([], jnp.int32),
            relative_residual=jnp.full([], jnp.nan, _real_dtype(b)),
            converged=_all_finite(x),
            negative_curvature=jnp.zeros([], bool),
        )
        return x, info

    return solve_with_state


def _like(x: Vector, b: Vector) -> Vector:
    """``x`` cast to ``b``'s dtypes, after checking it has ``b``'s structure and shapes."""
    x_tree, b_tree = jax.tree.structure(x), jax.tree.structure(b)
    x_leaves, b_leaves = jax.tree.leaves(x), jax.tree.leaves(b)
    if x_tree != b_tree or any(
        jnp.shape(u) != jnp.shape(v) for u, v in zip(x_leaves, b_leaves, strict=True)
    ):
        raise ValueError(
            "Factorized's solve(aux, b) must return a solution shaped like b (and like the "
            f"root), got {x_tree} with shapes {[jnp.shape(u) for u in x_leaves]} for b "
            f"{b_tree} with shapes {[jnp.shape(v) for v in b_leaves]}."
        )
    return jax.tree.map(lambda u, v: jnp.asarray(u).astype(v.dtype), x, b)


def _all_finite(tree: Vector) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def _real_dtype(tree: Vector) -> Any:
    leaves = jax.tree.leaves(tree)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    return jnp.finfo(jnp.promote_types(dtype, jnp.float32)).dtype


def split_state(state: Any) -> tuple[tuple, Callable[[tuple], Any]]:
    """``(arrays, rebuild)``: the array leaves of ``state``, and ``rebuild(arrays) -> state``.

    The arrays travel as inputs of the implicit rule (a closed-over traced factor would escape
    its trace under ``jax.grad(jax.jit(f))``); other leaves, such as the Python bool ``lower``
    of ``jax.scipy.linalg.cho_factor``, stay Python constants so the solve can branch on them.
    """
    leaves, treedef = jax.tree.flatten(state)
    is_array = [isinstance(leaf, jax.Array | np.ndarray | np.generic) for leaf in leaves]
    arrays = tuple(leaf for leaf, a in zip(leaves, is_array, strict=True) if a)

    def rebuild(new_arrays: tuple) -> Any:
        it = iter(new_arrays)
        filled = [next(it) if a else leaf for leaf, a in zip(leaves, is_array, strict=True)]
        return jax.tree.unflatten(treedef, filled)

    return arrays, rebuild
