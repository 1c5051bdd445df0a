"""Implicit-differentiation benchmarks: ``metaopt.implicit`` against jaxopt, and ``bilevel.solve``.

Two measurements, each timed with :func:`benchmarks.harness.measure` (interleaved rounds,
median time of a compiled step):

1. The hypergradient of ridge regression's validation loss with respect to per-feature
   log-penalties. The inner solution comes from a Cholesky solve of
   :math:`G + \\operatorname{diag}(\\lambda)`; it is differentiated by
   ``metaopt.implicit.custom_root`` with ``CG`` and by ``jaxopt.implicit_diff.custom_root`` with
   ``jaxopt.linear_solve.solve_cg``, at the same iteration cap and tolerance, both with the Gram
   matrix as Hessian-vector product (:math:`v \\mapsto G v + \\lambda \\odot v`). Autodiff
   through ``jnp.linalg.solve`` gives the closed-form hypergradient, and a float64 NumPy solve
   the exact one that all three are compared with.
2. Time, XLA temporaries and accuracy of one hypergradient through ``metaopt.bilevel.solve``
   against the number of inner steps, for ``Unrolled()``, ``Unrolled(checkpoint=True)`` and
   ``Implicit(CG(...))``, on a smaller ridge problem solved by ``optax.sgd``.

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
import optax
from absl import flags

from benchmarks import harness
from metaopt import bilevel
from metaopt.implicit import CG, LinearSolveInfo, custom_root

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
_BILEVEL_FEATURES = flags.DEFINE_integer(
    "bilevel_features", 300, "Features d of the bilevel.solve benchmark.", lower_bound=1
)
_BILEVEL_SAMPLES = flags.DEFINE_integer(
    "bilevel_samples", 1000, "Training (and validation) samples of bilevel.solve.", lower_bound=1
)
_BILEVEL_STEPS = flags.DEFINE_list(
    "bilevel_steps", ["5", "50", "500"], "Numbers of inner optax.sgd steps k, comma-separated."
)
_BILEVEL_CG_MAXITER = flags.DEFINE_integer(
    "bilevel_cg_maxiter", 200, "CG iteration cap of Implicit in bilevel.solve.", lower_bound=1
)
_BILEVEL_CG_TOL = flags.DEFINE_float(
    "bilevel_cg_tol",
    1e-5,
    "CG relative-residual tolerance of Implicit in bilevel.solve.",
    lower_bound=0.0,
)

flags.register_validator(
    "bilevel_steps",
    lambda values: bool(values) and all(v.isdigit() and int(v) > 0 for v in values),
    message="--bilevel_steps takes comma-separated positive integers, e.g. 5,50,500.",
)

_INITIAL_PENALTY = 1e-2  # lambda at which the hypergradients are taken, for every feature
_SCALE_DECADES = 1.0  # feature standard deviations spread log-uniformly over this many decades
_TIME_TARGET = 1.0
_CHECK_TARGET = 1.05  # the default failure check against none: "warn" ÷ "ignore"
_OURS, _JAXOPT = "metaopt custom_root + CG", "jaxopt custom_root + solve_cg"
_OURS_QUIET = 'metaopt, on_failure="ignore"'
_CLOSED_FORM, _FORWARD = "closed form: autodiff of jnp.linalg.solve", "forward only (Cholesky)"
_DIFF_NAMES = ("Unrolled()", "Unrolled(checkpoint=True)", "Implicit(CG)")


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
        inner_steps = benchmark_inner_steps(
            features=_BILEVEL_FEATURES.value,
            samples=_BILEVEL_SAMPLES.value,
            steps=[int(k) for k in _BILEVEL_STEPS.value],
            cg_maxiter=_BILEVEL_CG_MAXITER.value,
            cg_tol=_BILEVEL_CG_TOL.value,
            dtype=dtype,
            settings=settings,
        )
    return ridge + "\n" + inner_steps


# The ridge problem, shared by both benchmarks.


def ridge_data(
    rng: np.random.Generator, samples: int, features: int, validation: int, dtype: np.dtype
) -> dict[str, np.ndarray]:
    """Training and validation data of a linear model with unequally scaled features.

    Feature standard deviations are spread log-uniformly over ``_SCALE_DECADES`` decades (as in
    data that has not been standardized), which makes the Hessian moderately ill-conditioned so
    that CG needs tens of iterations; targets are a random linear function plus unit noise.
    """
    scales = np.logspace(0.0, -_SCALE_DECADES, features)
    truth = rng.standard_normal(features)

    def sample(count):
        x = rng.standard_normal((count, features)) * scales
        return x.astype(dtype), (x @ truth + rng.standard_normal(count)).astype(dtype)

    x, y = sample(samples)
    x_val, y_val = sample(validation)
    return {"x": x, "y": y, "x_val": x_val, "y_val": y_val}


def validation_loss(w: jax.Array, x_val: jax.Array, y_val: jax.Array) -> jax.Array:
    """Outer loss: half the mean squared validation error of the weights ``w``."""
    return 0.5 * jnp.mean((x_val @ w - y_val) ** 2)


def reference_hypergradient(
    gram: np.ndarray,
    moment: np.ndarray,
    log_penalty: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
) -> np.ndarray:
    """Exact hypergradient of :func:`validation_loss` at the ridge solution, in float64 NumPy.

    With :math:`A = G + \\operatorname{diag}(\\lambda)`, :math:`w = A^{-1} m` and
    :math:`u = A^{-1} \\nabla_w L`, differentiating :math:`A w = m` gives
    :math:`\\partial L / \\partial \\lambda_j = -u_j w_j`, and
    :math:`\\partial L / \\partial \\log\\lambda_j = -u_j w_j \\lambda_j`.
    """
    gram, moment, x_val, y_val = (np.asarray(a, np.float64) for a in (gram, moment, x_val, y_val))
    penalty = np.exp(np.asarray(log_penalty, np.float64))
    a = gram + np.diag(penalty)
    w = np.linalg.solve(a, moment)
    outer_gradient = x_val.T @ (x_val @ w - y_val) / len(y_val)
    u = np.linalg.solve(a, outer_gradient)
    return -u * w * penalty


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
        "log_penalty": np.full(features, np.log(_INITIAL_PENALTY), dtype),
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
    reference = jaxopt.implicit_diff.custom_root(
        ridge_optimality,
        solve=functools.partial(jaxopt.linear_solve.solve_cg, maxiter=maxiter, tol=tol),
    )(cholesky_ridge)
    hypergradient_variants = {
        _OURS: _hypergradient_step(ours),
        _OURS_QUIET: _hypergradient_step(ours_quiet),
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

    harness.log(f"ridge hypergradient: d={features}, n={samples}, {dtype.name}, CG {maxiter}")
    results = harness.measure(variants, settings)
    forward = results[_FORWARD]
    jaxopt_result = results[_JAXOPT]

    rows = []
    for name in [*hypergradient_variants, _FORWARD]:
        m = results[name]
        differentiates = name in (_OURS, _OURS_QUIET, _JAXOPT)
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
    return (
        f"### Ridge hypergradient: d = {features:,} features, n = {samples:,} samples, "
        f"{dtype.name}\n\n"
        f"Inner problem: minimize (1/2n)‖Xw − y‖² + ½ Σⱼ λⱼ wⱼ² with feature scales spread over "
        f"{_SCALE_DECADES:g} decade; hyperparameters: the {features:,} per-feature "
        f"log-penalties log λⱼ, all at log {_INITIAL_PENALTY:g}; outer loss: half the mean "
        f"squared error on {validation:,} validation samples. G = XᵀX/n and Xᵀy/n are "
        f"computed once outside the timed step. The inner solution is a Cholesky solve of "
        f"G + diag(λ), wrapped in `metaopt.implicit.custom_root(optimality, "
        f"solve=CG(maxiter={maxiter}, tol={tol:g}))` or in `jaxopt.implicit_diff.custom_root("
        f"optimality, solve=partial(solve_cg, maxiter={maxiter}, tol={tol:g}))`: the same "
        f"optimality function, whose Jacobian-vector product is the Gram-matrix "
        f"Hessian-vector product v ↦ Gv + λ ⊙ v on both sides. Each row is one jitted "
        f"`jax.grad` (forward solve and backward pass), {len(forward.step_seconds)} "
        f'interleaved repeats after warm-up. "Minus forward" subtracts the median of the '
        f"forward-only step (Cholesky solve and validation loss), leaving the cost of "
        f"differentiating; its ratio's interval is bootstrapped like the others. metaopt's "
        f'default failure policy (`on_failure="warn"`) tests on the device whether the adjoint '
        f"solve converged and calls the host (`jax.debug.callback`) only when it did not; the "
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


# 2. bilevel.solve: memory, time and accuracy against the number of inner steps.


def inner_loss(w, log_penalty, x, y):
    """Ridge regression's training loss with per-feature penalties exp(log_penalty)."""
    return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(log_penalty) * w**2)


