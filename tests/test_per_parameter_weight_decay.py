"""examples/per_parameter_weight_decay.py at a tiny size: a decay per weight, by hypergradient."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import bilevel, implicit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import per_parameter_weight_decay as ppwd

# A smooth activation, so that the inner loss is twice differentiable everywhere and a solve can
# be driven to a gradient norm of 1e-12 (with ReLU, gradient descent stalled near 3e-2: kinks).
SMOOTH = ppwd.DecayConfig(hidden=(8,), activation="tanh", num_train=50, num_validation=50)


def _inner_product(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def at_a_solution():
    """Losses, random log-decays, a random direction and a well-converged inner solution."""
    data = ppwd.load_data(SMOOTH)
    inner, outer = ppwd.make_losses(SMOOTH, data)
    init = ppwd.init_params(SMOOTH)
    leaves, treedef = jax.tree.flatten(init)
    keys = jax.random.split(jax.random.key(1), 2 * len(leaves))
    normal = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves + leaves, strict=True)]
    # Decays spread around 0.1 (a factor e^0.5 either way): a strongly convex neighbourhood.
    log_decay = jax.tree.unflatten(treedef, [np.log(0.1) + 0.5 * z for z in normal[: len(leaves)]])
    direction = jax.tree.unflatten(treedef, normal[len(leaves) :])

    @jax.jit
    def converged(start, log_decay):
        solution, info = bilevel.solve(
            inner,
            start,
            log_decay,
            optimizer=optax.sgd(0.1, momentum=0.9),
            steps=4000,
            tol=1e-12,
            diff=bilevel.FirstOrder(),
        )
        return solution, info

    solution, info = converged(init, log_decay)
    assert float(info.gradient_norm) <= 1e-12, info
    return inner, outer, log_decay, direction, solution, converged


def test_hypergradients_at_a_solution(at_a_solution):
    # Implicit CG against finite differences of the validation loss (through fully converged
    # solves), and the truncated Neumann series against unrolling, along a random direction.
    inner, outer, log_decay, direction, solution, converged = at_a_solution
    learning_rate, steps = 0.2, 10

    def derivative(diff):
        def validation_loss(log_decay):
            # Warm-started at the solution, which the steps leave where it is (rtol=None: a
            # fixed budget; the gradient there is already 1e-12).
            params, _ = bilevel.solve(
                inner,
                solution,
                log_decay,
                optimizer=optax.sgd(learning_rate),
                steps=steps,
                diff=diff,
            )
            return outer(params)

        return float(_inner_product(jax.jit(jax.grad(validation_loss))(log_decay), direction))

    exact = derivative(bilevel.Implicit(implicit.CG(tol=1e-10), rtol=None))
    eps = 1e-3

    def moved(step):
        shifted = jax.tree.map(lambda t, d: t + step * eps * d, log_decay, direction)
        params, info = converged(solution, shifted)
        assert float(info.gradient_norm) <= 1e-12, info
        return float(outer(params))

    # The five-point stencil, exact to O(eps^4): two-point central differences were off by
    # 1.2e-5 (relative) at eps = 1e-3, by their O(eps^2) term, and at eps = 1e-4 the solves'
    # error (gradient norm 1e-12) divided by eps was as large.
    finite_difference = (8 * (moved(1) - moved(-1)) - (moved(2) - moved(-2))) / (12 * eps)
    # Measured (float64): -0.069512905 against -0.069512904, relative difference 2.8e-8.
    assert exact == pytest.approx(finite_difference, rel=1e-6)
    assert abs(exact) > 1e-3  # a direction along which the loss does change

    # Unrolling K steps of gradient descent (step a) from a warm start sitting at the solution
    # gives -a * sum_{k<K} (I - aH)^k d_theta grad g: exactly the truncated Neumann series of
    # K - 1 further terms with scale a (Lorraine et al. 2020), however far from H^{-1}.
    # tol=1.0: ten terms are far from an inverse, and that is the point.
    neumann = implicit.Neumann(steps=steps - 1, scale=learning_rate, tol=1.0)
    series = derivative(bilevel.Implicit(neumann, rtol=None))
    unrolled = derivative(bilevel.Unrolled())
    # Measured (float64): series -0.0182033 and unrolled agree to 2e-13 (relative); both are
    # 74% short of the exact derivative: ten terms are a damped inverse (Neumann's bias), which
    # the example's adjoint residual column reports.
    assert series == pytest.approx(unrolled, rel=1e-9)
    assert abs(series - exact) > 0.5 * abs(exact)


def test_tuned_decays_beat_no_decay_and_the_best_global_decay():
    config = ppwd.DecayConfig(
        hidden=(32,),
        num_train=50,
        num_validation=100,
        num_test=200,
        outer_steps=40,
        decay_grid=(1e-3, 1e-2, 1e-1),
        timing_repeats=0,  # no timing (test_cost_ratio_is_timed_in_pairs checks that code)
    )
    results, _ = ppwd.compare(config, ("neumann", "no_decay", "global_decay"), progress=False)
    # Measured (float64, 64-32-10, 2090 decays, 40 outer steps of 20 inner steps): validation
    # loss neumann 0.576, no_decay 1.029, global_decay 0.880 (decay 0.01 of 0.001, 0.01, 0.1).
    # (cg reached 0.710, with negative curvature at all 40 steps.)
    no_decay = results["no_decay"].validation_loss
    best_global = results["global_decay"].validation_loss
    assert best_global <= no_decay
    assert results["neumann"].validation_loss < best_global - 0.1
    assert results["neumann"].decays.shape == (ppwd.num_parameters(config),)
    # Twenty Neumann terms are far from an inverse: every adjoint solve warned.
    assert results["neumann"].not_converged == config.outer_steps
    table = ppwd.markdown_table(results)
    assert table.count("\n") == 4 and "| no_decay |" in table


def test_cost_ratio_is_timed_in_pairs():
    x = jnp.ones((64, 64))
    slow, fast = jax.jit(lambda x: x @ x @ x @ x), jax.jit(lambda x: x + 1.0)
    seconds, ratio = ppwd.paired_cost_ratio(slow, (x,), fast, (x,), repeats=3)
    assert seconds > 0 and ratio > 1.0


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown \\['adam'\\]"):
        ppwd.compare(SMOOTH, ("adam",))


def test_the_script_runs_from_its_flags_and_reports_negative_curvature():
    # The absl entry point (flags, main, the printed table) on 3 outer steps (of 5 inner steps)
    # of a 64-16-10 MLP with ReLU: CG, undamped, meets negative curvature in every adjoint
    # solve, and the table counts it.
    command = [
        sys.executable,
        str(Path(ppwd.__file__)),
        "--methods=cg,no_decay",
        "--hidden=16",
        "--num_train=30",
        "--num_validation=30",
        "--num_test=30",
        "--outer_steps=3",
        "--inner_steps=5",
        "--cg_maxiter=5",
        "--timing_repeats=0",
        "--progress=false",
    ]
    # The subprocess inherits the session's XLA_FLAGS (conftest.py: LLVM optimization off).
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row[0] for row in rows] == ["| method", "| ---", "| cg", "| no_decay"]
    assert "64-16-10, 1,210 decays" in result.stdout
    negative_curvature = rows[0].index("negative curvature")
    assert rows[2][negative_curvature] == "3", rows
