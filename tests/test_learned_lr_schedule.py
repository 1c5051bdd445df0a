"""examples/learned_lr_schedule.py at a tiny size: hypergradients through the schedule."""

import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import learned_lr_schedule as lrs

# 8 inner steps in 4 segments of 2 steps, truncated windows of 4 steps (2 segments each).
TINY = lrs.ScheduleConfig(
    num_train=60,
    num_validation=40,
    num_test=50,
    hidden=8,
    inner_steps=8,
    segments=4,
    truncation=4,
    initial_learning_rate=0.1,
    outer_steps=40,
    outer_learning_rate=0.3,
    grid_size=3,
    grid_seeds=2,
    eval_seeds=2,
)


# XLA's backend optimizations off: compilation takes half the time (measured 5.8 s -> 2.1 s
# for the unrolled gradient), and these tiny programs run in milliseconds either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
EPS = 1e-5  # central differences in float64: truncation error O(EPS^2), round-off O(1e-16/EPS)


@pytest.fixture(scope="module")
def problem():
    """The data, the held-out keys and each method's jitted value and hypergradient.

    ``value_and_gradient[method](log_rates, keys=keys)`` is compiled once per method (compilation
    dominates this file's time) and reused for every point, key set and test below.
    """
    data, keys = lrs.load_data(TINY), lrs.Keys.from_config(TINY)
    value_and_gradient = {}
    for method in lrs.METHODS:
        objective = jax.value_and_grad(lrs.meta_objective(method, TINY))
        value_and_gradient[method] = jax.jit(
            functools.partial(objective, data=data), compiler_options=FAST_COMPILE
        )
    return data, keys, value_and_gradient


def directional_difference(function, x, direction):
    plus, minus = function(x + EPS * direction)[0], function(x - EPS * direction)[0]
    return (plus - minus) / (2 * EPS)


LOG_RATES = jnp.log(jnp.array([0.1, 0.2, 0.15, 0.05]))


def test_unrolled_hypergradient_matches_finite_differences(problem):
    # The learning rates reach the optimizer as a traced array read by its step count; the
    # unrolled derivative through bilevel.solve is exact. Measured (float64): 0.0899946459756
    # against 0.0899946459576 by central differences (relative error 2e-10).
    _, keys, value_and_gradient = problem
    unrolled = functools.partial(value_and_gradient["unrolled"], keys=keys.outer_step(0, 2))
    direction = jax.random.normal(jax.random.key(3), LOG_RATES.shape, LOG_RATES.dtype)
    analytic = jnp.vdot(unrolled(LOG_RATES)[1], direction)
    numeric = directional_difference(unrolled, LOG_RATES, direction)
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_truncated_windows_are_exact_within_and_blind_before(problem):
    # Truncated(k) on the window that ends at step w k differentiates that window's k steps
    # only. The last window's rates (segments 2 and 3, steps 4 to 7) act only on the final
    # loss, one of the 2 windows' terms: their truncated derivative is exactly the unrolled
    # one divided by 2.
    _, keys, value_and_gradient = problem
    unrolled = value_and_gradient["unrolled"](LOG_RATES, keys=keys.outer_step(0, 2))[1]
    truncated = functools.partial(value_and_gradient["truncated"], keys=keys.outer_step(0, 2))
    gradient = truncated(LOG_RATES)[1]
    np.testing.assert_allclose(gradient[2:], unrolled[2:] / 2, rtol=1e-10)
    # A first-window rate also moves the later windows' starting points, which truncated does
    # not see: the objective's exact derivative along segment 1 differs from the truncated
    # one (measured: -0.192 against -0.135).
    full = directional_difference(truncated, LOG_RATES, jnp.eye(4, dtype=LOG_RATES.dtype)[1])
    assert abs(full - gradient[1]) > 0.1 * abs(full)


def test_a_few_outer_steps_lower_the_held_out_validation_loss(problem):
    # Measured (float64): the constant starting rate 0.1 scores 1.609 on the two held-out
    # initializations; 40 unrolled Adam steps, each on 2 fresh initializations, bring it to
    # 1.312 (0.815 of it).
    _, keys, value_and_gradient = problem
    unrolled = value_and_gradient["unrolled"]
    optimizer = optax.adam(TINY.outer_learning_rate)
    log_rates = jnp.full(TINY.segments, np.log(TINY.initial_learning_rate), LOG_RATES.dtype)
    before = float(unrolled(log_rates, keys=keys.evaluation)[0])
    state = optimizer.init(log_rates)
    for step in range(TINY.outer_steps):
        _, gradient = unrolled(log_rates, keys=keys.outer_step(step, TINY.meta_batch))
        updates, state = optimizer.update(gradient, state, log_rates)
        log_rates = optax.apply_updates(log_rates, updates)
    after = float(unrolled(log_rates, keys=keys.evaluation)[0])
    assert after < 0.85 * before, (before, after)


def test_bad_sizes_are_rejected_with_the_field_named():
    with pytest.raises(ValueError, match="segments must be between 1 and inner_steps=8"):
        lrs.check_config(TINY._replace(segments=9))
    with pytest.raises(ValueError, match="unknown \\['implicit'\\]"):
        lrs.run(TINY, ("implicit",))


def test_the_table_pairs_every_schedule_with_the_best_constant():
    constant = lrs.ScheduleResult(
        rates=np.ones(3),
        validation_losses=np.array([0.49, 0.51]),
        validation_loss=0.5,
        validation_std=0.01,
        test_accuracy=0.9,
        chosen="peak 1 of 3",
    )
    learned = constant._replace(
        validation_losses=np.array([0.47, 0.52]), chosen="learned", step_seconds=0.0123
    )
    table = lrs.markdown_table({"learned (unrolled)": learned, "best constant": constant})
    assert table.splitlines()[2:] == [
        "| learned (unrolled) | learned | 0.5000 ± 0.0100 | -0.0050 (1/2) | 90.0% | 12 | 0 |",
        "| best constant | peak 1 of 3 | 0.5000 ± 0.0100 | - | 90.0% | - | 0 |",
    ]


def test_the_script_runs_from_its_flags_and_writes_the_figure(tmp_path):
    # The absl entry point (flags, main, the printed table, the PNG), at a size that only checks
    # the plumbing: 2 outer steps of an 8-step run.
    command = [
        sys.executable,
        str(Path(lrs.__file__)),
        "--methods=unrolled",
        "--num_train=50",
        "--num_validation=30",
        "--num_test=30",
        "--hidden=4",
        "--inner_steps=8",
        "--segments=2",
        "--truncation=4",
        "--outer_steps=2",
        "--grid_size=2",
        "--grid_seeds=1",
        "--eval_seeds=1",
        f"--output_dir={tmp_path}",
        "--progress=false",
    ]
    # The subprocess inherits the session's XLA_FLAGS (conftest.py: LLVM optimization off).
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ")[0] for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows == [
        "| schedule",
        "| ---",
        "| learned (unrolled)",
        "| best constant",
        "| best cosine",
    ]
    assert (tmp_path / "learned_lr_schedule.png").stat().st_size > 1000