def _diff(name: str, cg_maxiter: int, cg_tol: float) -> bilevel.Implicit | bilevel.Unrolled:
    return {
        "Unrolled()": bilevel.Unrolled(),
        "Unrolled(checkpoint=True)": bilevel.Unrolled(checkpoint=True),
        # k steps are a fixed budget here, deliberately unconverged at small k (the table
        # shows what that costs in accuracy): rtol=None, or the default test would warn.
        "Implicit(CG)": bilevel.Implicit(CG(maxiter=cg_maxiter, tol=cg_tol), rtol=None),
    }[name]


def _solve(log_penalty, x, y, *, steps, learning_rate, diff):
    w, diagnostics = bilevel.solve(
        inner_loss,
        jnp.zeros(x.shape[1], x.dtype),
        log_penalty,
        x,
        y,
        optimizer=optax.sgd(learning_rate),
        steps=steps,
        tol=None,
        diff=diff,
    )
    return w, diagnostics


def _bilevel_step(steps: int, learning_rate: float, diff):
    """``step(previous, log_penalty, x, y, x_val, y_val) -> (hypergradient,)``."""

    def step(previous, log_penalty, x, y, x_val, y_val):
        del previous

        def outer(log_penalty):
            w, _ = _solve(log_penalty, x, y, steps=steps, learning_rate=learning_rate, diff=diff)
            return validation_loss(w, x_val, y_val)

        return (jax.grad(outer)(log_penalty),)

    return step


