"""Failure policies of implicit differentiation, and host reporting that stays off the fast path.

A failure found on the device (a linear solve that did not converge, negative curvature, an
inner solve short of its tolerance) is reported through a host callback that runs only when
something failed: a warning, or an error for ``on_failure="raise"``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.debugging import debug_effect  # no public effect type for host reporting
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from metaopt.implicit._linear_solve_info import LinearSolveInfo

OnFailure = Literal["warn", "nan", "raise", "ignore"]
POLICIES = ("warn", "nan", "raise", "ignore")


class ImplicitDifferentiationWarning(RuntimeWarning):
    """The linear solve of an implicit derivative did not converge or met negative curvature.

    Example:
      >>> import warnings
      >>> import jax, jax.numpy as jnp
      >>> from metaopt.implicit import CG, custom_root
      >>> def optimality(x, theta):  # x* = -theta for a Hessian that is not positive definite
      ...     return -(x + theta)
      >>> @custom_root(optimality, solve=CG())
      ... def solver(init, theta):
      ...     return -theta
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     # dx*/dtheta is -1, but CG stops at once on the negative curvature: do not trust 0.
      ...     print(float(jax.grad(lambda t: solver(0.0, t))(1.0)))
      0.0
      >>> [w.category.__name__ for w in caught]
      ['ImplicitDifferentiationWarning']

    """


def apply_policy(
    solution: Any, info: LinearSolveInfo, on_failure: OnFailure, *, budgeted: bool = False
) -> Any:
    # A fixed iteration budget (iMAML's few CG steps) leaves a residual by design: only
    # negative curvature counts as a failure there.
    failed = info.negative_curvature if budgeted else ~info.converged | info.negative_curvature
    if on_failure == "nan":
        return jax.tree.map(lambda s: jnp.where(failed, jnp.nan, s), solution)
    if on_failure in ("warn", "raise"):
        if budgeted:
            # The residual of a fixed budget is not a failure, and reading it for the message
            # would keep its verifying product (one more matrix-vector product) in every call.
            info = info._replace(relative_residual=None, converged=None)
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
    the batched ``failed`` and operands. Nothing here is differentiated. Outside ``jit``,
    ``report`` runs directly in Python, so an exception it raises reaches the caller unchanged.
    """
    failed, operands = jax.lax.stop_gradient((failed, operands))
    _report_if(failed, failed, operands, report)


def _report_if(predicate: jax.Array, failed: Any, operands: Any, report: Callable) -> None:
    flat, treedef = jax.tree.flatten((predicate, failed, operands))
    _report_if_p.bind(*flat, treedef=treedef, report=report)


# A primitive rather than a plain ``lax.cond`` + ``jax.debug.callback``: evaluated eagerly
# (outside jit) it calls ``report`` directly in Python, so the exception of
# on_failure="raise" reaches the user as raised, our message first; compiled, it lowers to the
# cond and callback (where XLA prefixes the error with the callback's traceback).
_report_if_p = Primitive("metaopt_report_if")
_report_if_p.multiple_results = True


@_report_if_p.def_impl
def _report_if_impl(*flat, treedef, report):
    predicate, failed, operands = jax.tree.unflatten(treedef, flat)
    if np.any(np.asarray(predicate)):
        report(failed, *operands)
    return []


@_report_if_p.def_effectful_abstract_eval
def _report_if_abstract_eval(*avals, treedef, report):
    del avals, treedef, report
    return [], {debug_effect}  # an effect, so the report is never removed as dead code


def _report_if_lowering(ctx, *flat, treedef, report):
    def conditional(*flat):
        predicate, failed, operands = jax.tree.unflatten(treedef, flat)
        jax.lax.cond(
            jnp.any(predicate),
            lambda: jax.debug.callback(report, failed, *operands),
            lambda: None,
        )
        return []

    return mlir.lower_fun(conditional, multiple_results=True)(ctx, *flat)


def _report_if_batched(flat, dims, *, treedef, report):
    size = next(x.shape[d] for x, d in zip(flat, dims, strict=True) if d is not None)

    def stacked(x, d):
        if d is None:
            return jnp.broadcast_to(x, (size, *jnp.shape(x)))
        return jnp.moveaxis(x, d, 0)

    predicate, failed, operands = jax.tree.unflatten(
        treedef, [stacked(x, d) for x, d in zip(flat, dims, strict=True)]
    )
    # One report for the whole batch, and only when some element failed.
    _report_if(jnp.any(predicate, axis=0), failed, operands, report)
    return [], []


def _report_if_jvp(primals, tangents, *, treedef, report):
    del tangents  # the inputs are stop_gradient-ed: nothing to differentiate
    return _report_if_p.bind(*primals, treedef=treedef, report=report), []


mlir.register_lowering(_report_if_p, _report_if_lowering)
batching.primitive_batchers[_report_if_p] = _report_if_batched
ad.primitive_jvps[_report_if_p] = _report_if_jvp


def _report(failed: Any, info: LinearSolveInfo, *, raise_error: bool) -> None:
    failed = np.asarray(failed)
    if not failed.any():
        return
    fields = ", ".join(
        f"{name}={np.asarray(value).tolist()}"
        for name, value in info._asdict().items()
        if value is not None
    )
    message = (
        f"the linear solve of an implicit derivative failed ({fields}); the derivative "
        "may be wrong. Check that the solver converged, raise the linear solver's maxiter, add "
        "ridge, or use MINRES/GMRES for an indefinite or non-symmetric Jacobian."
    )
    raise_or_warn(message, ImplicitDifferentiationWarning, raise_error=raise_error)


def raise_or_warn(message: str, category: type[Warning], *, raise_error: bool) -> None:
    """Raises RuntimeError(message) or issues the warning, as a failure policy asks."""
    if raise_error:
        raise RuntimeError(message)
    warnings.warn(message, category, stacklevel=3)
