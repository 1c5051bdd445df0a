"""Meta-gradient estimators over truncated unrolls: truncated backprop, antithetic ES and PES.

References are independent of the estimators' code: ``jax.grad`` of hand-written unrolls, closed
forms, and for the random estimators the mean of many estimates against the exact gradient with
its standard error (z = (mean - exact) / (sd / sqrt(n))). Float64 (the root conftest enables it).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metaopt import learned

ESTIMATORS = {
    "truncated_backprop": lambda problem, length, **kw: learned.TruncatedBackprop(
        problem, length, **kw
    ),
    "antithetic_es": lambda problem, length, **kw: learned.AntitheticES(
        problem, length, std=0.01, **kw
    ),
    "pes": lambda problem, length, **kw: learned.PES(problem, length, std=0.01, **kw),
}


# Gradient descent on f(x) = 0.5 x^T A x with a learned log step size theta:
# x_{t+1} = x_t - exp(theta) A x_t, and the loss of step t is f(x_{t+1}), the loss after it.
EIGENVALUES = jnp.array([0.01, 0.1, 1.0])


def _descent_step(theta, x, key):
    del key
    x = x - jnp.exp(theta) * EIGENVALUES * x
    return x, 0.5 * jnp.sum(EIGENVALUES * x**2)


def _descent_problem(horizon=100):
    return learned.InnerProblem(lambda key: jnp.ones(3), _descent_step, horizon)


@functools.partial(jax.jit, static_argnums=1)
def _full_horizon_objective(theta, horizon=100):
    _, losses = jax.lax.scan(
        lambda x, _: _descent_step(theta, x, None), jnp.ones(3), length=horizon
    )
    return jnp.mean(losses)


def _whole_runs(estimator, theta, num_runs, windows, seed=1):
    """Each run: one task (num_tasks=1) through ``windows`` windows from step 0; returns the
    mean of its window estimates, one per run (runs vmapped)."""
    state = estimator.init(theta, jax.random.key(0), 1, stagger=False)

    def one_run(key):
        def body(state, key):
            grad, state, _ = estimator.gradient(theta, state, key)
            return state, grad

        return jax.lax.scan(body, state, jax.random.split(key, windows))[1].mean()

    keys = jax.random.split(jax.random.key(seed), num_runs)
    return np.asarray(jax.jit(jax.vmap(one_run))(keys))


def test_pes_is_unbiased_over_the_horizon_where_truncated_backprop_and_es_are_not():
    # Horizon 100 in 10 windows of 10; the exact objective is the mean of the 100 losses, i.e.
    # the mean of the 10 window meta-losses, so a run's estimate of its gradient is the mean of
    # its 10 window estimates. The slow eigenvalue 0.01 makes late losses depend on the step
    # sizes of every earlier window, which truncation ignores.
    horizon, length, num_runs = 100, 10, 4000
    theta = jnp.asarray(-1.0)
    problem = _descent_problem(horizon)
    exact = float(jax.grad(_full_horizon_objective)(theta))
    windows = horizon // length

    pes = _whole_runs(learned.PES(problem, length, std=0.01, objective="mean"), theta, num_runs, 10)
    pes_se = pes.std(ddof=1) / np.sqrt(num_runs)
    z_pes = (pes.mean() - exact) / pes_se
    assert abs(z_pes) < 4, (pes.mean(), exact, pes_se)
    assert pes_se < 0.05 * abs(exact)  # the test can see a bias of a few percent

    # Truncated backprop is deterministic here (no noise in the problem): its bias is exact.
    tbptt = learned.TruncatedBackprop(problem, length, objective="mean")
    truncated = _whole_runs(tbptt, theta, 1, windows)[0]
    assert abs(truncated - exact) > 0.2 * abs(exact)
    assert abs(truncated - exact) > 10 * pes_se

    es = _whole_runs(learned.AntitheticES(problem, length, std=0.01, objective="mean"), theta,
                     num_runs, windows)  # fmt: skip
    es_se = es.std(ddof=1) / np.sqrt(num_runs)
    assert abs(es.mean() - exact) > 10 * es_se
    assert abs(es.mean() - exact) > 0.2 * abs(exact)
    # Truncated ES estimates truncated backprop's gradient (of the smoothed window loss).
    assert abs(es.mean() - truncated) < 4 * es_se

    # std = 0.01 in log step size: Gaussian smoothing moves the gradient by about
    # std^2 / 2 * J'''(theta), which must be far below the standard errors compared above.
    third = jax.grad(jax.grad(jax.grad(_full_horizon_objective)))(theta)
    assert abs(0.5 * 0.01**2 * third) < 0.01 * min(pes_se, es_se)


# A stochastic inner problem for the exact checks: gradient descent with momentum on the
# quadratic with noisy gradients; theta holds a log step size and a momentum logit; the state
# carries an int counter (0 at a fresh start); each task draws its own start and noise.
def _momentum_problem(horizon):
    def init(key):
        x = 1.0 + 0.1 * jax.random.normal(key, (3,))
        return {"x": x, "v": jnp.zeros(3), "count": jnp.array(0)}

    def step(theta, state, key):
        grad = EIGENVALUES * state["x"] + 0.01 * jax.random.normal(key, (3,))
        v = jax.nn.sigmoid(theta["momentum"]) * state["v"] + grad
        x = state["x"] - jnp.exp(theta["log_lr"]) * v
        loss = 0.5 * jnp.sum(EIGENVALUES * x**2) + 1e-3
        return {"x": x, "v": v, "count": state["count"] + 1}, loss

    return learned.InnerProblem(init, step, horizon)


THETA = {"log_lr": jnp.asarray(-1.0), "momentum": jnp.asarray(0.5)}


def test_truncated_backprop_is_the_gradient_of_the_window_loss_and_carries_the_state():
    length, num_tasks = 4, 3
    problem = _momentum_problem(horizon=3 * length)
    estimator = learned.TruncatedBackprop(problem, length)
    state0 = estimator.init(THETA, jax.random.key(0), num_tasks, stagger=False)
    gradient = jax.jit(estimator.gradient)
    keys = jax.random.split(jax.random.key(1), 3)

    @jax.jit
    @jax.vmap
    def hand_window(inner, window_key):
        """Per task: the window's mean log loss from ``inner``, written out, and its gradient."""

        def meta_loss(theta):
            state, losses = inner, []
            for t in range(length):
                state, loss = problem.step(theta, state, jax.random.fold_in(window_key, t))
                losses.append(jnp.log(loss))
            return jnp.mean(jnp.stack(losses)), state

        return jax.grad(meta_loss, has_aux=True)(THETA)

    def window_keys(call_key):  # the documented key rule
        return jax.random.split(call_key, (num_tasks, 3))[:, 0]

    grad1, state1, info = gradient(THETA, state0, keys[0])
    grad2, state2, _ = gradient(THETA, state1, keys[1])
    expected1, plain1 = hand_window(state0.inner, window_keys(keys[0]))
    expected2, plain2 = hand_window(plain1, window_keys(keys[1]))
    for got, expected in ((grad1, expected1), (grad2, expected2)):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b.mean(), rtol=1e-12), got, expected
        )
    # After two calls the carried state is 2T plain steps from the start.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), state2.inner, plain2)
    assert state2.inner["count"].tolist() == [2 * length] * num_tasks
    assert state2.step.tolist() == [2 * length] * num_tasks
    assert int(info.num_restarted) == 0 and int(info.num_nonfinite) == 0

    # The third window reaches the horizon: every task restarts fresh at step 0.
    _, state3, info3 = gradient(THETA, state2, keys[2])
    assert int(info3.num_restarted) == num_tasks
    assert state3.step.tolist() == [0] * num_tasks
    assert state3.inner["count"].tolist() == [0] * num_tasks
    assert np.all(state3.inner["v"] == 0)


