"""``root_vjp`` and ``root_jvp``: the implicit derivative of a root computed elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from metaopt.implicit._cg import CG
from metaopt.implicit._custom_root import (
    SolveArgument,
    check_policy,
    implicit_solution,
    linear_solver_of,
)
from metaopt.implicit._failure import OnFailure


def root_vjp(
    optimality_fn: Callable[..., Any],
    sol: Any,
    args: tuple,
    cotangent: Any,
    solve: SolveArgument = None,
    *,
    on_failure: OnFailure = "warn",
) -> tuple:
    r"""Vector-Jacobian product of a root :math:`x^\star(\theta)` of ``optimality_fn``.

    With :math:`F(x^\star, \theta) = 0`, returns :math:`-u^\top \partial_\theta F` where
    :math:`(\partial_x F)^\top u = v` for the cotangent :math:`v`: the reverse-mode derivative
    that :func:`custom_root` attaches, for a solution computed elsewhere. jaxopt's function of
    the same name, with the same arguments.

    Example: :math:`F(x, \theta) = x^3 - \theta` has the root :math:`\theta^{1/3}`, whose
    derivative at :math:`\theta = 8` is :math:`1/12`:

      >>> import jax.numpy as jnp
      >>> from metaopt.implicit import root_vjp
      >>> (grad,) = root_vjp(lambda x, t: x**3 - t, jnp.array(2.0), (jnp.array(8.0),), 1.0)
      >>> print(round(float(grad), 6))
      0.083333

    Args:
      optimality_fn: :math:`F(x, *args)`, zero at ``sol``.
      sol: the root (a pytree); treated as a constant.
      args: the tuple of arguments of ``optimality_fn`` after ``sol``.
      cotangent: :math:`v`, shaped like ``sol``.
      solve: linear solver (as in :func:`custom_root`); :class:`CG` if None.
      on_failure: policy for a failed linear solve (as in :func:`custom_root`).

    Returns:
      A tuple with one cotangent per element of ``args``, each shaped like it.
    """
    linear_solver = linear_solver_of(solve, CG)
    check_policy(on_failure)

    def solution(*args):
        return implicit_solution(optimality_fn, sol, args, {}, linear_solver, on_failure)

    out, vjp = jax.vjp(solution, *tuple(args))
    return vjp(jax.tree.map(_tangent_like, out, cotangent))


def root_jvp(
    optimality_fn: Callable[..., Any],
    sol: Any,
    args: tuple,
    tangents: tuple,
    solve: SolveArgument = None,
    *,
    on_failure: OnFailure = "warn",
) -> Any:
    r"""Jacobian-vector product of a root :math:`x^\star(\theta)` of ``optimality_fn``.

    Returns :math:`\dot x = -(\partial_x F)^{-1} \partial_\theta F\, \dot\theta`, the
    forward-mode derivative that :func:`custom_root` attaches. jaxopt's function of the same
    name, with the same arguments.

    Example (the cube root of :func:`root_vjp`):

      >>> import jax.numpy as jnp
      >>> from metaopt.implicit import root_jvp
      >>> t = jnp.array(8.0)
      >>> print(round(float(root_jvp(lambda x, t: x**3 - t, jnp.array(2.0), (t,), (1.0,))), 6))
      0.083333

    Args:
      optimality_fn: :math:`F(x, *args)`, zero at ``sol``.
      sol: the root (a pytree); treated as a constant.
      args: the tuple of arguments of ``optimality_fn`` after ``sol``.
      tangents: one tangent per element of ``args``, each shaped like it.
      solve: linear solver (as in :func:`custom_root`); :class:`CG` if None.
      on_failure: policy for a failed linear solve (as in :func:`custom_root`).

    Returns:
      :math:`\dot x`, shaped like ``sol``.
    """
    args, tangents = tuple(args), tuple(tangents)
    if len(args) != len(tangents):
        raise ValueError(
            f"root_jvp needs one tangent per argument, got {len(tangents)} tangents for "
            f"{len(args)} args."
        )
    linear_solver = linear_solver_of(solve, CG)
    check_policy(on_failure)

    def solution(*args):
        return implicit_solution(optimality_fn, sol, args, {}, linear_solver, on_failure)

    tangents = tuple(jax.tree.map(_tangent_like, a, t) for a, t in zip(args, tangents, strict=True))
    return jax.jvp(solution, args, tangents)[1]


def _tangent_like(primal: Any, tangent: Any) -> Any:
    # jaxopt accepts Python numbers as tangents; jax.jvp needs the primal's dtype.
    dtype = jnp.result_type(primal)
    return jnp.asarray(tangent, dtype) if jnp.issubdtype(dtype, jnp.inexact) else tangent
