"""Implicit-differentiation benchmarks: ``metaopt.implicit`` against jaxopt, and ``bilevel.solve``.

Two measurements, each timed with :func:`benchmarks.harness.measure` (interleaved rounds,
median time of a compiled step):

1. The hypergradient of ridge regression's validation loss with respect to per-feature
   log-penalties. The inner solution comes from a Cholesky solve of
   :math:`G + \\operatorname{diag}(\\lambda)`; it is differentiated by
   ``metaopt.implicit.custom_root`` with ``CG`` and by ``jaxopt.implicit_diff.custom_root`` with
   ``jaxopt.linear_solve.solve_cg``, at the same iteration cap and tolerance, both with the Gram
   matrix as Hessian-vector product (:math:`v \\mapsto G v + \\lambda \\odot v`), and by
   ``metaopt.implicit.Factorized``, which solves the adjoint system with the forward solve's
   Cholesky factor. Autodiff through ``jnp.linalg.solve`` gives the closed-form hypergradient,
   and a float64 NumPy solve the exact one that all of them are compared with.
2. Time, XLA temporaries and accuracy of one hypergradient through ``metaopt.bilevel.solve``
   against the number of inner steps, for ``Unrolled()``, ``Unrolled(checkpoint=True)`` and
   ``Implicit(CG(...))``, on a smaller ridge problem solved by ``optax.sgd``
   (:mod:`benchmarks.implicit_inner_steps`). The ridge problem itself is in
   :mod:`benchmarks.ridge_problem`.

Every step function maps ``(previous hypergradient, log-penalties, data...)`` to the new
hypergradient at the same log-penalties; the donated previous hypergradient only supplies the
output buffer, so each timed call is one full hypergradient (forward solve and backward pass).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import harness, implicit_inner_steps
from benchmarks.ridge_problem import (
    INITIAL_PENALTY,
    SCALE_DECADES,
    reference_hypergradient,
    ridge_data,
    validation_loss,
)
from metaopt.implicit import CG, Factorized, LinearSolveInfo, custom_root

_DTYPE = flags.DEFINE_enum(
    "implicit_dtype",
    "float32",
    ["float32", "float64"],
    "Floating-point type of both implicit benchmarks (float64 turns on jax_enable_x64 for them).",
)
_RIDGE_FEATURES = flags.DEFINE_integer(
    "ridge_features", 2000, "Features d of the ridge hypergradient benchmark.", lower_bound=1
)
_RIDGE_SAMPLES = flags.DEFINE_integer(
    "ridge_samples", 10000, "Training samples n of the ridge benchmark.", lower_bound=1
)
_RIDGE_VALIDATION = flags.DEFINE_integer(
    "ridge_validation_samples", 2000, "Validation samples of the ridge benchmark.", lower_bound=1
)
_RIDGE_MAXITER = flags.DEFINE_integer(
    "ridge_cg_maxiter", 100, "CG iteration cap of both implicit derivatives.", lower_bound=1
)
_RIDGE_TOL = flags.DEFINE_float(
    "ridge_cg_tol",
    1e-5,
    "CG relative-residual tolerance of both implicit derivatives (1e-5 suits float32).",
    lower_bound=0.0,
)
_TIME_TARGET = 1.0
_REUSE_TARGET = 0.8  # issue 15: reusing the forward factor, whole hypergradient ÷ jaxopt's
_CHECK_TARGET = 1.05  # the default failure check against none: "warn" ÷ "ignore"
_OURS, _JAXOPT = "metaopt custom_root + CG", "jaxopt custom_root + solve_cg"
_OURS_QUIET = 'metaopt, on_failure="ignore"'
_REUSED = "metaopt custom_root + reused Cholesky factor"
_REUSED_CHECKED = "metaopt, reused factor, check=True"
_CLOSED_FORM, _FORWARD = "closed form: autodiff of jnp.linalg.solve", "forward only (Cholesky)"


def run_suite(settings: harness.Settings) -> str:
    """Runs both implicit benchmarks at the sizes given by the flags; returns the markdown.

    Both run on one device (the default one of each process): ``settings.mesh`` (``--shard``)
    does not apply to these single-problem solves.
    """
    dtype = np.dtype(_DTYPE.value)
    # float64 needs x64 only while this suite traces and runs; other suites keep the default.
    x64 = jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()
    with x64:
        ridge = benchmark_ridge_hypergradient(
            features=_RIDGE_FEATURES.value,
            samples=_RIDGE_SAMPLES.value,
            validation=_RIDGE_VALIDATION.value,
            maxiter=_RIDGE_MAXITER.value,
            tol=_RIDGE_TOL.value,
            dtype=dtype,
            settings=settings,
        )
        inner_steps = implicit_inner_steps.run(dtype, settings)
    return ridge + "\n" + inner_steps


# 1. Hypergradient of ridge regression: metaopt against jaxopt.


def ridge_optimality(w, log_penalty, gram, moment):
    """Gradient of :math:`\\tfrac12 w^\\top G w - m^\\top w + \\tfrac12 \\sum_j \\lambda_j w_j^2`:
    zero at the ridge solution. Its Jacobian-vector product is :math:`G v + \\lambda \\odot v`."""
    return gram @ w + jnp.exp(log_penalty) * w - moment


def cholesky_ridge(init, log_penalty, gram, moment):
    """The ridge solution by a Cholesky solve; ``init`` is unused (a direct solver)."""
    del init
    factor = jax.scipy.linalg.cho_factor(gram + jnp.diag(jnp.exp(log_penalty)))
    return jax.scipy.linalg.cho_solve(factor, moment)


def cholesky_ridge_with_factor(init, log_penalty, gram, moment):
    """The ridge solution by a Cholesky solve, and the factor for ``Factorized`` to reuse."""
    del init
    factor = jax.scipy.linalg.cho_factor(gram + jnp.diag(jnp.exp(log_penalty)))
    return jax.scipy.linalg.cho_solve(factor, moment), factor


def _check_tol(dtype: np.dtype) -> float:
    """Residual bound of the reused factor's check: a direct solve's residual is about machine
    epsilon times the condition number, so float32 needs a loose bound."""
    return 1e-3 if dtype == np.float32 else 1e-8


def linalg_solve_ridge(init, log_penalty, gram, moment):
    """The ridge solution by ``jnp.linalg.solve``, whose autodiff is the closed form."""
    del init
    return jnp.linalg.solve(gram + jnp.diag(jnp.exp(log_penalty)), moment)


def _hypergradient_step(solution):
    """``step(previous, log_penalty, gram, moment, x_val, y_val) -> (hypergradient,)``."""

    def step(previous, log_penalty, gram, moment, x_val, y_val):
        del previous  # only its buffer is reused

        def outer(log_penalty):
            w = solution(jnp.zeros_like(moment), log_penalty, gram, moment)
            return validation_loss(w, x_val, y_val)

        return (jax.grad(outer)(log_penalty),)

    return step


def _forward_step(loss, log_penalty, gram, moment, x_val, y_val):
    """The part every hypergradient shares: Cholesky solve and validation loss."""
    del loss
    return (validation_loss(cholesky_ridge(None, log_penalty, gram, moment), x_val, y_val),)


def benchmark_ridge_hypergradient(
    *,
    features: int,
    samples: int,
    validation: int,
    maxiter: int,
    tol: float,
    dtype: np.dtype,
    settings: harness.Settings,
) -> str:
    """Times one hypergradient by metaopt's and jaxopt's custom_root and by the closed form.

    Returns:
      A markdown section with the table.
    """
    with warnings.catch_warnings():
        # jaxopt announces on import that it is unmaintained; it is only the reference here.
        # Imported here so that the other suites run without it.
        warnings.filterwarnings("ignore", "JAXopt is no longer maintained", DeprecationWarning)
        import jaxopt

    data = ridge_data(np.random.default_rng(0), samples, features, validation, dtype)
    # X^T X / n and X^T y / n are computed once, outside the timed steps, for every variant.
    host = {
        "gram": (data["x"].T @ data["x"] / samples).astype(dtype),
        "moment": (data["x"].T @ data["y"] / samples).astype(dtype),
        "log_penalty": np.full(features, np.log(INITIAL_PENALTY), dtype),
    }
    constants = tuple(
        jax.device_put(a)
        for a in (host["log_penalty"], host["gram"], host["moment"], data["x_val"], data["y_val"])
    )
    linear_solver = CG(maxiter=maxiter, tol=tol)
    ours = custom_root(ridge_optimality, solve=linear_solver)(cholesky_ridge)
    # The default failure policy ("warn") checks the adjoint solve on the host after every
    # derivative; without it, what is left is the differentiation itself.
    ours_quiet = custom_root(ridge_optimality, solve=linear_solver, on_failure="ignore")(
        cholesky_ridge
    )
    reused = custom_root(
        ridge_optimality,
        solve=Factorized(jax.scipy.linalg.cho_solve, symmetric=True),
        has_aux=True,
    )(cholesky_ridge_with_factor)
    checked = Factorized(
        jax.scipy.linalg.cho_solve, symmetric=True, check=True, tol=_check_tol(dtype)
    )
    reused_checked = custom_root(ridge_optimality, solve=checked, has_aux=True)(
        cholesky_ridge_with_factor
    )
    reference = jaxopt.implicit_diff.custom_root(
        ridge_optimality,
        solve=functools.partial(jaxopt.linear_solve.solve_cg, maxiter=maxiter, tol=tol),
    )(cholesky_ridge)
    hypergradient_variants = {
        _OURS: _hypergradient_step(ours),
        _OURS_QUIET: _hypergradient_step(ours_quiet),
        _REUSED: _hypergradient_step(lambda *a: reused(*a)[0]),
        _REUSED_CHECKED: _hypergradient_step(lambda *a: reused_checked(*a)[0]),
        _JAXOPT: _hypergradient_step(reference),
        _CLOSED_FORM: _hypergradient_step(linalg_solve_ridge),
    }
    variants = [
        harness.Variant(name, step, (jnp.zeros(features, dtype),), constants)
        for name, step in hypergradient_variants.items()
    ]
    variants.append(harness.Variant(_FORWARD, _forward_step, (jnp.zeros((), dtype),), constants))

    exact = reference_hypergradient(
        host["gram"], host["moment"], host["log_penalty"], data["x_val"], data["y_val"]
    )
    values = {v.name: harness.evaluate(v)[0] for v in variants if v.name != _FORWARD}
    adjoint = _adjoint_solve_info(constants, maxiter, tol)
    reused_residual = _reused_adjoint_residual(constants)

    harness.log(f"ridge hypergradient: d={features}, n={samples}, {dtype.name}, CG {maxiter}")
    results = harness.measure(variants, settings)
    forward = results[_FORWARD]
    jaxopt_result = results[_JAXOPT]

    rows = []
    for name in [*hypergradient_variants, _FORWARD]:
        m = results[name]
        differentiates = name in (_OURS, _OURS_QUIET, _REUSED, _REUSED_CHECKED, _JAXOPT)
        rows.append(
            [
                name,
                harness.format_time(m),
                harness.format_interval(harness.step_time_ratio(m, jaxopt_result)),
                f"{(m.step_time - forward.step_time) * 1e3:.3g}",
                harness.format_interval(harness.step_time_ratio(m, jaxopt_result, subtract=forward))
                if differentiates
                else "",
                *(
                    ("", "")
                    if name == _FORWARD
                    else (
                        f"{harness.relative_error(values[name], values[_CLOSED_FORM]):.2e}",
                        f"{harness.relative_error(values[name], exact):.2e}",
                    )
                ),
                f"{m.compile_time:.3f}",
                harness.format_bytes(None if m.memory is None else m.memory.temp_bytes),
            ]
        )
    table = harness.markdown_table(
        [
            "hypergradient",
            "time, ms: median (IQR)",
            "÷ jaxopt",
            "minus forward, ms",
            "minus forward ÷ jaxopt's",
            "rel. error vs closed form",
            "rel. error vs float64 exact",
            "compile, s",
            "XLA temporaries",
        ],
        rows,
    )
    ratio = harness.step_time_ratio(results[_OURS], jaxopt_result)
    checking = harness.step_time_ratio(results[_OURS], results[_OURS_QUIET])
    error_ours = harness.relative_error(values[_OURS], exact)
    error_jaxopt = harness.relative_error(values[_JAXOPT], exact)
    reuse_ratio = harness.step_time_ratio(results[_REUSED], jaxopt_result)
    reuse_minus_forward = harness.step_time_ratio(results[_REUSED], jaxopt_result, subtract=forward)
    reuse_checking = harness.step_time_ratio(results[_REUSED_CHECKED], results[_REUSED])
    error_reused = harness.relative_error(values[_REUSED], exact)
    return (
        f"### Ridge hypergradient: d = {features:,} features, n = {samples:,} samples, "
        f"{dtype.name}\n\n"
        f"Inner problem: minimize (1/2n)‖Xw − y‖² + ½ Σⱼ λⱼ wⱼ² with feature scales spread over "
        f"{SCALE_DECADES:g} decade; hyperparameters: the {features:,} per-feature "
        f"log-penalties log λⱼ, all at log {INITIAL_PENALTY:g}; outer loss: half the mean "
        f"squared error on {validation:,} validation samples. G = XᵀX/n and Xᵀy/n are "
        f"computed once outside the timed step. The inner solution is a Cholesky solve of "
        f"G + diag(λ), wrapped in `metaopt.implicit.custom_root(optimality, "
        f"solve=CG(maxiter={maxiter}, tol={tol:g}))` or in `jaxopt.implicit_diff.custom_root("
        f"optimality, solve=partial(solve_cg, maxiter={maxiter}, tol={tol:g}))`: the same "
        f"optimality function, whose Jacobian-vector product is the Gram-matrix "
        f"Hessian-vector product v ↦ Gv + λ ⊙ v on both sides. The reused-factor rows return "
        f"the Cholesky factor of the forward solve as aux and differentiate with "
        f"`custom_root(optimality, solve=Factorized(cho_solve, symmetric=True), "
        f"has_aux=True)`: the adjoint system is two triangular solves with that factor, no "
        f"iterations; `check=True` adds one Gram-matrix product that tests the adjoint "
        f"solution's relative residual against {_check_tol(dtype):g}. Each row is one jitted "
        f"`jax.grad` (forward solve and backward pass), {len(forward.step_seconds)} "
        f'interleaved repeats after warm-up. "Minus forward" subtracts the median of the '
        f"forward-only step (Cholesky solve and validation loss), leaving the cost of "
        f"differentiating; its ratio's interval is bootstrapped like the others. metaopt's "
        f'default failure policy (`on_failure="warn"`) tests on the device whether the adjoint '
        f"solve converged and calls the host (`jax.pure_callback` under a `lax.cond`) only "
        f"when it did not; the "
        f'`on_failure="ignore"` row is the same derivative without the test. Errors are '
        f"‖g − g_ref‖/‖g_ref‖ against the closed form in {dtype.name} and against the exact "
        f"hypergradient of the same G and Xᵀy/n solved in float64 NumPy.\n\n" + table + "\n"
        f"metaopt ÷ jaxopt = {harness.format_interval(ratio)} (target ≤ {_TIME_TARGET:g} at "
        f"equal or better error: {harness.verdict(ratio, _TIME_TARGET, at_most=True)}; errors "
        f"{error_ours:.2e} and {error_jaxopt:.2e}). On the same adjoint system, metaopt's CG "
        f"took {int(adjoint.iterations)} iterations to a verified relative residual of "
        f"{float(adjoint.relative_residual):.2e} (converged: {bool(adjoint.converged)}); "
        f"jaxopt's `solve_cg` (`jax.scipy.sparse.linalg.cg`) runs the same recurrence, stops "
        f"once its running (recursive) residual is at most tol ‖b‖ and reports nothing, "
        f"whereas metaopt's CG stops so that the residual recomputed from its answer meets "
        f"tol, which can take a few more iterations for a smaller error.\n\n"
        f"Reusing the forward Cholesky factor: ÷ jaxopt = {harness.format_interval(reuse_ratio)}"
        f" (target ≤ {_REUSE_TARGET:g} at equal or better error: "
        f"{harness.verdict(reuse_ratio, _REUSE_TARGET, at_most=True)}; errors "
        f"{error_reused:.2e} and {error_jaxopt:.2e}); its differentiation part (minus forward) "
        f"÷ jaxopt's = {harness.format_interval(reuse_minus_forward)}. The reused factor's "
        f"adjoint solution has a relative residual of {reused_residual:.2e}; the check costs "
        f"check=True ÷ unchecked = {harness.format_interval(reuse_checking)}.\n\n"
        f'The default policy\'s cost: on_failure="warn" ÷ on_failure="ignore" = '
        f"{harness.format_interval(checking)} (target ≤ {_CHECK_TARGET:g}: "
        f"{harness.verdict(checking, _CHECK_TARGET, at_most=True)}).\n"
    )


def _adjoint_solve_info(constants, maxiter: int, tol: float) -> LinearSolveInfo:
    """Solves (G + diag λ) u = ∇_w L at the ridge solution with metaopt's CG, for the report."""

    @jax.jit
    def adjoint(log_penalty, gram, moment, x_val, y_val):
        w = cholesky_ridge(None, log_penalty, gram, moment)
        b = jax.grad(validation_loss)(w, x_val, y_val)
        _, info = CG(maxiter=maxiter, tol=tol)(
            lambda v: ridge_optimality(v, log_penalty, gram, jnp.zeros_like(v)), b
        )
        return info

    return adjoint(*constants)


def _reused_adjoint_residual(constants) -> float:
    """Relative residual of (G + diag λ) u = ∇_w L solved with the forward Cholesky factor."""

    @jax.jit
    def residual(log_penalty, gram, moment, x_val, y_val):
        w, factor = cholesky_ridge_with_factor(None, log_penalty, gram, moment)
        b = jax.grad(validation_loss)(w, x_val, y_val)
        u = jax.scipy.linalg.cho_solve(factor, b)
        a_u = ridge_optimality(u, log_penalty, gram, jnp.zeros_like(u))
        return jnp.linalg.norm(b - a_u) / jnp.linalg.norm(b)

    return float(residual(*constants))
