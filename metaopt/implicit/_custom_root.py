"""Implicit differentiation of any solver: ``custom_root`` and ``custom_fixed_point``.

The derivative of a solution :math:`x^\\star(\\theta)` of :math:`F(x^\\star, \\theta) = 0` follows
from the implicit function theorem, :math:`\\partial_x F\\, \\dot x = -\\partial_\\theta F\\,
\\dot\\theta`, without differentiating the solver's iterations. The solver runs first, on the
primal values only; its solution then passes through a ``custom_jvp`` identity whose JVP is that
rule, with the linear solve written as a ``lax.custom_linear_solve``. JAX transposes it for reverse
mode, so forward mode, reverse mode, higher derivatives, ``vmap`` and ``jit`` all come from one
rule, and the solver itself may be any code (NumPy or SciPy included, outside ``jit``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from metaopt.implicit import _linear_solve_info as lsi
from metaopt.implicit._cg import CG
from metaopt.implicit._factorized import Factorized, split_state
from metaopt.implicit._failure import POLICIES, OnFailure, apply_policy
from metaopt.implicit._failure import (
    ImplicitDifferentiationWarning as ImplicitDifferentiationWarning,
)
from metaopt.implicit._failure import raise_or_warn as raise_or_warn
from metaopt.implicit._failure import report_on_failure as report_on_failure
from metaopt.implicit._gmres import GMRES
from metaopt.implicit._linear_solve_info import LinearSolver, as_linear_solver

SolveArgument = LinearSolver | Callable[..., Any] | None


def custom_root(
    optimality_fn: Callable[..., Any],
    solve: SolveArgument = None,
    *,
    has_aux: bool = False,
    on_failure: OnFailure = "warn",
    reference_signature: Any = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorates a solver so its output is differentiated by the implicit function theorem.

    The decorated ``solver(init, *args, **kwargs)`` returns :math:`x^\star` (or
    ``(x_star, aux)`` with ``has_aux``) such that ``optimality_fn(x_star, *args, **kwargs)`` is
    zero, a pytree shaped like ``x_star``. Derivatives with respect to ``args`` and ``kwargs``
    are

    .. math::

       \partial_\theta x^\star = -\left(\partial_x F(x^\star, \theta)\right)^{-1}
       \partial_\theta F(x^\star, \theta),

    computed matrix-free with ``solve`` (:class:`CG` by default, right when :math:`F` is the
    gradient of a strictly convex objective, whose Jacobian is a symmetric positive definite
    Hessian).

    The solver is called once, on the primal values of its arguments (their derivatives are
    stopped), and is never traced for differentiation: it may use ``while_loop``, a Python loop
    that stops early, NumPy or SciPy. Outside ``jit`` its arguments are concrete arrays, so a
    NumPy solver works with ``jax.grad``, ``jax.jvp`` and ``jax.jacobian``. Under ``jit`` or
    ``vmap`` the solver receives tracers, as any function does: wrap a NumPy solver in
    ``jax.pure_callback`` there (see the implicit differentiation guide). Such a solver must
    receive its hyperparameters as arguments; ``optimality_fn`` must be JAX code.

    Arguments follow jaxopt's conventions: the call is bound to the solver's signature (defaults
    of positional parameters included) and ``optimality_fn`` receives the same arguments after
    the first, positional ones by position and keyword-only ones by name. ``init`` may be None
    when the solver does not use it.

    What works: ``jax.grad``/``jax.vjp`` (reverse mode), ``jax.jvp``/``jax.jacfwd`` (forward
    mode), second derivatives (``grad`` of ``grad``, Hessians), ``jit``, ``vmap`` of the
    solver, and ``grad`` of a ``vmap`` whose hyperparameters are not batched. Hyperparameters
    may be passed as arguments or closed over by ``optimality_fn``: closed-over traced values
    are found and differentiated too. ``aux`` is not differentiated.

    The derivative with respect to ``init`` is zero by construction: :math:`x^\star` does not
    depend on where the solver started (if it does, the solver has not converged, and the
    implicit derivative is the derivative of the exact solution, not of the returned iterate).

    Failures: the linear solve reports :class:`LinearSolveInfo`; if it did not converge or met
    negative curvature, ``on_failure`` decides: ``"warn"`` (default; an
    :class:`ImplicitDifferentiationWarning` at run time, derivative returned as computed),
    ``"nan"`` (the derivative is NaN, so it cannot be used unknowingly), ``"raise"`` (a
    ``RuntimeError`` whose first line is the message; inside ``jit``, XLA delivers it as a
    ``jax.errors.JaxRuntimeError`` whose text ends with that message) or ``"ignore"``. A
    non-finite cotangent or tangent (a NaN outer loss) gives a NaN derivative under every
    policy.

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
      optimality_fn: :math:`F(x, *args, **kwargs)`, zero at the solution, same structure and
        dtypes as :math:`x`.
      solve: linear solver for :math:`\partial_x F`: a :mod:`metaopt.implicit` solver
        (:class:`CG` if None), or a jaxopt-style function ``solve(matvec, b) -> x`` such as
        ``jaxopt.linear_solve.solve_cg``, whose solution counts as failed only when it is not
        finite (it reports no tolerance). :class:`Factorized` solves with a factorization
        of :math:`\partial_x F` that the solver returns as ``aux`` (``has_aux=True``): two
        triangular solves for a Cholesky factor, instead of an iterative solve.
      has_aux: the solver returns ``(x_star, aux)``.
      on_failure: ``"warn"``, ``"nan"``, ``"raise"`` or ``"ignore"``.
      reference_signature: jaxopt's argument, accepted so jaxopt programs run unchanged: a
        function (or ``inspect.Signature``) that ``optimality_fn``'s arguments must fit; a call
        that does not fit raises a TypeError before anything is solved.

    Returns:
      A decorator for ``solver(init, *args, **kwargs)``.
    """
    linear_solver = linear_solver_of(solve, CG)
    check_policy(on_failure)
    factorized = isinstance(linear_solver, Factorized)
    if factorized and not has_aux:
        raise ValueError(
            "solve=Factorized(...) solves with the factorization the solver returns as aux, "
            "got has_aux=False. Return (x_star, aux) from the solver and pass has_aux=True."
        )
    reference = None if reference_signature is None else _signature_of(reference_signature)

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        signature = _signature_or_none(solver)

        @functools.wraps(solver)
        def wrapped(*args, **kwargs):
            args, kwargs = _bind(signature, solver, args, kwargs)
            if reference is not None:
                _bind(reference, reference_signature, args, kwargs)
            # Only the primal values reach the solver: a NumPy solver sees concrete arrays
            # outside jit, and a JAX solver's iterations are never differentiated.
            out = solver(*_primal(args), **_primal(kwargs))
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        "with has_aux=True the solver must return (solution, aux), got "
                        f"{type(out).__name__}. Return a pair, or use has_aux=False."
                    )
                solution, aux = out
            else:
                solution, aux = out, None
            aux = _primal(aux)
            solution = implicit_solution(
                optimality_fn,
                _primal(solution),
                args[1:],
                kwargs,
                linear_solver,
                on_failure,
                state=aux if factorized else None,
            )
            return (solution, aux) if has_aux else solution

        return wrapped

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[..., Any],
    solve: SolveArgument = None,
    *,
    has_aux: bool = False,
    on_failure: OnFailure = "warn",
    reference_signature: Any = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorates a solver of :math:`x^\star = T(x^\star, \theta)` for implicit differentiation.

    Equivalent to :func:`custom_root` with :math:`F(x, \theta) = T(x, \theta) - x` (same
    conventions for arguments, solvers and failures). The Jacobian :math:`\partial_x T - I` is
    not symmetric in general, so the default linear solver is :class:`GMRES`; when :math:`T` is
    a gradient step of a convex objective, the system is symmetric and :class:`CG` is cheaper.

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
      solve: linear solver for :math:`\partial_x T - I`; :class:`GMRES` if None;
        :class:`Factorized` with a factorization of :math:`\partial_x T - I` (sign included)
        returned as ``aux``.
      has_aux: the solver returns ``(x_star, aux)``.
      on_failure: ``"warn"``, ``"nan"``, ``"raise"`` or ``"ignore"`` (see :func:`custom_root`).
      reference_signature: as in :func:`custom_root` (jaxopt's argument; None checks nothing).

    Returns:
      A decorator for ``solver(init, *args, **kwargs)``.
    """

    def optimality_fn(x, *args, **kwargs):
        return lsi.sub(fixed_point_fn(x, *args, **kwargs), x)

    return custom_root(
        optimality_fn,
        linear_solver_of(solve, GMRES),
        has_aux=has_aux,
        on_failure=on_failure,
        reference_signature=reference_signature,
    )


def implicit_solution(
    optimality_fn: Callable[..., Any],
    solution: Any,
    args: tuple,
    kwargs: dict,
    linear_solver: LinearSolver,
    on_failure: OnFailure,
    state: Any = None,
) -> Any:
    """``solution``, differentiated with respect to ``args`` and ``kwargs`` as a root of F.

    ``state`` is what a :class:`Factorized` linear solver solves with (the solver's aux);
    other linear solvers take none.
    """
    if isinstance(linear_solver, Factorized) and state is None:
        raise TypeError(
            "Factorized needs the solver's factorization, got none: a solver decorated by "
            "custom_root or custom_fixed_point with has_aux=True must return (x_star, aux) "
            "with aux not None; root_vjp and root_jvp take a matrix-free linear solver such "
            "as CG()."
        )
    keys = tuple(sorted(kwargs))
    values = tuple(kwargs[k] for k in keys)

    def residual(x, args, values):
        return optimality_fn(x, *args, **dict(zip(keys, values, strict=True)))

    # Closed-over traced values become explicit inputs, so they are differentiated through
    # the optimality condition like arguments (custom_jvp cannot see closures).
    residual, consts = closure_convert(residual, solution, args, values)
    _check_optimality_output(residual, solution, args, values, consts)
    arrays, rebuild = split_state(state)
    implicit = _implicit_rule(residual, linear_solver, on_failure, rebuild)
    return implicit(solution, args, values, tuple(consts), arrays)


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


def _implicit_rule(residual, linear_solver, on_failure, rebuild_state):
    """The custom_jvp identity ``(x, args, values, consts, state) -> x`` carrying the implicit
    JVP; ``state`` holds the array leaves of a :class:`Factorized` solver's aux (primal data,
    its tangents ignored), empty for other solvers."""

    @jax.custom_jvp
    def implicit(x, args, values, consts, state):
        del args, values, consts, state
        return x

    @implicit.defjvp
    def implicit_jvp(primals, tangents):
        x, args, values, consts, state = primals
        _, args_dot, values_dot, consts_dot, _ = tangents
        # Applying the rule to the primals again gives x its implicit derivative at any outer
        # level of differentiation (second derivatives); x's own tangent is ignored.
        x = implicit(x, args, values, consts, state)

        def theta_part(args, values, consts):
            return residual(x, args, values, *consts)

        _, rhs = jax.jvp(theta_part, (args, values, consts), (args_dot, values_dot, consts_dot))
        rhs = _linear_in(rhs, (args_dot, values_dot, consts_dot))

        def matvec(u):
            return jax.jvp(lambda y: residual(y, args, values, *consts), (x,), (u,))[1]

        def with_policy(solver):
            def solve(operator, b):
                solution, info = solver(operator, b)
                budgeted = getattr(solver, "fixed_iterations", False)
                return apply_policy(solution, info, on_failure, budgeted=budgeted)

            return solve

        if isinstance(linear_solver, Factorized):
            solve, transpose_solve = linear_solver.bind(rebuild_state(state))
        else:
            solve = transpose_solve = linear_solver
        x_dot = jax.lax.custom_linear_solve(
            matvec,
            lsi.scale(-1.0, rhs),
            solve=with_policy(solve),
            transpose_solve=with_policy(transpose_solve),
            symmetric=linear_solver.symmetric,
        )
        return x, x_dot

    return implicit


def _primal(tree: Any) -> Any:
    """``tree`` with the derivatives of traced leaves stopped; other leaves untouched.

    Outside ``jit`` this turns JVP tracers into concrete arrays, which is what lets a NumPy
    solver run under ``jax.grad``; NumPy arrays and Python numbers pass through unchanged.
    """
    return jax.tree.map(
        lambda v: jax.lax.stop_gradient(v) if isinstance(v, jax.core.Tracer) else v, tree
    )


def linear_solver_of(solve: SolveArgument, default: type[LinearSolver]) -> LinearSolver:
    if solve is None:
        return default()
    if isinstance(solve, bool):
        raise TypeError(
            f"solve must be a linear solver, got solve={solve!r}. jaxopt's second positional "
            "argument was has_aux; in metaopt has_aux is keyword-only: write has_aux=True."
        )
    if not callable(solve):
        raise TypeError(
            "solve must be a linear solver such as metaopt.implicit.CG() or a function "
            f"solve(matvec, b) -> x, got solve={solve!r}."
        )
    return as_linear_solver(solve)


def check_policy(on_failure: Any) -> None:
    if not isinstance(on_failure, str) or on_failure not in POLICIES:
        raise ValueError(f"on_failure must be one of {POLICIES}, got on_failure={on_failure!r}.")


def _signature_or_none(fun: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fun)
    except (TypeError, ValueError):  # a builtin or an object without a signature
        return None


def _signature_of(reference: Any) -> inspect.Signature:
    if isinstance(reference, inspect.Signature):
        return reference
    signature = _signature_or_none(reference) if callable(reference) else None
    if signature is None:
        raise TypeError(
            "reference_signature must be a function or an inspect.Signature, got "
            f"reference_signature={reference!r}."
        )
    return signature


def _bind(signature, fun, args, kwargs) -> tuple[tuple, dict]:
    """Binds a call to ``signature``, with the defaults of positional parameters (jaxopt)."""
    if signature is None:
        return tuple(args), dict(kwargs)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        name = getattr(fun, "__name__", repr(fun))
        raise TypeError(f"the call does not fit {name}{signature}: {error}.") from None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for name, parameter in signature.parameters.items():
        if parameter.kind in positional and name not in bound.arguments:
            if parameter.default is not inspect.Parameter.empty:
                bound.arguments[name] = parameter.default
    if not bound.args:
        raise TypeError(
            "the solver must take its initial point (None if unused) as first positional "
            f"argument, got a call with no positional argument for {signature}."
        )
    return tuple(bound.args), dict(bound.kwargs)


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


def _check_optimality_output(residual, solution, args, values, consts) -> None:
    """Raises when optimality_fn's output is not shaped and typed like the solution."""
    out = jax.eval_shape(lambda: residual(solution, args, values, *consts))
    expected = jax.eval_shape(lambda: solution)
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
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, want), got in zip(paths, jax.tree.leaves(out), strict=True):
        if got.dtype != want.dtype:
            leaf = jax.tree_util.keystr(path) or "the solution"
            raise TypeError(
                f"optimality_fn returns {got.dtype} for {leaf}, whose solution is "
                f"{want.dtype}: the implicit derivative's linear system needs one dtype. Cast "
                f"the output, for example return F(x, theta).astype(x.dtype), or solve in "
                f"{got.dtype}."
            )
