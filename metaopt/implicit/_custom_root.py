"""Implicit differentiation of any solver: ``custom_root`` and ``custom_fixed_point``.

The derivative of a solution :math:`x^\\star(\\theta)` of :math:`F(x^\\star, \\theta) = 0` follows
from the implicit function theorem, :math:`\\partial_x F\\, \\dot x = -\\partial_\\theta F\\,
\\dot\\theta`, without differentiating the solver's iterations. The rule is written as a JVP
whose linear solve is a ``lax.custom_linear_solve``: JAX transposes it for reverse mode, so
forward mode, reverse mode, higher derivatives, ``vmap`` and ``jit`` all come from one rule.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.implicit import _linear_solve_info as lsi
from metaopt.implicit._cg import CG
from metaopt.implicit._gmres import GMRES
from metaopt.implicit._linear_solve_info import LinearSolveInfo, LinearSolver

OnFailure = Literal["warn", "nan", "raise", "ignore"]
_POLICIES = ("warn", "nan", "raise", "ignore")


class ImplicitDifferentiationWarning(RuntimeWarning):
    """The linear solve of an implicit derivative did not converge or met negative curvature."""


def custom_root(
    optimality_fn: Callable[..., Any],
    solve: LinearSolver | None = None,
    *,
    has_aux: bool = False,
    on_failure: OnFailure = "warn",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorates a solver so its output is differentiated by the implicit function theorem.

    The decorated ``solver(init, *args, **kwargs)`` returns :math:`x^\star` (or
    ``(x_star, aux)`` with ``has_aux``) such that ``optimality_fn(x_star, *args, **kwargs)`` is
    zero, a pytree shaped like ``x_star``. Derivatives with respect to ``args`` and ``kwargs``
    are

    .. math::

       \partial_\theta x^\star = -\left(\partial_x F(x^\star, \theta)\right)^{-1}
       \partial_\theta F(x^\star, \theta),

    computed matrix-free with ``solve`` (a :mod:`metaopt.implicit` linear solver; :class:`CG`
    by default, right when :math:`F` is the gradient of a strictly convex objective, whose
    Jacobian is a symmetric positive definite Hessian). The solver's iterations are never
    differentiated, so it may use ``while_loop``, early stopping or any non-differentiable code.

    What works: ``jax.grad``/``jax.vjp`` (reverse mode), ``jax.jvp``/``jax.jacfwd`` (forward
    mode), second derivatives (``grad`` of ``grad``, Hessians), ``jit``, ``vmap`` of the
    solver, and ``grad`` of a ``vmap`` whose hyperparameters are not batched. Hyperparameters
    may be passed as arguments or closed over by ``optimality_fn`` and the solver: closed-over
    traced values are found and differentiated too. ``aux`` is not differentiated.

    The derivative with respect to ``init`` is zero by construction: :math:`x^\star` does not
    depend on where the solver started (if it does, the solver has not converged, and the
    implicit derivative is the derivative of the exact solution, not of the returned iterate).

    Failures: the linear solve reports :class:`LinearSolveInfo`; if it did not converge or met
    negative curvature, ``on_failure`` decides: ``"warn"`` (default; an
    :class:`ImplicitDifferentiationWarning` at run time, derivative returned as computed),
    ``"nan"`` (the derivative is NaN, so it cannot be used unknowingly), ``"raise"`` (a runtime
    error from the computation) or ``"ignore"``.

    Example: the minimizer of :math:`\tfrac12\lVert x\rVert^2 - \theta^\top x` is
    :math:`x^\star = \theta`, so :math:`\partial x^\star/\partial\theta = I`:

      >>> import jax, jax.numpy as jnp
      >>> from metaopt.implicit import custom_root
      >>> def optimality(x, theta):
      ...     return x - theta  # gradient of the objective
      >>> @custom_root(optimality)
      ... def argmin(init, theta):
      ...     def step(x, _):
      ...         return x - 0.5 * optimality(x, theta), None
      ...     return jax.lax.scan(step, init, None, length=60)[0]
      >>> print(jax.jacobian(argmin, argnums=1)(jnp.zeros(2), jnp.array([1.0, 2.0])))
      [[1. 0.]
       [0. 1.]]

    References:
      Blondel et al., `Efficient and Modular Implicit Differentiation
      <https://arxiv.org/abs/2105.15183>`_, NeurIPS 2022.

    Args:
      optimality_fn: :math:`F(x, *args, **kwargs)`, zero at the solution, same structure as
        :math:`x`.
      solve: linear solver for :math:`\partial_x F`; :class:`CG` if None.
      has_aux: the solver returns ``(x_star, aux)``.
      on_failure: ``"warn"``, ``"nan"``, ``"raise"`` or ``"ignore"``.

    Returns:
      A decorator for ``solver(init, *args, **kwargs)``.
    """
    linear_solver = CG() if solve is None else solve
    if not callable(linear_solver):
        raise TypeError(
            f"solve must be a linear solver such as metaopt.implicit.CG(), got solve={solve!r}."
        )
    if on_failure not in _POLICIES:
        raise ValueError(f"on_failure must be one of {_POLICIES}, got on_failure={on_failure!r}.")

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(solver)
        def wrapped(init, *args, **kwargs):
            keys = tuple(sorted(kwargs))
            values = tuple(kwargs[k] for k in keys)

            def residual(x, args, values):
                return optimality_fn(x, *args, **dict(zip(keys, values, strict=True)))

            def solve_fn(init, args, values):
                return solver(init, *args, **dict(zip(keys, values, strict=True)))

            # Closed-over traced values become explicit inputs, so they are differentiated
            # through the optimality condition like arguments (custom_jvp cannot see closures).
            residual, residual_consts = closure_convert(residual, init, args, values)
            solve_fn, solver_consts = closure_convert(solve_fn, init, args, values)
            _check_square(residual, init, args, values, residual_consts)
            implicit = _implicit_solution(residual, solve_fn, linear_solver, has_aux, on_failure)
            return implicit(init, args, values, tuple(residual_consts), tuple(solver_consts))

        return wrapped

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[..., Any],
    solve: LinearSolver | None = None,
    *,
    has_aux: bool = False,
    on_failure: OnFailure = "warn",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorates a solver of :math:`x^\star = T(x^\star, \theta)` for implicit differentiation.

    Equivalent to :func:`custom_root` with :math:`F(x, \theta) = T(x, \theta) - x`. The
    Jacobian :math:`\partial_x T - I` is not symmetric in general, so the default linear solver
    is :class:`GMRES`; when :math:`T` is a gradient step of a convex objective, the system is
    symmetric and :class:`CG` is cheaper.

    Example: :math:`T(x, \theta) = \tfrac12 (x + \theta / x)` has the fixed point
    :math:`\sqrt\theta`, whose derivative is :math:`1/(2\sqrt\theta)`:

      >>> import jax, jax.numpy as jnp
      >>> from metaopt.implicit import custom_fixed_point
      >>> def heron(x, theta):
      ...     return 0.5 * (x + theta / x)
      >>> @custom_fixed_point(heron)
      ... def square_root(init, theta):
      ...     return jax.lax.fori_loop(0, 30, lambda _, x: heron(x, theta), init)
      >>> print(jax.grad(square_root, argnums=1)(jnp.ones(()), jnp.array(4.0)))
      0.25

    Args:
      fixed_point_fn: :math:`T(x, *args, **kwargs)`, same structure as :math:`x`.
      solve: linear solver for :math:`\partial_x T - I`; :class:`GMRES` if None.
      has_aux: the solver returns ``(x_star, aux)``.
      on_failure: ``"warn"``, ``"nan"``, ``"raise"`` or ``"ignore"`` (see :func:`custom_root`).

    Returns:
      A decorator for ``solver(init, *args, **kwargs)``.
    """

    def optimality_fn(x, *args, **kwargs):
        return lsi.sub(fixed_point_fn(x, *args, **kwargs), x)

    return custom_root(
        optimality_fn,
        GMRES() if solve is None else solve,
        has_aux=has_aux,
        on_failure=on_failure,
    )


def closure_convert(fun: Callable[..., Any], *example_args: Any) -> tuple[Callable, list]:
    """``(converted, consts)``: ``fun`` with every closed-over tracer made an explicit input.

    ``converted(*args, *consts)`` equals ``fun(*args)``. Unlike ``jax.closure_convert``, which
    keeps tracers it judges unperturbed (a ``vmap`` tracer over a constant array) inside the
    function, every tracer is hoisted: under ``jax.grad(jax.jit(f))`` the JVP rule is traced
    after ``f``'s own trace, and a kept ``vmap`` tracer would escape its transformation there.
    """
    flat_args, in_tree = jax.tree.flatten(example_args)

    def flat_fun(*flat):
        return fun(*jax.tree.unflatten(in_tree, flat))

    closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(*flat_args)
    out_tree = jax.tree.structure(out_shape)
    consts = list(closed.consts)
    hoisted = [i for i, c in enumerate(consts) if isinstance(c, jax.core.Tracer)]

    def converted(*args_and_consts):
        args, hoisted_values = (
            args_and_consts[: len(example_args)],
            args_and_consts[len(example_args) :],
        )
        all_consts = list(consts)
        for i, value in zip(hoisted, hoisted_values, strict=True):
            all_consts[i] = value
        out = jax.core.eval_jaxpr(closed.jaxpr, all_consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(out_tree, out)

    return converted, [consts[i] for i in hoisted]


def _implicit_solution(residual, solve_fn, linear_solver, has_aux, on_failure):
    """The custom_jvp function ``(init, args, values, residual_consts, solver_consts) -> x``."""

    @jax.custom_jvp
    def implicit(init, args, values, residual_consts, solver_consts):
        return solve_fn(init, args, values, *solver_consts)

    @implicit.defjvp
    def implicit_jvp(primals, tangents):
        init, args, values, residual_consts, solver_consts = primals
        _, args_dot, values_dot, consts_dot, _ = tangents
        out = implicit(init, args, values, residual_consts, solver_consts)
        x = out[0] if has_aux else out

        def theta_part(args, values, consts):
            return residual(x, args, values, *consts)

        _, rhs = jax.jvp(
            theta_part, (args, values, residual_consts), (args_dot, values_dot, consts_dot)
        )
        rhs = _linear_in(rhs, (args_dot, values_dot, consts_dot))

        def matvec(u):
            return jax.jvp(lambda y: residual(y, args, values, *residual_consts), (x,), (u,))[1]

        def solve_with_policy(operator, b):
            solution, info = linear_solver(operator, b)
            budgeted = getattr(linear_solver, "fixed_iterations", False)
            return _apply_policy(solution, info, on_failure, budgeted=budgeted)

        x_dot = jax.lax.custom_linear_solve(
            matvec,
            lsi.scale(-1.0, rhs),
            solve=solve_with_policy,
            transpose_solve=solve_with_policy,
            symmetric=linear_solver.symmetric,
        )
        if has_aux:
            return out, (x_dot, _zero_tangent(out[1]))
        return out, x_dot

    return implicit


def _apply_policy(
    solution: Any, info: LinearSolveInfo, on_failure: OnFailure, *, budgeted: bool = False
) -> Any:
    # A fixed iteration budget (iMAML's few CG steps) leaves a residual by design: only
    # negative curvature counts as a failure there.
    failed = info.negative_curvature if budgeted else ~info.converged | info.negative_curvature
    if on_failure == "nan":
        return jax.tree.map(lambda s: jnp.where(failed, jnp.nan, s), solution)
    if on_failure in ("warn", "raise"):
        call_host_on_failure(
            failed, functools.partial(_report, raise_error=on_failure == "raise"), info
        )
    return solution


def call_host_on_failure(failed: jax.Array, report: Callable[..., None], *operands: Any) -> None:
    """Calls ``report(failed, *operands)`` on the host, only when ``failed`` is true somewhere.

    A host callback costs milliseconds (about 5 ms on XLA:CPU), so it must stay off the common,
    successful path. A ``lax.cond`` does that for one solve; under ``vmap`` its predicate would be
    batched and both branches run on every call, so a custom batching rule reduces the
    predicate over the batch first (recursively, for nested ``vmap``) and ``report`` receives
    the batched ``failed`` and operands. Nothing here is differentiated.
    """
    failed, operands = jax.lax.stop_gradient((failed, operands))
    _report_if(failed, failed, operands, report)


def _report_if(predicate: jax.Array, failed: Any, operands: Any, report: Callable) -> None:
    @jax.custom_batching.custom_vmap
    def report_if(predicate, failed, operands):
        jax.lax.cond(
            jnp.any(predicate),
            lambda: jax.debug.callback(report, failed, *operands),
            lambda: None,
        )
        return predicate

    @report_if.def_vmap
    def _batched(axis_size, in_batched, predicate, failed, operands):
        def stacked(tree, batched):
            return jax.tree.map(
                lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *jnp.shape(x))),
                tree,
                batched,
            )

        predicate_batched, failed_batched, operands_batched = in_batched
        failed = stacked(failed, failed_batched)
        operands = stacked(operands, operands_batched)
        if predicate_batched:
            predicate = jnp.any(predicate, axis=0)
        return report_if(predicate, failed, operands), False

    report_if(predicate, failed, operands)


def _report(failed: Any, info: LinearSolveInfo, *, raise_error: bool) -> None:
    failed = np.asarray(failed)
    if not failed.any():
        return
    message = (
        "the linear solve of an implicit derivative failed "
        f"(converged={np.asarray(info.converged).tolist()}, "
        f"relative_residual={np.asarray(info.relative_residual).tolist()}, "
        f"iterations={np.asarray(info.iterations).tolist()}, "
        f"negative_curvature={np.asarray(info.negative_curvature).tolist()}); the derivative "
        "may be wrong. Check that the solver converged, raise the linear solver's maxiter, add "
        "ridge, or use MINRES/GMRES for an indefinite or non-symmetric Jacobian."
    )
    raise_or_warn(message, ImplicitDifferentiationWarning, raise_error=raise_error)


def raise_or_warn(message: str, category: type[Warning], *, raise_error: bool) -> None:
    """Raises RuntimeError(message) or issues the warning, as a failure policy asks."""
    if raise_error:
        raise RuntimeError(message)
    warnings.warn(message, category, stacklevel=3)


def _linear_in(rhs: Any, tangents: Any) -> Any:
    """Makes every leaf of ``rhs`` a (possibly zero) linear function of ``tangents``.

    A leaf of the optimality condition that does not depend on the hyperparameters has a
    constant zero tangent, and ``custom_linear_solve`` cannot be transposed (reverse mode) with
    a right-hand side that is partly constant. Adding zero times the tangents fixes the
    structure without changing a value.
    """
    leaves = [jnp.asarray(t) for t in jax.tree.leaves(tangents)]
    leaves = [t for t in leaves if jnp.issubdtype(t.dtype, jnp.inexact)]
    if not leaves:
        return rhs
    anchor = sum(jnp.sum(t) for t in leaves) * 0.0
    return jax.tree.map(lambda r: r + anchor.astype(r.dtype), rhs)


def _zero_tangent(tree: Any) -> Any:
    def zero(leaf):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jnp.zeros_like(leaf)
        return np.zeros(leaf.shape, dtype=jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def _check_square(residual, init, args, values, consts) -> None:
    """Raises when optimality_fn's output is not shaped like the solution."""
    out = jax.eval_shape(lambda: residual(init, args, values, *consts))
    expected = jax.eval_shape(lambda: init)
    if jax.tree.structure(out) != jax.tree.structure(expected) or any(
        a.shape != b.shape
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True)
    ):
        raise ValueError(
            "optimality_fn must return a pytree shaped like the solution (a square system), "
            f"got {jax.tree.structure(out)} with shapes "
            f"{[a.shape for a in jax.tree.leaves(out)]} for a solution shaped "
            f"{[b.shape for b in jax.tree.leaves(expected)]}."
        )
