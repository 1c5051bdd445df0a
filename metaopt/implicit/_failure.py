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
        report = functools.partial(_report, raise_error=on_failure == "raise")
        return report_on_failure(solution, failed, report, info)
    return solution


def report_on_failure(
    value: Any, failed: jax.Array, report: Callable[..., None], *operands: Any
) -> Any:
    """Returns ``value`` unchanged, having called ``report(failed, *operands)`` on the host if
    ``failed`` is true anywhere.

    The report is tied to ``value``: it runs when ``value`` is computed, and is dropped with it
    when nothing uses it. A host callback costs milliseconds (about 5 ms on XLA:CPU), so it must
    stay off the common, successful path:

    - Compiled, a ``lax.cond`` runs the callback only when something failed. The callback is a
      ``pure_callback`` whose dummy result (-0.0, an exact additive identity) is added to
      ``value``, so nothing is an effect: an effect (``jax.debug.callback``) would make every
      call wait for the device, about 65 us per call on XLA:CPU even with the branch untaken.
    - Under ``vmap`` the predicate would be batched and both branches run on every call, so a
      custom batching rule reduces it over the batch first (recursively, for nested ``vmap``);
      ``report`` receives the batched ``failed`` and operands, once per batch.
    - Outside ``jit``, ``report`` runs directly in Python, so an exception it raises reaches
      the caller unchanged, our message first.
    - Differentiated, ``value``'s derivative passes through unchanged; nothing else is
      differentiated.
    """
    failed, operands = jax.lax.stop_gradient((failed, operands))
    values, value_tree = jax.tree.flatten(value)
    out = _bind(values, failed, failed, operands, report)
    return jax.tree.unflatten(value_tree, out)


def _bind(values: list, predicate: jax.Array, failed: Any, operands: Any, report: Callable):
    flat, treedef = jax.tree.flatten((predicate, failed, operands))
    return _report_if_p.bind(*values, *flat, count=len(values), treedef=treedef, report=report)


# A primitive rather than a plain ``lax.cond`` + callback: evaluated eagerly (outside jit) it
# calls ``report`` directly in Python, so the exception of on_failure="raise" reaches the user
# as raised, our message first; compiled, it lowers to the cond and callback (where XLA
# prefixes the error with the callback's traceback).
_report_if_p = Primitive("metaopt_report_if")
_report_if_p.multiple_results = True


@_report_if_p.def_impl
def _report_if_impl(*flat, count, treedef, report):
    values, rest = flat[:count], flat[count:]
    predicate, failed, operands = jax.tree.unflatten(treedef, rest)
    if np.any(np.asarray(predicate)):
        report(failed, *operands)
    return list(values)


@_report_if_p.def_abstract_eval
def _report_if_abstract_eval(*avals, count, treedef, report):
    del treedef, report
    return list(avals[:count])


def _report_if_lowering(ctx, *flat, count, treedef, report):
    def reported(*flat):
        values, rest = flat[:count], flat[count:]
        predicate, failed, operands = jax.tree.unflatten(treedef, rest)

        def call_report(*args):
            report(*args)
            return np.array(-0.0, np.float32)

        dummy = jax.lax.cond(
            jnp.any(predicate),
            lambda: jax.pure_callback(
                call_report, jax.ShapeDtypeStruct((), jnp.float32), failed, *operands
            ),
            lambda: jnp.array(-0.0, jnp.float32),
        )
        # x + (-0.0) is x for every x (+0.0, -0.0, NaN and Inf included): the dependence keeps
        # the callback alive without changing a bit of the value.
        return [_plus_negative_zero(v, dummy) for v in values]

    return mlir.lower_fun(reported, multiple_results=True)(ctx, *flat)


def _plus_negative_zero(value: jax.Array, dummy: jax.Array) -> jax.Array:
    if jnp.issubdtype(value.dtype, jnp.complexfloating):
        part = dummy.astype(jnp.finfo(value.dtype).dtype)
        return value + jax.lax.complex(part, part)
    if jnp.issubdtype(value.dtype, jnp.floating):
        return value + dummy.astype(value.dtype)
    # Integers and booleans: a zero (False) of their own type, still computed from the dummy.
    zero = (dummy != 0).astype(value.dtype)
    return value | zero if value.dtype == jnp.bool_ else value + zero


def _report_if_batched(flat, dims, *, count, treedef, report):
    values, rest = flat[:count], flat[count:]
    value_dims, rest_dims = dims[:count], dims[count:]
    size = next(x.shape[d] for x, d in zip(flat, dims, strict=True) if d is not None)

    def stacked(x, d):
        if d is None:
            return jnp.broadcast_to(x, (size, *jnp.shape(x)))
        return jnp.moveaxis(x, d, 0)

    predicate, failed, operands = jax.tree.unflatten(
        treedef, [stacked(x, d) for x, d in zip(rest, rest_dims, strict=True)]
    )
    # One report for the whole batch, and only when some element failed.
    out = _bind(list(values), jnp.any(predicate, axis=0), failed, operands, report)
    return out, list(value_dims)


def _report_if_jvp(primals, tangents, *, count, treedef, report):
    # The report operands are stop_gradient-ed: only the values carry derivatives, unchanged.
    out = _report_if_p.bind(*primals, count=count, treedef=treedef, report=report)
    return out, list(tangents[:count])


def _report_if_transpose(cotangents, *flat, count, treedef, report):
    # Linear in the values (the identity): the cotangents pass through, still reported.
    rest = flat[count:]
    cotangents = [ad.instantiate_zeros(ct) if type(ct) is ad.Zero else ct for ct in cotangents]
    out = _report_if_p.bind(*cotangents, *rest, count=count, treedef=treedef, report=report)
    return [*out, *([None] * len(rest))]


mlir.register_lowering(_report_if_p, _report_if_lowering)
batching.primitive_batchers[_report_if_p] = _report_if_batched
ad.primitive_jvps[_report_if_p] = _report_if_jvp
ad.primitive_transposes[_report_if_p] = _report_if_transpose


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
