"""Bilevel benchmarks: hypergradient methods on data hypercleaning, and the applications' rows.

The problem is ``examples/hypercleaning.py`` (one weight per training example of digits, half
the labels corrupted, a linear classifier with an L2 term ``mu`` trained on the weighted loss;
see ``docs/hypercleaning.md``), at each inner conditioning of ``--cleaning_l2``: the inner
Hessian's condition number is about ``0.5 / mu`` (54 at ``mu = 1e-2``, 505 at ``1e-3``), and it
sets how many conjugate-gradient iterations the implicit adjoint solve needs. Every method runs
the same number of warm-started inner steps per outer step (``--cleaning_inner_steps``; F2SA
runs that many in each of its two solves). Three measurements:

1. **Time per outer step** (inner solves, hypergradient and Adam update, one compiled call) of
   F2SA, implicit differentiation by CG and by a Neumann series, unrolled and truncated
   backpropagation and sl-BAMM (``inner_steps`` single-loop iterations), beside the inner
   solve alone (the unit of the breakdown), with :func:`benchmarks.harness.measure`
   (interleaved rounds; compilation excluded and reported), and F2SA's time over CG's with a
   bootstrap interval. Target: at most 0.5.
2. **Test accuracy after a fixed time budget** (``--cleaning_time_budget`` seconds of compiled
   outer steps per method, then the example's scoring: a classifier trained from zero with the
   learned weights), with the no-weights baseline, averaged over ``--cleaning_seeds`` (splits
   and corruptions of the data). Target: F2SA within 1 point of CG (or better).
3. **Memory against the number of inner steps**: XLA's peak buffer bytes of one compiled outer
   step at each of ``--cleaning_memory_steps`` (compiled, not run).

Then one row per application (``--bilevel_applications``): each example module's
``benchmark_row()`` at its own small configuration (per-parameter weight decay, dataset
distillation, learned learning-rate schedules, the three-level problem), when present.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jax.flatten_util import ravel_pytree

from benchmarks import harness
from metaopt import bilevel

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
METHODS = ("f2sa", "implicit_cg", "implicit_neumann", "unrolled", "truncated", "slbamm")
APPLICATIONS = (
    "per_parameter_weight_decay",
    "dataset_distillation",
    "learned_lr_schedule",
    "three_level",
)

_METHODS = flags.DEFINE_list(
    "cleaning_methods", list(METHODS), f"Hypergradient methods, among {', '.join(METHODS)}."
)
_L2 = flags.DEFINE_list(
    "cleaning_l2", ["1e-2", "1e-3"], "Inner L2 terms mu of hypercleaning (one table row set each)."
)
_INNER_STEPS = flags.DEFINE_integer(
    "cleaning_inner_steps", 30, "Warm-started inner steps per outer step.", lower_bound=1
)
_NUM_TRAIN = flags.DEFINE_integer(
    "cleaning_num_train", 1000, "Training examples (one hyperparameter each).", lower_bound=1
)
_NUM_VALIDATION = flags.DEFINE_integer(
    "cleaning_num_validation", 200, "Clean validation examples.", lower_bound=1
)
_TIME_BUDGET = flags.DEFINE_float(
    "cleaning_time_budget", 3.0, "Seconds of outer steps per method before scoring.", lower_bound=0
)
_SEEDS = flags.DEFINE_list(
    "cleaning_seeds", ["0", "1", "2"], "Data seeds of the time-budget table (accuracy averaged)."
)
_MAX_OUTER_STEPS = flags.DEFINE_integer(
    "cleaning_max_outer_steps", 2000, "Outer steps cap under the time budget.", lower_bound=1
)
_EVAL_STEPS = flags.DEFINE_integer(
    "cleaning_eval_steps", 2000, "Steps of the scoring classifier's training.", lower_bound=1
)
_MEMORY_STEPS = flags.DEFINE_list(
    "cleaning_memory_steps", ["10", "100", "1000"], "Inner steps of the memory measurement."
)
_APPLICATIONS = flags.DEFINE_list(
    "bilevel_applications",
    list(APPLICATIONS),
    f"Application rows, among {', '.join(APPLICATIONS)} (empty: none).",
)


def _hypercleaning():
    """The example module (examples/ is not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module("hypercleaning")


def run_suite(settings: harness.Settings) -> str:
    """Runs the bilevel benchmark at the sizes given by the flags; returns the markdown.

    It runs on one device: ``settings.mesh`` (``--shard``) does not apply.
    """
    methods = list(_METHODS.value)
    if not {"f2sa", "implicit_cg"} <= set(methods) or not set(methods) <= set(METHODS):
        raise ValueError(
            f"--cleaning_methods={','.join(methods)}: must include f2sa and implicit_cg (the "
            f"target compares them) and name only methods among {', '.join(METHODS)}."
        )
    unknown = sorted(set(_APPLICATIONS.value) - set(APPLICATIONS))
    if unknown:
        raise ValueError(
            f"--bilevel_applications: unknown {unknown}; choose among {', '.join(APPLICATIONS)}."
        )
    hc = _hypercleaning()
    configs = [
        hc.CleaningConfig(
            num_train=_NUM_TRAIN.value,
            num_validation=_NUM_VALIDATION.value,
            l2=float(mu),
            inner_steps=_INNER_STEPS.value,
            outer_steps=_MAX_OUTER_STEPS.value,
            eval_steps=_EVAL_STEPS.value,
        )
        for mu in _L2.value
    ]
    step_time, speed = benchmark_step_time(hc, configs, methods, settings)
    time_budget, accuracy = benchmark_time_budget(
        hc, configs, methods, _TIME_BUDGET.value, [int(seed) for seed in _SEEDS.value]
    )
    parts = [
        step_time,
        time_budget,
        target_summary(speed, accuracy),
        benchmark_memory(hc, configs[0], methods, [int(k) for k in _MEMORY_STEPS.value]),
    ]
    if _APPLICATIONS.value:
        parts.append(benchmark_applications(_APPLICATIONS.value))
    return "\n".join(parts)


def _variant(hc, method: str, config, data) -> harness.Variant:
    optimizer = optax.adam(config.outer_learning_rate)
    weight_logits = jnp.zeros(data.x_train.shape[0], data.x_train.dtype)
    init_state, step = hc.make_outer_step(method, config, optimizer)
    state = init_state(weight_logits, hc.init_classifier(data.x_train.shape[1]))
    carry = (weight_logits, optimizer.init(weight_logits), state)
    # Donated buffers must be distinct (F2SA's state starts with y = z, one array twice).
    carry = jax.tree.map(lambda a: jnp.array(a, copy=True), carry)
    return harness.Variant(
        name=method,
        step=lambda w, o, s, data: step(w, o, s, data)[:3],
        carry=carry,
        constants=(data,),
    )


def _inner_solve_variant(hc, config, data) -> harness.Variant:
    """The floor both methods share: the inner solve alone, ``inner_steps`` warm-started steps."""
    weight_logits = jnp.zeros(data.x_train.shape[0], data.x_train.dtype)

    def step(params, data):
        inner, _ = hc.make_losses(config, data)
        params, _ = bilevel.solve(
            inner,
            params,
            weight_logits,
            optimizer=optax.sgd(config.inner_learning_rate),
            steps=config.inner_steps,
            diff=bilevel.FirstOrder(),
        )
        return (params,)

    return harness.Variant(
        name="inner_solve",
        step=step,
        carry=(hc.init_classifier(data.x_train.shape[1]),),
        constants=(data,),
    )


def _condition_number(hc, config, data) -> float:
    """Condition number of the inner Hessian at every weight 1/2, after a long inner solve."""
    inner, _ = hc.make_losses(config, data)
    weight_logits = jnp.zeros(data.x_train.shape[0], data.x_train.dtype)
    params = hc.init_classifier(data.x_train.shape[1])
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def descend(flat):
        def body(flat, _):
            grad = jax.grad(lambda f: inner(unravel(f), weight_logits))(flat)
            return flat - config.inner_learning_rate * grad, None

        return jax.lax.scan(body, flat, None, length=2000)[0]

    flat = descend(flat)
    hessian = jax.hessian(lambda f: inner(unravel(f), weight_logits))(flat)
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
    return float(eigenvalues[-1] / eigenvalues[0])


def benchmark_step_time(
    hc, configs, methods: Sequence[str], settings: harness.Settings
) -> tuple[str, dict[float, tuple[tuple[float, float, float], float]]]:
    """Table 1: time per outer step of every method, and F2SA's ratio to CG's.

    Also returns, per ``mu``, F2SA's ratio to CG (with its interval) and the inner solve's
    share of CG's step (the floor of any method that runs that solve).
    """
    rows, verdicts, speed = [], [], {}
    for config in configs:
        data, _ = hc.load_corrupted_digits(config)
        condition = _condition_number(hc, config, data)
        harness.log(f"bilevel: outer step times at mu={config.l2:g} (condition {condition:.0f})")
        with warnings.catch_warnings():
            # Neumann's 30 terms leave the adjoint system partly solved and warn each step;
            # the accuracy table counts those warnings, this one measures time.
            warnings.simplefilter("ignore")
            variants = [_variant(hc, m, config, data) for m in methods]
            variants.append(_inner_solve_variant(hc, config, data))
            measured = harness.measure(variants, settings)
        cg = measured["implicit_cg"]
        for method in methods:
            m = measured[method]
            ratio = harness.step_time_ratio(m, cg)
            rows.append(
                [
                    f"{config.l2:g} ({condition:.0f})",
                    method,
                    harness.format_time(m),
                    harness.format_interval(ratio),
                    f"{m.compile_time:.2f}",
                    harness.format_bytes(m.memory.peak_bytes if m.memory else None),
                ]
            )
        solve = measured["inner_solve"]
        rows.append(
            [
                f"{config.l2:g} ({condition:.0f})",
                f"(the inner solve alone: {config.inner_steps} steps)",
                harness.format_time(solve),
                harness.format_interval(harness.step_time_ratio(solve, cg)),
                f"{solve.compile_time:.2f}",
                harness.format_bytes(solve.memory.peak_bytes if solve.memory else None),
            ]
        )
        ratio = harness.step_time_ratio(measured["f2sa"], cg)
        # CG's step is one inner solve plus the adjoint solve; F2SA's is two solves of the same
        # length (one loop, the inner gradients at y and z batched) plus its estimate.
        separate = harness.step_time_ratio(solve, cg, 0.5)
        adjoint = (cg.step_time - solve.step_time) / solve.step_time
        batched = measured["f2sa"].step_time / solve.step_time
        speed[config.l2] = (ratio, solve.step_time / cg.step_time)
        verdicts.append(
            f"- mu = {config.l2:g}: F2SA ÷ CG = {harness.format_interval(ratio)}, target ≤ 0.5: "
            f"{harness.verdict(ratio, 0.5, at_most=True)}. In units of one inner solve: CG's "
            f"adjoint solve and update cost {adjoint:.2f}, F2SA's whole step {batched:.2f}; two "
            f"solves one after the other would be {harness.format_interval(separate)} of CG's "
            "step."
        )
    header = [
        "mu (inner condition number)",
        "method",
        "outer step (ms, IQR)",
        "÷ implicit CG [95% CI]",
        "compile (s)",
        "peak memory",
    ]
    intro = (
        f"### Time per outer step\n\nHypercleaning on digits: {configs[0].num_train} training "
        f"examples (one weight each), {configs[0].inner_steps} warm-started inner steps per "
        f"outer step (in each of F2SA's two solves), CG to a relative residual of "
        f"{configs[0].cg_tol:g}, {configs[0].neumann_steps} Neumann terms, truncated through the "
        f"last {configs[0].truncated_steps} steps.\n\n"
    )
    table = harness.markdown_table(header, rows) + "\n" + "\n".join(verdicts) + "\n"
    return intro + table, speed


def benchmark_time_budget(
    hc, configs, methods: Sequence[str], budget: float, seeds: Sequence[int]
) -> tuple[str, dict[float, float]]:
    """Table 2: test accuracy of each method's weights after ``budget`` seconds of outer steps,
    averaged over ``seeds`` (each a different split and corruption of the data).

    Also returns, per ``mu``, F2SA's mean test accuracy minus CG's, in points.
    """
    rows, verdicts, accuracy = [], [], {}
    for config in configs:
        harness.log(f"bilevel: {budget:g} s per method at mu={config.l2:g}, seeds {list(seeds)}")
        results = {m: [] for m in (*methods, "no_weights")}
        for seed in seeds:
            seeded = config._replace(seed=seed)
            data, corrupted = hc.load_corrupted_digits(seeded)
            for m in results:
                results[m].append(
                    hc.run_method(m, seeded, data, corrupted, progress=False, time_budget=budget)
                )
        for method, runs in results.items():
            accuracies = [100 * r.test_accuracy for r in runs]
            rows.append(
                [
                    f"{config.l2:g}",
                    method,
                    "/".join(str(r.outer_steps) for r in runs) if method in methods else "-",
                    f"{np.mean(accuracies):.1f}% ({' / '.join(f'{a:.1f}' for a in accuracies)})",
                    "-" if method not in methods else f"{100 * _mean(runs, 'precision'):.1f}%",
                    f"{100 * _mean(runs, 'recall'):.1f}%",
                    f"{_mean(runs, 'validation_loss'):.4f}",
                    str(sum(r.warnings for r in runs)),
                ]
            )
        gaps = [
            100 * (f.test_accuracy - c.test_accuracy)
            for f, c in zip(results["f2sa"], results["implicit_cg"], strict=True)
        ]
        gap = float(np.mean(gaps))
        accuracy[config.l2] = gap
        verdicts.append(
            f"- mu = {config.l2:g}: F2SA − CG = {gap:+.1f} points of test accuracy on average "
            f"({' / '.join(f'{g:+.1f}' for g in gaps)} by seed), target within 1 point (or "
            f"better): {'met' if gap >= -1.0 else '**missed**'}."
        )
    header = [
        "mu",
        "method",
        "outer steps in budget (by seed)",
        "test accuracy: mean (by seed)",
        "precision",
        "recall",
        "validation loss",
        "warnings",
    ]
    intro = (
        f"### Accuracy after {budget:g} s of outer steps\n\nEach method runs compiled outer steps "
        f"until they have taken {budget:g} s in all (compilation not counted), then its weights "
        f"are scored as in the example: a classifier trained from zero with them "
        f"({configs[0].eval_steps} steps). Seeds {', '.join(map(str, seeds))}: each a different "
        f"split and corruption; one test image is {100 / configs[0].num_test:.2f} points. "
        f"Precision, recall and validation loss are means over the seeds; precision and recall "
        f"of weight below {configs[0].threshold:g} as a detector of the corrupted labels.\n\n"
    )
    table = harness.markdown_table(header, rows) + "\n" + "\n".join(verdicts) + "\n"
    return intro + table, accuracy


def target_summary(
    speed: dict[float, tuple[tuple[float, float, float], float]], accuracy: dict[float, float]
) -> str:
    """The target judged with both halves at the same conditioning: F2SA's outer step at most
    0.5x CG's and its test accuracy at most 1 point below CG's."""
    lines = []
    for mu, (ratio, floor) in speed.items():
        fast, close = ratio[0] <= 0.5, accuracy[mu] >= -1.0
        line = (
            f"- mu = {mu:g}: outer step {harness.format_interval(ratio)} of CG's, test accuracy "
            f"{accuracy[mu]:+.1f} points: {'met' if fast and close else '**missed**'}."
        )
        if not fast and floor > 0.5:
            line += (
                f" Here the inner solve alone is {floor:.2f} of CG's step, and F2SA runs that "
                "solve too, so no F2SA step can be under 0.5 at this conditioning."
            )
        lines.append(line)
    return "### Target: both halves at the same mu\n\n" + "\n".join(lines) + "\n"


def _mean(results, field: str) -> float:
    return float(np.mean([getattr(r, field) for r in results]))


def benchmark_memory(hc, config, methods: Sequence[str], steps: Sequence[int]) -> str:
    """Table 3: XLA's peak bytes of one outer step against the number of inner steps."""
    data, _ = hc.load_corrupted_digits(config)
    harness.log(f"bilevel: memory at inner steps {list(steps)}")
    rows = []
    for method in methods:
        row = [method]
        for k in steps:
            c = config._replace(inner_steps=k, truncated_steps=min(config.truncated_steps, k))
            variant = _variant(hc, method, c, data)
            compiled = jax.jit(variant.step).lower(*variant.carry, *variant.constants).compile()
            stats = harness._memory_stats(compiled)
            row.append(harness.format_bytes(stats.peak_bytes if stats else None))
        rows.append(row)
    header = ["method", *(f"{k} inner steps" for k in steps)]
    intro = (
        "### Memory against inner steps\n\nXLA's peak buffer bytes (arguments, outputs and "
        f"temporaries) of one compiled outer step, mu = {config.l2:g}. Unrolled backpropagation "
        "stores every inner iterate; the others keep a fixed amount.\n\n"
    )
    return intro + harness.markdown_table(header, rows)


def benchmark_applications(names: Sequence[str]) -> str:
    """One block of rows per application: the example module's own ``benchmark_row()``."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    blocks = ["### Applications\n"]
    for name in names:
        harness.log(f"bilevel: application {name}")
        module = importlib.import_module(name)
        rows: Any = module.benchmark_row()
        rows = [rows] if isinstance(rows, dict) else list(rows)
        header = list(rows[0])
        table = harness.markdown_table(header, [[row[h] for h in header] for row in rows])
        blocks.append(f"`examples/{name}.py` (docs: `docs/{name.replace('_', '-')}.md`)\n\n{table}")
    return "\n".join(blocks)