@pytest.mark.parametrize("name", ["truncated_backprop", "pes"])
def test_staggered_tasks_start_on_window_boundaries_and_restart_at_the_horizon(name):
    length, horizon, num_tasks = 2, 8, 64
    estimator = ESTIMATORS[name](_descent_problem(horizon), length)
    theta = jnp.asarray(-1.0)
    state = estimator.init(theta, jax.random.key(0), num_tasks)
    step = np.asarray(state.step)
    assert set(step.tolist()) == {0, 2, 4, 6}  # tasks start in every window of the horizon
    gradient = jax.jit(estimator.gradient)
    for key in jax.random.split(jax.random.key(1), 4):
        _, state, info = gradient(theta, state, key)
        step = (step + length) % horizon
        assert int(info.num_restarted) == np.sum(step == 0)
        np.testing.assert_array_equal(state.step, step)
        inner = state.inner if name != "pes" else state.positive
        np.testing.assert_array_equal(inner[step == 0], 1.0)  # fresh


def test_antithetic_es_is_unbiased_for_a_quadratic_window_and_cancels_offsets():
    # The window loss is quadratic in theta: Gaussian smoothing adds only a constant, so the
    # mean of the estimates is the window's exact gradient. The state carries the loss's scale
    # and offset, so one compiled estimator serves the three checks.
    curvature = jnp.array([1.0, 3.0, 0.5])
    centre = jnp.array([0.3, -1.0, 2.0])

    def step(theta, state, key):
        quadratic = 0.5 * jnp.sum(curvature * (theta - centre - 0.1 * state["t"]) ** 2)
        loss = state["scale"] * quadratic + state["offset"]
        return {**state, "t": state["t"] + 1.0}, loss

    def window_loss(theta):
        state = {"t": 0.0, "scale": 1.0, "offset": 0.0}
        losses = []
        for _ in range(4):
            state, loss = step(theta, state, None)
            losses.append(loss)
        return jnp.mean(jnp.stack(losses))

    def start(scale, offset):
        return lambda key: {"t": jnp.array(0.0), "scale": scale, "offset": jnp.array(offset)}

    problem = learned.InnerProblem(start(1.0, 0.0), step, horizon=4)
    estimator = learned.AntitheticES(problem, 4, std=0.1, objective="mean")
    theta = jnp.array([1.0, 0.0, -1.0])
    exact = np.asarray(jax.grad(window_loss)(theta))
    num = 4000
    keys = jax.random.split(jax.random.key(1), num)
    estimates_of = jax.jit(jax.vmap(estimator.gradient, in_axes=(None, None, 0)))

    def estimates(scale, offset):
        state = estimator.init(theta, jax.random.key(0), 1, stagger=False)
        state = state._replace(inner={**state.inner, "scale": jnp.array([scale])})
        state = state._replace(inner={**state.inner, "offset": jnp.array([offset])})
        return np.asarray(estimates_of(theta, state, keys)[0])

    plain = estimates(1.0, 0.0)
    z = (plain.mean(0) - exact) / (plain.std(0, ddof=1) / np.sqrt(num))
    assert np.all(np.abs(z) < 4), z

    # An offset common to both members of a pair cancels: the same keys give the same
    # estimates up to the round-off of subtracting two losses near 1000.
    np.testing.assert_allclose(estimates(1.0, 1000.0), plain, rtol=1e-8, atol=1e-10)
    # A loss that does not depend on theta gives exactly zero.
    assert np.all(estimates(0.0, 7.0) == 0.0)


