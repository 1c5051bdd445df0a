"""``solve``: run any optax transform as an inner loop, differentiated as its ``diff`` says."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.bilevel._diff import FirstOrder, Implicit, Truncated, Unrolled
from metaopt.implicit import custom_root
from metaopt.implicit._custom_root import call_host_on_failure, raise_or_warn
from metaopt.optimizers._common import global_norm


class SolveDiagnostics(NamedTuple):
    """What happened in an inner solve; every field is an array (vmapped solves batch them).

    Attributes:
      steps: optimizer steps taken (int32).
      gradient_norm: norm of the inner gradient at the returned parameters.
      converged: ``gradient_norm <= tol`` (True when no ``tol`` was given and the norm is
        finite).
    """

    steps: jax.Array
    gradient_norm: jax.Array
    converged: jax.Array


class InnerSolveWarning(RuntimeWarning):
    """An inner solve differentiated implicitly did not reach its tolerance."""


class _Carry(NamedTuple):
    params: Any
    opt_state: Any
    gradient: Any
    gradient_norm: jax.Array
    step: jax.Array


def solve(
    inner_loss: Callable[..., jax.Array],
    init: Any,
    *hparams: Any,
    optimizer: optax.GradientTransformation,
    steps: int,
    tol: float | None = None,
    diff: Implicit | Unrolled | Truncated | FirstOrder | None = None,
) -> tuple[Any, SolveDiagnostics]:
    r"""Minimizes ``inner_loss(params, *hparams)`` from ``init`` with an optax optimizer.

    Runs at most ``steps`` steps of ``optimizer`` (any optax transform; sharpness-aware ones
    get ``grad_fn`` automatically), stopping early once the inner gradient norm is at most
    ``tol``. Returns the parameters and :class:`SolveDiagnostics`. ``jax.grad`` of any function
    of the result with respect to ``hparams`` (and ``init``) gives the hypergradient that
    ``diff`` stands for:

    - :class:`Implicit` (default): implicit function theorem at the solution; memory flat in
      ``steps``; needs a converged inner solve.
    - :class:`Unrolled`: backpropagation through every step (optionally checkpointed).
    - :class:`Truncated`: through the last ``k`` steps.
    - :class:`FirstOrder`: identity with respect to ``init``, nothing through ``hparams``.

    Example: ridge regression, whose hypergradient has a closed form.

      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import bilevel
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> y = jnp.array([1.0, 2.0, 0.0])
      >>> def inner(w, lam):
      ...     return 0.5 * jnp.sum((x @ w - y) ** 2) + 0.5 * lam * jnp.sum(w**2)
      >>> def outer(lam):
      ...     w, info = bilevel.solve(inner, jnp.zeros(2), lam, optimizer=optax.sgd(0.1),
      ...                             steps=2000, tol=1e-10)
      ...     return jnp.sum(w)
      >>> exact = jax.grad(lambda lam: jnp.sum(jnp.linalg.solve(x.T @ x + lam * jnp.eye(2),
      ...                                                       x.T @ y)))
      >>> print(f"{jax.grad(outer)(0.5):.6f} {exact(0.5):.6f}")
      -0.124567 -0.124567

    Args:
      inner_loss: ``inner_loss(params, *hparams) -> scalar``.
      init: starting parameters (a pytree).
      *hparams: the hyperparameters (pytrees of arrays) the solution is differentiated by.
      optimizer: the inner optax transform.
      steps: maximum number of inner steps (the exact number for ``Unrolled`` without
        ``tol``).
      tol: stop once the inner gradient norm is at most this; None runs all ``steps``.
      diff: :class:`Implicit` (default), :class:`Unrolled`, :class:`Truncated` or
        :class:`FirstOrder`.

    Returns:
      ``(params, diagnostics)``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got steps={steps!r}.")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be None or >= 0, got tol={tol!r}.")
    diff = Implicit() if diff is None else diff
    if not isinstance(diff, Implicit | Unrolled | Truncated | FirstOrder):
        raise TypeError(
            "diff must be bilevel.Implicit(), Unrolled(), Truncated(k) or FirstOrder(), "
            f"got diff={diff!r}."
        )
    optimizer = optax.with_extra_args_support(optimizer)
    loop = functools.partial(_run, inner_loss, optimizer, tol)

    def fallback_solve(mode, init, hparams):
        return solve(
            inner_loss, init, *hparams, optimizer=optimizer, steps=steps, tol=tol, diff=mode
        )

    if isinstance(diff, Implicit):
        solution = _implicit(inner_loss, loop, steps, tol, diff, init, hparams)
        if isinstance(diff.on_failure, str):
            return solution
        return _with_fallback(solution, diff.on_failure, init, hparams, fallback_solve)
    if isinstance(diff, Unrolled):
        segment = diff.checkpoint
        if segment is True:
            segment = max(1, math.isqrt(steps - 1) + 1)
        carry = loop(init, hparams, steps, mode="scan", segment=segment or None)
        return carry.params, _diagnostics(carry, tol)
    if isinstance(diff, Truncated):
        free = max(steps - diff.k, 0)
        start = init
        if free:
            frozen = loop(
                jax.lax.stop_gradient(init), jax.lax.stop_gradient(hparams), free, mode="while"
            )
            start = frozen.params
        carry = loop(start, hparams, steps - free, mode="scan", segment=None, step0=free)
        return carry.params, _diagnostics(carry, tol)
    carry = loop(jax.lax.stop_gradient(init), jax.lax.stop_gradient(hparams), steps, mode="while")
    params = jax.tree.map(lambda i, p: i + jax.lax.stop_gradient(p - i), init, carry.params)
    return params, _diagnostics(carry, tol)


