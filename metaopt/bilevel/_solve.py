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

from metaopt.bilevel._checks import check_scalar_loss
from metaopt.bilevel._diff import FirstOrder, Implicit, Truncated, Unrolled
from metaopt.implicit import custom_root
from metaopt.implicit._failure import raise_or_warn, report_on_failure
from metaopt.optimizers._common import global_norm


class SolveDiagnostics(NamedTuple):
    """What happened in an inner solve; every field is an array (vmapped solves batch them).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from metaopt import bilevel
      >>> inner = lambda w: 0.5 * jnp.sum((w - 1.0) ** 2)
      >>> _, info = bilevel.solve(inner, jnp.zeros(2), optimizer=optax.sgd(0.5), steps=100,
      ...                         tol=1e-6)
      >>> # Each step halves the distance to the solution: 21 steps reach the tolerance.
      >>> int(info.steps), bool(info.gradient_norm <= 1e-6), bool(info.converged)
      (21, True, True)

    Attributes:
      steps: optimizer steps taken (int32).
      gradient_norm: norm of the inner gradient at the returned parameters.
      converged: with ``tol``, ``gradient_norm <= tol``. Without ``tol``, under
        :class:`Implicit` (whose derivative assumes a solution),
        ``gradient_norm <= max(rtol * g0, atol)`` with ``g0`` the gradient norm at ``init``
        and ``rtol``, ``atol`` the fields of :class:`Implicit` (``rtol=1e-3`` by default);
        otherwise (other diff modes, or ``Implicit(rtol=None)``: a fixed budget of steps)
        whether the returned parameters are finite.
    """

    steps: jax.Array
    gradient_norm: jax.Array
    converged: jax.Array


