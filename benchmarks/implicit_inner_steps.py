"""``bilevel.solve`` benchmark: time, XLA temporaries and accuracy of one hypergradient against
the number of inner steps, for ``Unrolled()``, ``Unrolled(checkpoint=True)`` and
``Implicit(CG(...))``, on a ridge problem solved by ``optax.sgd``; part of ``--suite=implicit``
(:func:`benchmarks.implicit.run_suite` calls :func:`run`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from benchmarks import harness
from benchmarks.ridge_problem import (
    INITIAL_PENALTY,
    reference_hypergradient,
    ridge_data,
    validation_loss,
)
from metaopt import bilevel
from metaopt.implicit import CG

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

_DIFF_NAMES = ("Unrolled()", "Unrolled(checkpoint=True)", "Implicit(CG)")


def run(dtype: np.dtype, settings: harness.Settings) -> str:
    """Runs the benchmark at the sizes given by the flags; returns the markdown section."""
    return benchmark_inner_steps(
        features=_BILEVEL_FEATURES.value,
        samples=_BILEVEL_SAMPLES.value,
        steps=[int(k) for k in _BILEVEL_STEPS.value],
        cg_maxiter=_BILEVEL_CG_MAXITER.value,
        cg_tol=_BILEVEL_CG_TOL.value,
        dtype=dtype,
        settings=settings,
    )


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
    log_penalty = np.full(features, np.log(INITIAL_PENALTY), dtype)
    x64 = data["x"].astype(np.float64)
    gram = x64.T @ x64 / samples
    # Step 1/L, L the largest eigenvalue of the inner Hessian G + diag(lambda).
    learning_rate = float(1.0 / (np.linalg.eigvalsh(gram)[-1] + INITIAL_PENALTY))
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