def _run(inner_loss, optimizer, tol, init, hparams, steps, *, mode, segment=None, step0=0):
    """Runs up to ``steps`` optimizer steps; ``mode`` "while" (early exit) or "scan" (masked)."""

    def grad_fn(params):
        return jax.grad(inner_loss)(params, *hparams)

    def active(carry):
        done = jnp.asarray(False) if tol is None else carry.gradient_norm <= tol
        return ~done & (carry.step < step0 + steps)

    def step(carry):
        updates, opt_state = optimizer.update(
            carry.gradient, carry.opt_state, carry.params, grad_fn=grad_fn
        )
        params = optax.apply_updates(carry.params, updates)
        gradient = grad_fn(params)
        return _Carry(params, opt_state, gradient, global_norm(gradient), carry.step + 1)

    gradient = grad_fn(init)
    carry = _Carry(
        init, optimizer.init(init), gradient, global_norm(gradient), jnp.asarray(step0, jnp.int32)
    )
    if mode == "while":
        return jax.lax.while_loop(active, step, carry)

    def masked(carry, _):
        new = step(carry)
        keep = active(carry)
        return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, carry), None

    if not segment:
        return jax.lax.scan(masked, carry, None, length=steps)[0]

    @jax.checkpoint
    def run_segment(carry, _):
        return jax.lax.scan(masked, carry, None, length=segment)[0], None

    return jax.lax.scan(run_segment, carry, None, length=-(-steps // segment))[0]


def _diagnostics(carry: _Carry, tol: float | None) -> SolveDiagnostics:
    norm = jax.lax.stop_gradient(carry.gradient_norm)
    converged = jnp.isfinite(norm) if tol is None else norm <= tol
    return SolveDiagnostics(jax.lax.stop_gradient(carry.step), norm, converged)


def _implicit(inner_loss, loop, steps, tol, diff, init, hparams):
    def optimality(params, *hparams):
        return jax.grad(inner_loss)(params, *hparams)

    @custom_root(optimality, solve=diff.linear_solver, has_aux=True, on_failure=diff.adjoint_policy)
    def inner_solution(init, *hparams):
        carry = loop(init, hparams, steps, mode="while")
        return carry.params, _diagnostics(carry, tol)

    params, diagnostics = inner_solution(init, *hparams)
    if not isinstance(diff.on_failure, str) or diff.on_failure == "ignore":
        return params, diagnostics
    return _guard(diff.on_failure, params, ~diagnostics.converged, diagnostics), diagnostics


def _with_fallback(solution, mode, init, hparams, fallback_solve):
    """Redoes an unconverged implicit solve with the fallback ``mode``, only when needed."""
    params, diagnostics = solution
    params = jax.lax.cond(
        diagnostics.converged,
        lambda: params,
        lambda: fallback_solve(mode, init, hparams)[0],
    )
    return params, diagnostics


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _guard(on_failure, params, failed, diagnostics):
    """Identity that applies the failure policy when, and only when, it is differentiated."""
    del on_failure, failed, diagnostics
    return params


@_guard.defjvp
def _guard_jvp(on_failure, primals, tangents):
    params, failed, diagnostics = primals
    params_dot = tangents[0]
    if on_failure == "nan":
        factor = jnp.where(failed, jnp.nan, 1.0)
        return params, jax.tree.map(lambda t: t * factor.astype(t.dtype), params_dot)
    call_host_on_failure(
        failed, functools.partial(_report_inner, raise_error=on_failure == "raise"), diagnostics
    )
    return params, params_dot


def _report_inner(failed: Any, diagnostics: SolveDiagnostics, *, raise_error: bool) -> None:
    failed = np.asarray(failed)
    if not failed.any():
        return
    message = (
        "an inner solve differentiated implicitly did not reach its tolerance "
        f"(steps={np.asarray(diagnostics.steps).tolist()}, "
        f"gradient_norm={np.asarray(diagnostics.gradient_norm).tolist()}); the implicit "
        "hypergradient assumes a solution and may be wrong. Raise steps or the inner learning "
        "rate, loosen tol, or use diff=Unrolled() for a short inner loop."
    )
    raise_or_warn(message, InnerSolveWarning, raise_error=raise_error)