class InnerSolveWarning(RuntimeWarning):
    """An inner solve differentiated implicitly did not reach its tolerance.

    Example:
      >>> import warnings
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import bilevel
      >>> def outer(lam):  # three steps are far from the inner solution
      ...     inner = lambda w, lam: 0.5 * jnp.sum((w - lam) ** 2)
      ...     w, _ = bilevel.solve(inner, jnp.zeros(1), lam, optimizer=optax.sgd(0.1), steps=3)
      ...     return w[0]
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     print(float(jax.grad(outer)(1.0)))  # the implicit derivative, 1, assumes a solution
      1.0
      >>> [w.category.__name__ for w in caught]
      ['InnerSolveWarning']

    """


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
    - :class:`Truncated`: through the last ``k`` steps (of one run: the optimizer's state
      carries over, so the iterate is ``Unrolled``'s).
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
      tol: stop once the inner gradient norm is at most this; None runs all ``steps`` (as a
        plain ``lax.scan``; :class:`Implicit` then judges convergence relative to the
        gradient at ``init``, see its ``rtol``).
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
    check_scalar_loss("inner_loss", inner_loss, init, *hparams)
    optimizer = optax.with_extra_args_support(optimizer)
    inner = _InnerLoop(inner_loss, optimizer, tol)

    if isinstance(diff, Implicit):
        solution = _implicit(inner, steps, diff, init, hparams)
        if isinstance(diff.on_failure, str):
            return solution

        def fallback_solve(init, hparams):
            return solve(
                inner_loss,
                init,
                *hparams,
                optimizer=optimizer,
                steps=steps,
                tol=tol,
                diff=diff.on_failure,
            )[0]

        return _with_fallback(solution, init, hparams, fallback_solve)
    if isinstance(diff, Unrolled):
        segment = diff.checkpoint
        if segment is True:
            segment = max(1, math.isqrt(steps - 1) + 1)
        end = inner.run(hparams, inner.start(init), steps, differentiated=True, segment=segment)
        return end.params, inner.diagnostics(end, hparams)
    if isinstance(diff, Truncated):
        # One run of the optimizer, its state carried across: the first steps - k steps see
        # constants (nothing recorded), the last k are differentiated.
        free = max(steps - diff.k, 0)
        start = inner.start(init)
        if free:
            frozen_init, frozen = jax.lax.stop_gradient((init, hparams))
            start = jax.lax.stop_gradient(inner.run(frozen, inner.start(frozen_init), free))
        end = inner.run(hparams, start, steps - free, differentiated=True)
        return end.params, inner.diagnostics(end, hparams)
    frozen = jax.lax.stop_gradient((init, hparams))
    end = inner.run(frozen[1], inner.start(frozen[0]), steps)
    params = jax.tree.map(lambda i, p: i + jax.lax.stop_gradient(p - i), init, end.params)
    return params, inner.diagnostics(end, frozen[1])


class _Position(NamedTuple):
    """Where an inner run stands; ``gradient`` and its norm are carried only with ``tol``."""

    params: Any
    opt_state: Any
    step: jax.Array
    gradient: Any = None
    gradient_norm: jax.Array | None = None
    initial_norm: jax.Array | None = None


class _InnerLoop(NamedTuple):
    """The optimizer steps of one ``solve``, in the cheapest loop each use allows.

    Without ``tol`` the steps are a plain ``lax.scan`` whose carry is the parameters and the
    optimizer state: each step takes the gradient at its own parameters, and nothing about
    convergence is computed inside the loop. The gradient norms the diagnostics need (at the
    start and at the end) are computed once, outside, and vanish from the compiled program
    when nothing reads them. With ``tol`` the gradient and its norm are carried, since the
    stopping test needs them: a ``while_loop`` when the run is not differentiated, otherwise a
    ``scan`` whose steps past convergence are masked.
    """

    inner_loss: Callable[..., jax.Array]
    optimizer: optax.GradientTransformationExtraArgs
    tol: float | None
    relative: bool = False  # whether the gradient norm at the start is needed

    def gradient(self, params, hparams):
        return jax.grad(self.inner_loss)(params, *hparams)

    def start(self, init) -> _Position:
        return _Position(init, self.optimizer.init(init), jnp.asarray(0, jnp.int32))

    def step(self, hparams, params, opt_state, gradient):
        updates, opt_state = self.optimizer.update(
            gradient, opt_state, params, grad_fn=lambda p: self.gradient(p, hparams)
        )
        return optax.apply_updates(params, updates), opt_state

    def run(self, hparams, start, steps, *, differentiated=False, segment=None) -> _Position:
        """``steps`` more steps from ``start`` (fewer with ``tol`` once it is reached)."""
        if self.tol is None:
            return self._run_fixed(hparams, start, steps, segment)
        return self._run_until(hparams, start, steps, differentiated, segment)

    def _run_fixed(self, hparams, start, steps, segment):
        initial_norm, remaining = start.initial_norm, steps
        params, opt_state = start.params, start.opt_state
        if initial_norm is None and self.relative:
            # The first step is taken outside the loop so that the gradient at the start
            # (for the relative convergence test) costs nothing extra.
            gradient = self.gradient(params, hparams)
            initial_norm = global_norm(jax.lax.stop_gradient(gradient))
            params, opt_state = self.step(hparams, params, opt_state, gradient)
            remaining -= 1

        def body(carry, _):
            params, opt_state = carry
            return self.step(hparams, params, opt_state, self.gradient(params, hparams)), None

        params, opt_state = _segmented_scan(body, (params, opt_state), remaining, segment)
        return _Position(params, opt_state, start.step + steps, initial_norm=initial_norm)

    def _run_until(self, hparams, start, steps, differentiated, segment):
        limit = start.step + steps

        def with_gradient(params, opt_state, step):
            gradient = self.gradient(params, hparams)
            return _Position(params, opt_state, step, gradient, global_norm(gradient))

        def active(position):
            return (position.gradient_norm > self.tol) & (position.step < limit)

        def body(position):
            params, opt_state = self.step(
                hparams, position.params, position.opt_state, position.gradient
            )
            new = with_gradient(params, opt_state, position.step + 1)
            return new._replace(initial_norm=position.initial_norm)

        position = with_gradient(start.params, start.opt_state, start.step)
        initial = position.gradient_norm if start.initial_norm is None else start.initial_norm
        position = position._replace(initial_norm=jax.lax.stop_gradient(initial))
        if not differentiated:
            return jax.lax.while_loop(active, body, position)

        def masked(position, _):
            keep = active(position)
            new = body(position)
            return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, position), None

        return _segmented_scan(masked, position, steps, segment)

    def diagnostics(self, end: _Position, hparams, criterion=None) -> SolveDiagnostics:
        """The diagnostics at ``end``; ``criterion`` ``(rtol, atol)`` applies without ``tol``."""
        norm = end.gradient_norm
        if norm is None:
            gradient = self.gradient(*jax.lax.stop_gradient((end.params, hparams)))
            norm = global_norm(gradient)
        norm = jax.lax.stop_gradient(norm)
        if self.tol is not None:
            converged = norm <= self.tol
        elif criterion is None:
            # A fixed budget: nothing to reach, only a non-finite result fails. Judged on the
            # parameters, so that the policy's check needs no gradient at the end.
            finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(end.params)]
            converged = jax.lax.stop_gradient(functools.reduce(jnp.logical_and, finite))
        else:
            rtol, atol = criterion
            if atol is None:
                atol = _DEFAULT_ATOL_EPS * max(
                    float(jnp.finfo(x.dtype).eps)
                    for x in jax.tree.leaves(end.params)
                    if jnp.issubdtype(x.dtype, jnp.inexact)
                )
            converged = norm <= jnp.maximum(rtol * end.initial_norm, atol)
        return SolveDiagnostics(jax.lax.stop_gradient(end.step), norm, converged)


