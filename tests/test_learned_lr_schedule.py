"""examples/learned_lr_schedule.py at a tiny size: hypergradients through the schedule."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import learned_lr_schedule as lrs

# 12 inner steps in 6 segments of 2 steps, truncated windows of 4 steps (2 segments each).
TINY = lrs.ScheduleConfig(
    num_train=60,
    num_validation=40,
    num_test=50,
    hidden=8,
    inner_steps=12,
    segments=6,
    truncation=4,
    initial_learning_rate=0.1,
    outer_steps=40,
    outer_learning_rate=0.3,
    grid_size=3,
    grid_seeds=2,
    eval_seeds=2,
)


@pytest.fixture(scope="module")
def derivatives():
    """Both methods' hypergradients and the finite differences they are checked against.

    One compiled program (compilation dominates this file's time): the unrolled and truncated
    gradients at ``log_rates``, the unrolled objective at ``log_rates +- eps * direction`` and
    the truncated objective at ``log_rates +- eps * e_1``.
    """
    data = lrs.load_data(TINY)
    keys = lrs.Keys.from_config(TINY).outer_step(0, TINY.meta_batch)
    log_rates = jnp.log(jnp.array([0.05, 0.1, 0.2, 0.15, 0.1, 0.05]))
    direction = jax.random.normal(jax.random.key(3), log_rates.shape, log_rates.dtype)
    segment_one = jnp.zeros_like(log_rates).at[1].set(1.0)
    unrolled = lrs.meta_objective("unrolled", TINY)
    truncated = lrs.meta_objective("truncated", TINY)

    @jax.jit
    def compute(log_rates):
        def shifted(objective, d):
            points = jnp.stack([log_rates + EPS * d, log_rates - EPS * d])
            return jax.vmap(lambda s: objective(s, keys, data))(points)

        return {
            "unrolled": jax.grad(unrolled)(log_rates, keys, data),
            "truncated": jax.grad(truncated)(log_rates, keys, data),
            "unrolled_shifted": shifted(unrolled, direction),
            "truncated_shifted": shifted(truncated, segment_one),
        }

    return {**compute(log_rates), "direction": direction}


EPS = 1e-5


def central_difference(pair):
    return (pair[0] - pair[1]) / (2 * EPS)


def test_unrolled_hypergradient_matches_finite_differences(derivatives):
    # The learning rates reach the optimizer as a traced array read by its step count; the
    # unrolled derivative through bilevel.solve is exact. Measured (float64): 0.0127639040719
    # against 0.0127639040670 by central differences (relative error 4e-10).
    analytic = jnp.vdot(derivatives["unrolled"], derivatives["direction"])
    numeric = central_difference(derivatives["unrolled_shifted"])
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_truncated_windows_are_exact_within_and_blind_before(derivatives):
    # Truncated(k) on the window that ends at step w k differentiates that window's k steps
    # only. The last window's rates (segments 4 and 5, steps 8 to 11) act only on the final
    # loss, one of the 3 windows' terms: their truncated derivative is exactly the unrolled
    # one divided by 3.
    unrolled, truncated = derivatives["unrolled"], derivatives["truncated"]
    np.testing.assert_allclose(truncated[4:], unrolled[4:] / 3, rtol=1e-10)
    # A first-window rate also moves the later windows' starting points, which truncated does
    # not see: the objective's exact derivative along segment 1 differs from the truncated
    # one (measured: -0.152 against -0.098).
    full = central_difference(derivatives["truncated_shifted"])
    assert abs(full - truncated[1]) > 0.1 * abs(full)


def test_a_few_outer_steps_lower_the_held_out_validation_loss():
    # Measured (float64): the constant starting rate 0.1 scores 1.474 on the two held-out
    # initializations; 40 unrolled outer steps (each on 2 fresh initializations, so the
    # meta-training curve is noisy: 1.36 at the first, 0.87 to 1.29 from the 10th on) bring it
    # to 1.172.
    data, keys = lrs.load_data(TINY), lrs.Keys.from_config(TINY)
    rates, timing = lrs.learn_schedule("unrolled", TINY, data, keys, progress=False)
    evaluate = lrs.make_evaluate(TINY)
    start = jnp.full(TINY.inner_steps, TINY.initial_learning_rate)
    before, after = (float(jnp.mean(evaluate(r, keys.evaluation, data)[0])) for r in (start, rates))
    assert after < 0.85 * before
    assert timing["skipped"] == 0 and timing["step_seconds"] > 0
    losses = timing["meta_losses"]
    assert len(losses) == TINY.outer_steps and losses[-3:].mean() < losses[:3].mean()


def test_bad_sizes_are_rejected_with_the_field_named():
    with pytest.raises(ValueError, match="segments must be between 1 and inner_steps=12"):
        lrs.check_config(TINY._replace(segments=13))
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
