"""examples/three_level.py: the level-3 gradient through two nested solves is right.

Float64 (the test session enables x64). Each finite-difference evaluation re-solves level 2
(gradient descent to 1e-10) and, for iMAML, level 1 (to 1e-11).
"""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import three_level

SMALL = three_level.ThreeLevelConfig(train_tasks=6, validation_tasks=8, test_tasks=4)


def closed_form_objective(config, data, h):
    """Level 3 of the MAML variant in closed form, in NumPy: no solver, no JAX derivative.

    ``adapt_steps`` steps of gradient descent on a quadratic are affine in the start,
    ``phi = M theta + c``, so level 2 is a linear least-squares problem in theta.
    """
    alpha = 1.0 / (1.0 + np.exp(-h)) / float(data.curvature)

    def affine(task):
        x, y = (np.asarray(a, np.float64) for a in task.support)
        a, b = x.T @ x / len(y), x.T @ y / len(y)
        m, c = np.eye(config.dim), np.zeros(config.dim)
        for _ in range(config.adapt_steps):
            m, c = m - alpha * a @ m, c - alpha * (a @ c - b)
        return m, c

    def tasks_of(batch):
        for i in range(batch.support[0].shape[0]):
            yield jax.tree.map(lambda x, i=i: np.asarray(x[i]), batch)

    # Level 2: the normal equations of sum_i |X_i (M_i theta + c_i) - y_i|^2 / (2 n T).
    lhs, rhs = 0.0, 0.0
    for task in tasks_of(data.train):
        m, c = affine(task)
        x, y = task.query
        lhs = lhs + m.T @ x.T @ x @ m
        rhs = rhs + m.T @ x.T @ (y - x @ c)
    theta = np.linalg.solve(lhs, rhs)
    losses = []
    for task in tasks_of(data.validation):
        m, c = affine(task)
        x, y = task.query
        losses.append(0.5 * np.mean((x @ (m @ theta + c) - y) ** 2))
    return float(np.mean(losses))


def test_maml_level3_gradient_matches_finite_differences_and_the_closed_form():
    # Level 1 unrolled (20 steps), level 2 implicit (Dense). Measured 2026-11-29 at the default
    # start (alpha = 0.01, h = -2.889): gradient -0.2158684271, central FD (step 1e-4) relative
    # error 2.1e-9; the NumPy closed form's objective equal to 3.4e-11 and its central
    # difference (step 1e-5) to a relative 2.0e-11. Level 2 treated first order
    # (d theta*/dh = 0) gives -0.1923, 0.11 off: a dropped level, a sign or a factor of 2 fails.
    data = three_level.make_tasks(SMALL)
    h = three_level.h_of(SMALL, 0.01, float(data.curvature))
    check = three_level.gradient_check(SMALL, data, h, jnp.zeros(SMALL.dim))
    assert check.relative_error < 1e-6, check
    assert check.first_order_relative_error > 0.05, check
    assert abs(check.value - closed_form_objective(SMALL, data, h)) < 1e-9, check
    step = 1e-5
    exact = (
        closed_form_objective(SMALL, data, h + step) - closed_form_objective(SMALL, data, h - step)
    ) / (2 * step)
    assert abs(check.gradient - exact) < 1e-6 * abs(exact), (check, exact)


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="level1 must be one of"):
        three_level.make_tasks(SMALL._replace(level1="reptile"))
    with pytest.raises(ValueError, match="start must be in"):
        three_level.h_of(SMALL, 1.0, 5.0)


def test_the_script_nests_two_implicit_solves_and_prints_a_matching_gradient():
    # The absl entry point, in float64, with iMAML at level 1: custom_root inside custom_root
    # (level 2's Hessian-vector products differentiate level 1's implicit rule). One level-3
    # step at a tiny size. Measured 2026-11-29 at lambda = 5: gradient 0.192829, FD relative
    # error 1.4e-9; level 2 treated first order gives 0.171655, 0.11 off.
    command = [
        sys.executable,
        str(Path(three_level.__file__)),
        "--level1=imaml",
        "--x64",
        "--train_tasks=6",
        "--validation_tasks=8",
        "--test_tasks=4",
        "--outer_steps=1",
        "--progress=false",
    ]
    # The subprocess inherits the session's XLA_FLAGS (conftest.py: LLVM optimization off).
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "| after 1 level-3 steps |" in out and "float64" in out, out

    def relative_error(row):
        found = re.search(re.escape(row) + r" \| \S+ \| (\S+) \|", out)
        assert found, out
        return float(found.group(1))

    assert relative_error("| through both solves (level 2 implicit)") < 1e-6, out
    assert relative_error("| level 2 first order (d theta*/dh = 0)") > 0.05, out