def _diverging_problem():
    """Each task draws a flag (probability 0.4) from its key. A flagged task fails as its
    state's ``mode`` says: 0, its loss is NaN; 1, a state leaf the loss does not read becomes
    infinite; 2 (the reference), its loss is the constant 1.0: finite and independent of theta,
    so its estimate is exactly zero."""

    def init(key):
        bad = jax.random.bernoulli(key, 0.4)
        return {"x": jnp.ones(2), "y": jnp.array(0.0), "bad": bad, "mode": jnp.array(0)}

    def step(theta, state, key):
        x = state["x"] - jnp.exp(theta) * state["x"]
        loss = 0.5 * jnp.sum(x**2) + 0.01
        bad, mode = state["bad"], state["mode"]
        loss = jnp.where(bad & (mode == 0), jnp.nan, loss)
        loss = jnp.where(bad & (mode == 2), 1.0, loss)
        y = jnp.where(bad & (mode == 1), jnp.inf, state["y"])
        return {**state, "x": x, "y": y}, loss

    return learned.InnerProblem(init, step, horizon=6)


def _with_inner(state, name, value):
    """``state`` with the inner-state leaf ``name`` set to ``value`` in every task."""

    def put(inner):
        return {**inner, name: jnp.broadcast_to(value, inner[name].shape)}

    if isinstance(state, learned.PESState):
        return state._replace(positive=put(state.positive), negative=put(state.negative))
    return state._replace(inner=put(state.inner))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_non_finite_tasks_are_counted_excluded_and_restarted(name):
    num_tasks, theta = 16, jnp.asarray(-1.0)
    estimator = ESTIMATORS[name](_diverging_problem(), 2)
    state = estimator.init(theta, jax.random.key(0), num_tasks, stagger=False)
    bad = np.asarray(state.inner["bad"] if name != "pes" else state.positive["bad"])
    assert 0 < bad.sum() < num_tasks
    key = jax.random.key(1)
    gradient = jax.jit(estimator.gradient)

    # With the flagged tasks' loss constant their estimates are exactly zero, so that mean over
    # all tasks times num_tasks / num_finite is the mean over the finite tasks only.
    reference, _, _ = gradient(theta, _with_inner(state, "mode", 2), key)
    for mode in (0, 1):  # a NaN loss, an infinite state
        grad, after, info = gradient(theta, _with_inner(state, "mode", mode), key)
        assert np.isfinite(grad)
        np.testing.assert_allclose(grad, reference * num_tasks / (~bad).sum(), rtol=1e-12)
        assert int(info.num_nonfinite) == bad.sum() and int(info.num_restarted) == bad.sum()
        assert np.isfinite(info.meta_loss)
        np.testing.assert_array_equal(after.step, np.where(bad, 0, 2))
        inner = after.inner if name != "pes" else after.positive
        np.testing.assert_array_equal(inner["x"][bad], 1.0)  # fresh
        np.testing.assert_array_equal(inner["y"], 0.0)
        if name == "pes":
            assert np.all(after.perturbation_sum[bad] == 0)
            assert np.all(after.perturbation_sum[~bad] != 0)
            jax.tree.map(lambda p, n: np.testing.assert_array_equal(p[bad], n[bad]),
                         after.positive, after.negative)  # fmt: skip

    # No finite task at all: a zero gradient and a NaN meta-loss, nothing else is NaN.
    grad, after, info = gradient(theta, _with_inner(state, "bad", True), key)
    assert float(grad) == 0.0 and np.isnan(info.meta_loss)
    assert int(info.num_nonfinite) == num_tasks == int(info.num_restarted)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after) if x.dtype.kind == "f")


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_sharded_over_8_devices_equals_unsharded_and_vmap_equals_a_loop(name):
    # The conftest simulates 8 CPU devices; the state's task axis is split over them.
    estimator = ESTIMATORS[name](_momentum_problem(horizon=8), 2)
    num_tasks = 16
    state = estimator.init(THETA, jax.random.key(0), num_tasks)
    key = jax.random.key(1)
    gradient = jax.jit(estimator.gradient)
    grad, expected_state, info = gradient(THETA, state, key)

    mesh = Mesh(np.array(jax.devices()[:8]), ("tasks",))
    sharded = jax.device_put(state, NamedSharding(mesh, PartitionSpec("tasks")))
    got, got_state, got_info = gradient(THETA, sharded, key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), got, grad)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), got_state, expected_state
    )
    np.testing.assert_allclose(got_info.meta_loss, info.meta_loss, rtol=1e-12)
    for leaf in jax.tree.leaves(got_state):  # the carried state stays split over the tasks
        assert leaf.sharding.spec[0] == "tasks", leaf.sharding

    if name != "pes":
        return  # the vmap check once is enough: its code is the estimators' shared vmap
    # vmap over groups of tasks (for example over meta-parameter candidates) = group by group.
    states = jax.tree.map(lambda *x: jnp.stack(x), state, state)
    keys = jax.random.split(jax.random.key(2), 2)
    grads, _, _ = jax.jit(jax.vmap(estimator.gradient, in_axes=(None, 0, 0)))(THETA, states, keys)
    for g in range(2):
        one, _, _ = gradient(THETA, state, keys[g])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[g], b, rtol=1e-12), grads, one)


