"""``F2SA``: the fully first-order hypergradient estimate of Kwon, Kwon, Wright and Nowak (2023)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.bilevel import _f2sa_parts
from metaopt.bilevel._checks import all_finite, check_scalar_loss
from metaopt.bilevel._diff import _POLICIES, OnFailure
from metaopt.bilevel._solve import SolveDiagnostics, _InnerLoop
from metaopt.implicit._failure import raise_or_warn, report_on_failure
from metaopt.optimizers._tree_checks import check_matching

Multiplier = float | jax.Array | Callable[[jax.Array], jax.Array]


class F2SAWarning(RuntimeWarning):
    """An F2SA step failed: an inner solve or the hypergradient estimate is not finite.

    Example:
      >>> import warnings
      >>> import jax.numpy as jnp, optax
      >>> from metaopt import bilevel
      >>> f2sa = bilevel.F2SA(multiplier=10.0, inner_optimizer=optax.sgd(0.1))
      >>> inner = lambda y, x: jnp.sum((y - x) ** 2) * jnp.nan  # a broken inner loss
      >>> outer = lambda y, x: jnp.sum(y**2)
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     grad, state, info = f2sa.hypergradient(outer, inner, jnp.ones(2),
      ...                                            f2sa.init(jnp.ones(2), jnp.zeros(2)))
      >>> [w.category.__name__ for w in caught], bool(info.finite)
      (['F2SAWarning'], False)

    """


class F2SAState(NamedTuple):
    """What F2SA carries from one outer step to the next (a pytree: it vmaps over tasks).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from metaopt import bilevel
      >>> f2sa = bilevel.F2SA(multiplier=10.0, inner_optimizer=optax.sgd(0.1))
      >>> state = f2sa.init(jnp.zeros(1), jnp.ones(3))  # y and z both start at the inner init
      >>> state.y, state.z, int(state.count)
      (Array([1., 1., 1.], dtype=float64), Array([1., 1., 1.], dtype=float64), 0)

    Attributes:
      y: the warm start of the inner problem's solve, :math:`\\arg\\min_y g(y, x)`.
      z: the warm start of the penalized problem's solve,
        :math:`\\arg\\min_z \\lambda^{-1} f(z, x) + g(z, x)`.
      y_opt_state: the inner optimizer's state for ``y`` (carried on, like ``y``).
      z_opt_state: the inner optimizer's state for ``z``.
      count: successful outer steps so far (int32): the multiplier schedule's argument.
      previous_hparams: the hyperparameters of the previous step (used with ``momentum``).
      previous_multiplier: the multiplier of the previous step (used with ``momentum``).
      previous_estimate: the previous returned estimate (used with ``momentum``).
      y_memory: ``(point, direction)``: where the last step of the ``y`` solve took its
        gradient, and the direction it used (used with ``momentum``).
      z_memory: the same for the ``z`` solve.
    """

    y: Any
    z: Any
    y_opt_state: Any
    z_opt_state: Any
    count: jax.Array
    previous_hparams: Any
    previous_multiplier: jax.Array
    previous_estimate: Any
    y_memory: tuple[Any, Any]
    z_memory: tuple[Any, Any]


class F2SADiagnostics(NamedTuple):
    """What happened in one F2SA step; every field is an array (vmapped steps batch them).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from metaopt import bilevel
      >>> f2sa = bilevel.F2SA(multiplier=100.0, inner_optimizer=optax.sgd(0.5), inner_steps=30)
      >>> inner = lambda y, x: 0.5 * jnp.sum((y - x) ** 2)
      >>> _, _, info = f2sa.hypergradient(lambda y, x: jnp.sum(y), inner, jnp.ones(2),
      ...                                 f2sa.init(jnp.ones(2), jnp.zeros(2)))
      >>> int(info.y.steps), bool(info.y.converged), float(info.multiplier), bool(info.finite)
      (30, True, 100.0, True)

    Attributes:
      y: :class:`SolveDiagnostics` of the inner problem's solve (``converged``: its result is
        finite, as for a fixed budget of steps in :func:`solve`).
      z: :class:`SolveDiagnostics` of the penalized problem's solve (its ``gradient_norm`` is
        that of the scaled objective :math:`\\lambda^{-1} f + g`).
      multiplier: the multiplier :math:`\\lambda` used.
      finite: whether the returned estimate is finite.
    """

    y: SolveDiagnostics
    z: SolveDiagnostics
    multiplier: jax.Array
    finite: jax.Array


class F2SA:
    r"""Fully first-order hypergradient estimates: two inner solves, no second derivative.

    For the bilevel problem :math:`\min_x F(x) = f(y^\star(x), x)` with
    :math:`y^\star(x) = \arg\min_y g(y, x)`, F2SA (Kwon et al., 2023) replaces the implicit
    hypergradient by the gradient of the penalty function
    :math:`\mathcal{L}_\lambda(x) = \min_z [f(z, x) + \lambda g(z, x)] - \lambda \min_y g(y, x)`:

    .. math::

       y \approx \arg\min_y g(y, x), \qquad
       z \approx \arg\min_z \lambda^{-1} f(z, x) + g(z, x), \\
       \widehat{\nabla} F(x) = \nabla_x f(z, x)
       + \lambda \left(\nabla_x g(z, x) - \nabla_x g(y, x)\right),

    which differs from :math:`\nabla F(x)` by :math:`O(1/\lambda)` when :math:`g` is strongly
    convex in :math:`y` (the paper's Lemma 3.1), while using only first derivatives. Each call
    runs ``inner_steps`` steps of ``inner_optimizer`` on each problem, warm-started (iterate
    and optimizer state) from the previous call, as the paper's Algorithm 1 does; the
    multiplier grows along a schedule of the outer step count (the paper's
    :math:`\lambda_{k+1} = \lambda_k + \delta_k`, :math:`\delta_k \ge 0`).

    The penalized problem is solved in the scaled form :math:`\lambda^{-1} f + g`, which has
    the same minimizer as the paper's :math:`f + \lambda g`: the paper's step
    :math:`\alpha_k (\nabla f + \lambda_k \nabla g)` is a step of size
    :math:`\alpha_k\lambda_k` on the scaled objective, whose curvature is that of :math:`g`
    whatever :math:`\lambda`, so one ``inner_optimizer`` (and learning rate) serves both solves
    as :math:`\lambda` grows.

    With ``momentum`` :math:`\eta \in (0, 1]`, every gradient is the recursive-momentum (STORM)
    estimator of the paper's momentum-assisted variant: along each sequence of points
    :math:`p_0, p_1, \dots` (the iterates of the ``y`` solve, those of the ``z`` solve, and the
    outer points :math:`(x, y, z, \lambda)` of the estimate), the direction used at
    :math:`p_j` is :math:`d_j = \nabla\ell_j(p_j) + (1 - \eta)(d_{j-1} -
    \nabla\ell_j(p_{j-1}))`, both gradients of the current losses :math:`\ell_j` (the same
    minibatch). The inner solves feed these directions to ``inner_optimizer`` (``optax.sgd``
    gives the paper's updates; with ``inner_steps=1``, its single-loop form). With losses that
    do not change between calls every :math:`d_j` is the plain gradient; with minibatch
    losses the estimator averages their noise over calls, at the price of a second gradient
    per step.

    Losses take the parameters first, as everywhere in :mod:`metaopt.bilevel`:
    ``outer_loss(params, hparams)`` is :math:`f` and ``inner_loss(params, hparams)`` is
    :math:`g`; ``hparams`` is one pytree (a tuple for several).

    References:
      Kwon, Kwon, Wright and Nowak, "A Fully First-Order Method for Stochastic Bilevel
      Optimization", ICML 2023 (arXiv:2301.10945).

    Example: ridge regression, whose hypergradient has a closed form.

      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import bilevel
      >>> a = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> b = jnp.array([1.0, 2.0, 0.0])
      >>> inner = lambda w, lam: 0.5 * jnp.sum((a @ w - b) ** 2) + 0.5 * lam * jnp.sum(w**2)
      >>> outer = lambda w, lam: jnp.sum(w)
      >>> exact = jax.grad(lambda lam: jnp.sum(jnp.linalg.solve(a.T @ a + lam * jnp.eye(2),
      ...                                                       a.T @ b)))
      >>> f2sa = bilevel.F2SA(multiplier=1e3, inner_optimizer=optax.sgd(0.1), inner_steps=500)
      >>> grad, state, info = jax.jit(f2sa.hypergradient, static_argnums=(0, 1))(
      ...     outer, inner, 0.5, f2sa.init(0.5, jnp.zeros(2)))
      >>> print(f"{grad:.4f} {exact(0.5):.4f}")  # O(1/lambda) apart
      -0.1245 -0.1246

    Args:
      multiplier: :math:`\lambda > 0`: a number, or a schedule (a callable of the outer step
        count, as optax schedules are) that is positive and non-decreasing. Choose it in
        units of :math:`1/\mu_g`, the inverse of the inner loss's strong convexity: the
        paper's analysis asks for :math:`\lambda \ge 2 L_f/\mu_g` (:math:`L_f` the Lipschitz
        constant of :math:`\nabla f`), and the bias's constant grows as :math:`\mu_g`
        shrinks. On hypercleaning (``docs/hypercleaning.md``), :math:`\lambda_k = (1 +
        0.01k)/\mu` keeps F2SA within half a point of implicit CG's test accuracy at
        :math:`\mu = 10^{-2}` and :math:`10^{-3}`, where :math:`10 + 0.5k` fell 1.8 points
        behind at :math:`10^{-3}`.
      inner_optimizer: any optax transform; it runs both inner solves (separate states).
      inner_steps: steps of each inner solve per call.
      momentum: None, or the momentum-assisted variant's :math:`\eta \in (0, 1]`
        (1 is the plain estimate).
      on_failure: what happens when an inner solve or the estimate is not finite:
        ``"warn"`` (default: an :class:`F2SAWarning` at run time, one per batch under
        ``vmap``; the non-finite estimate is returned and ``finite`` is False), ``"nan"``
        (the estimate is NaN), ``"raise"`` (a runtime error) or ``"ignore"``. Under every
        policy a failed step leaves the state as it was, so nothing non-finite is written
        into it.
      check_steps: a schedule is checked, at construction, on the counts ``0 ..
        check_steps``.
      batched_solves: without ``momentum``, run the two solves in one loop whose steps take
        the inner loss's gradient at ``y`` and at ``z`` in one ``jax.vmap``\ ped call (the
        outer loss's gradient at ``z`` is added to the second). The same iterates, up to
        rounding; on the hypercleaning benchmark both solves then cost 1.2 times one solve
        instead of 2.2 times. ``False`` runs them one after the other, for an inner loss that
        cannot be ``vmap``\ ped.
    """

    def __init__(
        self,
        multiplier: Multiplier,
        inner_optimizer: optax.GradientTransformation,
        inner_steps: int = 10,
        momentum: float | None = None,
        on_failure: OnFailure = "warn",
        check_steps: int = 10_000,
        batched_solves: bool = True,
    ):
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(
                f"inner_steps must be a positive integer, got inner_steps={inner_steps!r}."
            )
        if isinstance(check_steps, bool) or not isinstance(check_steps, int) or check_steps < 0:
            raise ValueError(
                f"check_steps must be a non-negative integer, got check_steps={check_steps!r}."
            )
        if momentum is not None and (
            isinstance(momentum, bool)
            or not isinstance(momentum, int | float)
            or not 0 < momentum <= 1
        ):
            raise ValueError(
                "momentum must be None or a number in (0, 1] (the weight of the new estimate "
                f"in the recursive-momentum estimator; 1 is plain F2SA), got momentum={momentum!r}."
            )
        if on_failure not in _POLICIES:
            raise ValueError(
                f"on_failure must be one of {_POLICIES}, got on_failure={on_failure!r}."
            )
        if not hasattr(inner_optimizer, "init") or not hasattr(inner_optimizer, "update"):
            raise TypeError(
                "inner_optimizer must be an optax GradientTransformation (for example "
                f"optax.sgd(0.1)), got inner_optimizer={inner_optimizer!r}."
            )
        if not isinstance(batched_solves, bool):
            raise TypeError(
                f"batched_solves must be True or False, got batched_solves={batched_solves!r}."
            )
        _f2sa_parts.check_multiplier(multiplier, check_steps)
        self.batched_solves = batched_solves
        self.multiplier = multiplier
        self.inner_optimizer = optax.with_extra_args_support(inner_optimizer)
        self.inner_steps = inner_steps
        self.momentum = momentum
        self.on_failure = on_failure

    def __repr__(self) -> str:
        return (
            f"F2SA(multiplier={self.multiplier!r}, inner_steps={self.inner_steps}, "
            f"momentum={self.momentum!r}, on_failure={self.on_failure!r}, "
            f"batched_solves={self.batched_solves})"
        )

    def multiplier_at(self, count: jax.Array) -> jax.Array:
        """The multiplier :math:`\\lambda` at outer step ``count``.

        Example:
          >>> import optax
          >>> from metaopt import bilevel
          >>> f2sa = bilevel.F2SA(multiplier=lambda k: 10.0 + 5.0 * k,
          ...                     inner_optimizer=optax.sgd(0.1))
          >>> float(f2sa.multiplier_at(4))
          30.0
        """
        value = self.multiplier(count) if callable(self.multiplier) else self.multiplier
        return jnp.asarray(value, dtype=jnp.result_type(float))

    def init(self, hparams: Any, params: Any) -> F2SAState:
        """The state at the start: ``y`` and ``z`` both at ``params``, fresh optimizer states.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from metaopt import bilevel
          >>> f2sa = bilevel.F2SA(multiplier=10.0, inner_optimizer=optax.adam(0.1))
          >>> state = f2sa.init(jnp.zeros(2), {"w": jnp.ones(3)})
          >>> state.z["w"].shape, int(state.count)
          ((3,), 0)
        """
        opt_state = self.inner_optimizer.init(params)
        return F2SAState(
            y=params,
            z=params,
            y_opt_state=opt_state,
            z_opt_state=opt_state,
            count=jnp.zeros((), jnp.int32),
            previous_hparams=hparams,
            previous_multiplier=self.multiplier_at(jnp.zeros((), jnp.int32)),
            previous_estimate=jax.tree.map(jnp.zeros_like, hparams),
            y_memory=(params, jax.tree.map(jnp.zeros_like, params)),
            z_memory=(params, jax.tree.map(jnp.zeros_like, params)),
        )

    def hypergradient(
        self,
        outer_loss: Callable[[Any, Any], jax.Array],
        inner_loss: Callable[[Any, Any], jax.Array],
        hparams: Any,
        state: F2SAState,
    ) -> tuple[Any, F2SAState, F2SADiagnostics]:
        """One F2SA step: both inner solves, then the estimate of :math:`\\nabla F(x)`.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from metaopt import bilevel
          >>> inner = lambda y, x: 0.5 * jnp.sum((y - x) ** 2)  # y*(x) = x
          >>> outer = lambda y, x: 0.5 * jnp.sum(y**2)           # F(x) = |x|^2 / 2
          >>> f2sa = bilevel.F2SA(multiplier=1e4, inner_optimizer=optax.sgd(0.5),
          ...                     inner_steps=60)
          >>> x = jnp.array([1.0, -2.0])
          >>> grad, state, info = f2sa.hypergradient(outer, inner, x, f2sa.init(x, jnp.zeros(2)))
          >>> print(grad)  # the exact hypergradient is x; lambda / (1 + lambda) of it
          [ 0.9999 -1.9998]

        Args:
          outer_loss: ``outer_loss(params, hparams) -> scalar`` (:math:`f`).
          inner_loss: ``inner_loss(params, hparams) -> scalar`` (:math:`g`).
          hparams: the hyperparameters :math:`x` (a pytree).
          state: from :meth:`init` or the previous call.

        Returns:
          ``(estimate, state, diagnostics)``: the estimate has ``hparams``' structure;
          diagnostics are an :class:`F2SADiagnostics`.
        """
        check_scalar_loss("outer_loss", outer_loss, state.z, hparams)
        check_scalar_loss("inner_loss", inner_loss, state.y, hparams)
        check_matching(
            "hparams",
            hparams,
            "state.previous_hparams",
            state.previous_hparams,
            hint="the hyperparameters F2SA.init was given; build the state with init(hparams, y0)",
        )
        multiplier = self.multiplier_at(state.count)

        def penalized(params, hparams, multiplier):
            return outer_loss(params, hparams) / multiplier + inner_loss(params, hparams)

        y_loop = _InnerLoop(inner_loss, self.inner_optimizer, None)
        z_loop = _InnerLoop(penalized, self.inner_optimizer, None)
        y_context, z_context = (hparams,), (hparams, multiplier)
        y_start = _f2sa_parts.start_position(state.y, state.y_opt_state)
        z_start = _f2sa_parts.start_position(state.z, state.z_opt_state)
        y_memory, z_memory = state.y_memory, state.z_memory
        if self.momentum is None and self.batched_solves:
            y_end, z_end = _f2sa_parts.run_batched(
                outer_loss,
                inner_loss,
                (y_loop, z_loop),
                (y_context, z_context),
                (y_start, z_start),
                self.inner_steps,
            )
        elif self.momentum is None:
            y_end = y_loop.run(y_context, y_start, self.inner_steps)
            z_end = z_loop.run(z_context, z_start, self.inner_steps)
        else:
            started = state.count > 0
            y_end, y_memory = _f2sa_parts.run_with_momentum(
                y_loop,
                y_context,
                y_start,
                (state.previous_hparams,),
                y_memory,
                started,
                self.momentum,
                self.inner_steps,
            )
            previous = (state.previous_hparams, state.previous_multiplier)
            z_end, z_memory = _f2sa_parts.run_with_momentum(
                z_loop,
                z_context,
                z_start,
                previous,
                z_memory,
                started,
                self.momentum,
                self.inner_steps,
            )
        y_info = y_loop.diagnostics(y_end, (hparams,))
        z_info = z_loop.diagnostics(z_end, (hparams, multiplier))

        estimate_at = functools.partial(_f2sa_parts.estimate, outer_loss, inner_loss)
        estimate = estimate_at(hparams, y_end.params, z_end.params, multiplier)
        if self.momentum is not None:
            # The recursive-momentum correction: this call's losses at the previous point.
            previous = estimate_at(
                state.previous_hparams, state.y, state.z, state.previous_multiplier
            )
            keep = 1.0 - self.momentum
            corrected = jax.tree.map(
                lambda e, h, p: e + keep * (h - p), estimate, state.previous_estimate, previous
            )
            started = state.count > 0
            estimate = jax.tree.map(lambda c, e: jnp.where(started, c, e), corrected, estimate)

        finite = all_finite(estimate)
        failed = ~(finite & y_info.converged & z_info.converged)
        new_state = F2SAState(
            y=y_end.params,
            z=z_end.params,
            y_opt_state=y_end.opt_state,
            z_opt_state=z_end.opt_state,
            count=state.count + 1,
            previous_hparams=hparams,
            previous_multiplier=multiplier,
            previous_estimate=estimate,
            y_memory=y_memory,
            z_memory=z_memory,
        )
        # A failed step writes nothing: the state stays as it was.
        new_state = jax.tree.map(lambda old, new: jnp.where(failed, old, new), state, new_state)
        estimate = self._apply_policy(
            estimate, failed, (y_info.converged, z_info.converged, finite, multiplier)
        )
        return estimate, new_state, F2SADiagnostics(y_info, z_info, multiplier, finite)

    def _apply_policy(self, estimate, failed, report_operands):
        if self.on_failure == "ignore":
            return estimate
        if self.on_failure == "nan":
            return jax.tree.map(
                lambda e: jnp.where(failed, jnp.asarray(jnp.nan, e.dtype), e), estimate
            )
        report = functools.partial(_report, raise_error=self.on_failure == "raise")
        return report_on_failure(estimate, failed, report, *report_operands)


def _report(failed, y_converged, z_converged, finite, multiplier, *, raise_error: bool) -> None:
    failed = np.asarray(failed)
    if not failed.any():
        return
    parts = []
    if not np.all(y_converged):
        parts.append(
            f"the inner solve of y returned non-finite parameters "
            f"(finite={np.asarray(y_converged).tolist()})"
        )
    if not np.all(z_converged):
        parts.append(
            f"the penalized solve of z returned non-finite parameters "
            f"(finite={np.asarray(z_converged).tolist()})"
        )
    if not np.all(finite):
        parts.append(
            f"the hypergradient estimate is not finite (finite={np.asarray(finite).tolist()})"
        )
    message = (
        "F2SA step failed: "
        + "; ".join(parts)
        + f" (multiplier={np.asarray(multiplier).tolist()}). The state was left as it was. "
        "Lower the inner learning rate, check both losses for NaN, or let the multiplier grow "
        "more slowly."
    )
    raise_or_warn(message, F2SAWarning, raise_error=raise_error)