# Without ``tol``, Implicit's absolute floor is this many machine epsilons of the parameters'
# dtype: a gradient norm at round-off level, as at an init that is already a solution.
_DEFAULT_ATOL_EPS = 100


def _segmented_scan(body, carry, steps, segment):
    """``steps`` applications of ``body`` by ``lax.scan``; checkpointed in segments if asked.

    With ``segment``, ``steps // segment`` checkpointed segments of ``segment`` steps run first,
    then one checkpointed segment of the remaining ``steps % segment``: exactly ``steps``
    steps, none masked.
    """
    if steps <= 0:
        return carry
    if not segment or segment >= steps:
        return jax.lax.scan(body, carry, None, length=steps)[0]

    def run_segment(length):
        @jax.checkpoint
        def run(carry):
            return jax.lax.scan(body, carry, None, length=length)[0]

        return run

    full, remainder = divmod(steps, segment)
    whole = run_segment(segment)
    carry = jax.lax.scan(lambda c, _: (whole(c), None), carry, None, length=full)[0]
    return run_segment(remainder)(carry) if remainder else carry


def _implicit(inner, steps, diff, init, hparams):
    inner = inner._replace(relative=diff.rtol is not None)

    def optimality(params, *hparams):
        return inner.gradient(params, hparams)

    @custom_root(optimality, solve=diff.linear_solver, has_aux=True, on_failure=diff.adjoint_policy)
    def inner_solution(init, *hparams):
        end = inner.run(hparams, inner.start(init), steps)
        criterion = None if diff.rtol is None else (diff.rtol, diff.atol)
        return end.params, inner.diagnostics(end, hparams, criterion)

    params, diagnostics = inner_solution(init, *hparams)
    if not isinstance(diff.on_failure, str) or diff.on_failure == "ignore":
        return params, diagnostics
    # A fixed budget's failure is non-finite parameters: its report needs no final gradient.
    fixed_budget = inner.tol is None and diff.rtol is None
    norm = None if fixed_budget else diagnostics.gradient_norm
    report = (diagnostics.steps, norm)
    return _guard(diff.on_failure, params, ~diagnostics.converged, report), diagnostics


def _with_fallback(solution, init, hparams, fallback_solve):
    """Redoes an unconverged implicit solve with the fallback mode, only when needed."""
    params, diagnostics = solution
    params = jax.lax.cond(
        diagnostics.converged, lambda: params, lambda: fallback_solve(init, hparams)
    )
    return params, diagnostics


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _guard(on_failure, params, failed, report):
    """Identity that applies the failure policy when, and only when, it is differentiated."""
    del on_failure, failed, report
    return params


@_guard.defjvp
def _guard_jvp(on_failure, primals, tangents):
    params, failed, (steps, gradient_norm) = primals
    params_dot = tangents[0]
    if on_failure == "nan":
        factor = jnp.where(failed, jnp.nan, 1.0)
        return params, jax.tree.map(lambda t: t * factor.astype(t.dtype), params_dot)
    report = functools.partial(_report_inner, raise_error=on_failure == "raise")
    if gradient_norm is None:
        report, operands = functools.partial(report, gradient_norm=None), (steps,)
    else:
        operands = (steps, gradient_norm)
    return params, report_on_failure(params_dot, failed, report, *operands)


def _report_inner(failed: Any, steps: Any, gradient_norm: Any, *, raise_error: bool) -> None:
    failed = np.asarray(failed)
    if not failed.any():
        return
    if gradient_norm is None:
        message = (
            "an inner solve differentiated implicitly returned non-finite parameters "
            f"(steps={np.asarray(steps).tolist()}); the implicit hypergradient is meaningless. "
            "Lower the inner learning rate or check the inner loss."
        )
    else:
        message = (
            "an inner solve differentiated implicitly did not reach its tolerance "
            f"(steps={np.asarray(steps).tolist()}, "
            f"gradient_norm={np.asarray(gradient_norm).tolist()}); the implicit hypergradient "
            "assumes a solution and may be wrong (the tolerance is tol, or without tol "
            "Implicit's rtol times the gradient norm at init). Raise steps or the inner "
            "learning rate, loosen tol or rtol, use diff=Unrolled() for a short inner loop, or "
            "Implicit(rtol=None) for a deliberately fixed budget of steps."
        )
    raise_or_warn(message, InnerSolveWarning, raise_error=raise_error)