def benchmark_inner_steps(
    *,
    features: int,
    samples: int,
    steps: list[int],
    cg_maxiter: int,
    cg_tol: float,
    dtype: np.dtype,
    settings: harness.Settings,
) -> str:
    """Memory, time and error of one bilevel.solve hypergradient against the inner steps.

    Returns:
      A markdown section with the tables.
    """
    data = ridge_data(np.random.default_rng(1), samples, features, samples, dtype)
    log_penalty = np.full(features, np.log(_INITIAL_PENALTY), dtype)
    x64 = data["x"].astype(np.float64)
    gram = x64.T @ x64 / samples
    # Step 1/L, L the largest eigenvalue of the inner Hessian G + diag(lambda).
    learning_rate = float(1.0 / (np.linalg.eigvalsh(gram)[-1] + _INITIAL_PENALTY))
    exact = reference_hypergradient(
        gram,
        x64.T @ data["y"].astype(np.float64) / samples,
        log_penalty,
        data["x_val"],
        data["y_val"],
    )
    constants = tuple(
        jax.device_put(a) for a in (log_penalty, data["x"], data["y"], data["x_val"], data["y_val"])
    )
    gradient_norm = jax.jit(
        lambda lp, x, y, k: (
            _solve(lp, x, y, steps=k, learning_rate=learning_rate, diff=None)[1].gradient_norm
        ),
        static_argnums=3,
    )

    rows, results, errors = [], {}, {}
    for k in steps:
        variants = [
            harness.Variant(
                name,
                _bilevel_step(k, learning_rate, _diff(name, cg_maxiter, cg_tol)),
                (jnp.zeros(features, dtype),),
                constants,
            )
            for name in _DIFF_NAMES
        ]
        for variant in variants:
            errors[k, variant.name] = harness.relative_error(harness.evaluate(variant)[0], exact)
        norm = float(gradient_norm(*constants[:3], k))
        harness.log(f"bilevel.solve: d={features}, n={samples}, k={k}")
        measured = harness.measure(variants, settings)
        implicit = measured["Implicit(CG)"]
        for name in _DIFF_NAMES:
            m = results[k, name] = measured[name]
            rows.append(
                [
                    str(k),
                    name,
                    harness.format_time(m),
                    harness.format_interval(harness.step_time_ratio(m, implicit)),
                    harness.format_bytes(None if m.memory is None else m.memory.temp_bytes),
                    harness.format_bytes(None if m.memory is None else m.memory.peak_bytes),
                    f"{errors[k, name]:.2e}",
                    f"{norm:.2e}",
                    f"{m.compile_time:.3f}",
                ]
            )
    table = harness.markdown_table(
        [
            "inner steps k",
            "diff",
            "time, ms: median (IQR)",
            "÷ Implicit(CG)",
            "XLA temporaries",
            "XLA peak buffers",
            "rel. error vs exact",
            "inner gradient norm",
            "compile, s",
        ],
        rows,
    )

    def temp(k, name):
        m = results[k, name]
        return None if m.memory is None else m.memory.temp_bytes

    first, last = steps[0], steps[-1]
    growth_rows = [
        [
            name,
            *(harness.format_bytes(temp(k, name)) for k in steps),
            harness.format_ratio(temp(last, name), temp(first, name)),
        ]
        for name in _DIFF_NAMES
    ]
    growth = harness.markdown_table(
        ["XLA temporaries", *(f"k = {k}" for k in steps), f"k = {last} ÷ k = {first}"],
        growth_rows,
    )
    return (
        f"### bilevel.solve: one hypergradient against the number of inner steps, d = "
        f"{features:,}, n = {samples:,}, {dtype.name}\n\n"
        f"The same kind of ridge problem and outer loss as above ({samples:,} validation "
        f"samples), with the training loss (1/2n)‖Xw − y‖² + ½ Σⱼ λⱼ wⱼ² given to "
        f"`bilevel.solve` as the inner loss (its gradients and Hessian-vector products by "
        f"autodiff through X, no Gram matrix), started from w = 0 and run for exactly k steps "
        f"of `optax.sgd({learning_rate:.3g})` (1/L; `tol=None`, so the implicit variant also "
        f"runs k steps). `Implicit(CG)` is `Implicit(CG(maxiter={cg_maxiter}, "
        f"tol={cg_tol:g}), rtol=None)`: `rtol=None` declares the k steps a fixed budget, "
        f"since the default test (final gradient norm ≤ 1e-3 × initial) would rightly warn "
        f"at the small k; "
        f"`Unrolled(checkpoint=True)` recomputes segments of about √k steps. Each row is one "
        f"jitted `jax.grad` of the validation loss; the three variants of a k are timed in the "
        f"same interleaved rounds. XLA temporaries and peak buffers are from "
        f"`compiled.memory_analysis()`; the arguments (X, y and the validation set) are the "
        f"same for every row. The error is against the exact hypergradient at the exact inner "
        f"solution (float64 NumPy), so it includes the error of stopping after k steps; the "
        f"inner gradient norm at step k says how far from converged the inner solve was.\n\n"
        + table
        + "\nXLA temporaries against k (memory of the backward pass: unrolling stores every "
        "step, checkpointing about √k segment boundaries plus one segment, the implicit "
        "derivative nothing per step):\n\n" + growth
    )
