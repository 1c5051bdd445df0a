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

from metaopt.implicit._linear_solve_info import LinearSolveInfo

OnFailure = Literal["warn", "nan", "raise", "ignore"]
POLICIES = ("warn", "nan", "raise", "ignore")


class ImplicitDifferentiationWarning(RuntimeWarning):
    """The linear solve of an implicit derivative did not converge or met negative curvature."""


def apply_policy(
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