def test_construction_errors_name_the_argument():
    problem = _descent_problem(horizon=100)
    cases = [
        (lambda: learned.TruncatedBackprop(problem, 0), ValueError, "truncation_length=0"),
        (lambda: learned.PES(problem, -1, std=0.1), ValueError, "truncation_length=-1"),
        (lambda: learned.PES(problem, 2.0, std=0.1), ValueError, "truncation_length=2.0"),
        (lambda: learned.AntitheticES(problem, 10, std=0.0), ValueError, "std=0.0"),
        (lambda: learned.PES(problem, 10, std=-0.5), ValueError, "std=-0.5"),
        (lambda: learned.PES(problem, 10, std=float("nan")), ValueError, "std=nan"),
        (lambda: learned.TruncatedBackprop(problem, 30), ValueError, "one of [1, 2, 4, 5, 10"),
        (lambda: learned.TruncatedBackprop(problem, 10, "sum"), ValueError, "objective='sum'"),
        (lambda: learned.TruncatedBackprop("problem", 10), TypeError, "problem='problem'"),
        (lambda: learned.InnerProblem(None, _descent_step, 10), TypeError, "init=None"),
        (lambda: learned.InnerProblem(jnp.ones, "step", 10), TypeError, "step='step'"),
        (lambda: learned.InnerProblem(jnp.ones, _descent_step, 0), ValueError, "horizon=0"),
        (
            lambda: learned.TruncatedBackprop(problem, 10).init(0.0, jax.random.key(0), 0),
            ValueError,
            "num_tasks=0",
        ),
        (lambda: learned.meta_train_step(problem, optax.adam(1e-3)), TypeError, "estimator="),
        (
            lambda: learned.meta_train_step(learned.TruncatedBackprop(problem, 10), None),
            TypeError,
            "clip_by_global_norm",
        ),
    ]
    for make, error, message in cases:
        with pytest.raises(error) as raised:
            make()
        assert message in str(raised.value), (message, str(raised.value))


@pytest.mark.parametrize("name", ["truncated_backprop", "pes"])
def test_meta_train_step_with_clipping_and_adam_lowers_the_meta_objective(name):
    # Learn the log step size of gradient descent on the quadratic; the full-horizon mean loss
    # (the exact objective) must fall well below its value at the start.
    problem = _descent_problem(horizon=20)
    estimator = ESTIMATORS[name](problem, 5, objective="log")
    meta_optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))
    train = jax.jit(learned.meta_train_step(estimator, meta_optimizer))
    theta = jnp.asarray(-4.0)
    before = float(_full_horizon_objective(theta, 20))
    opt_state = meta_optimizer.init(theta)
    state = estimator.init(theta, jax.random.key(0), 8)
    for key in jax.random.split(jax.random.key(1), 60):
        theta, opt_state, state, info = train(theta, opt_state, state, key)
        assert int(info.num_nonfinite) == 0
    after = float(_full_horizon_objective(theta, 20))
    assert after < 0.5 * before, (before, after, float(theta))
