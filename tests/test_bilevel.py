"""bilevel.solve: hypergradients of every diff mode against closed forms and finite differences."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from metaopt import bilevel
from metaopt.implicit import CG, MINRES, ImplicitDifferentiationWarning
from tests.regression_data import regression_data

X, Y, X_VAL, Y_VAL = regression_data(d=5)
STEP = 1.0 / (float(jnp.linalg.norm(X, 2)) ** 2 + 5.0)


def inner_ridge(w, penalty):
    return 0.5 * jnp.sum(jnp.square(X @ w - Y)) + 0.5 * jnp.sum(penalty * w**2)


def outer_of(w):
    return 0.5 * jnp.mean(jnp.square(X_VAL @ w - Y_VAL))


def exact_outer(penalty):
    a = X.T @ X + jnp.diag(jnp.broadcast_to(penalty, (5,)))
    return outer_of(jnp.linalg.solve(a, X.T @ Y))


def _outer(diff, steps=3000, tol=1e-10, optimizer=None):
    def outer(penalty, init=None):
        init = jnp.zeros(5) if init is None else init
        w, _ = bilevel.solve(
            inner_ridge,
            init,
            penalty,
            optimizer=optimizer or optax.sgd(STEP),
            steps=steps,
            tol=tol,
            diff=diff,
        )
        return outer_of(w)

    return outer


@pytest.mark.parametrize("per_feature", [False, True])
@pytest.mark.parametrize(
    "diff", [bilevel.Implicit(), bilevel.Unrolled(), bilevel.Unrolled(checkpoint=True)]
)
def test_ridge_hypergradient_matches_closed_form(diff, per_feature):
    penalty = jnp.linspace(0.5, 2.0, 5) if per_feature else jnp.asarray(1.2)
    got = jax.jit(jax.grad(_outer(diff)))(penalty)
    np.testing.assert_allclose(got, jax.grad(exact_outer)(penalty), rtol=1e-6)


def test_implicit_unrolled_and_finite_differences_agree_and_unrolled_converges():
    penalty = jnp.asarray(0.8)
    h = 1e-5
    finite = (exact_outer(penalty + h) - exact_outer(penalty - h)) / (2 * h)
    implicit = jax.grad(_outer(bilevel.Implicit()))(penalty)
    np.testing.assert_allclose(implicit, finite, rtol=1e-6)
    errors = [
        float(abs(jax.grad(_outer(bilevel.Unrolled(), steps=k, tol=None))(penalty) - implicit))
        for k in (10, 30, 100, 300, 1000)
    ]
    # Each longer unroll is closer, until the gap reaches round-off.
    assert all(b < a or b < 1e-11 for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-6 * abs(float(implicit)) < errors[0]


def test_checkpointed_unrolling_gives_the_same_gradient_in_less_memory():
    penalty = jnp.asarray(0.8)
    plain = jax.grad(_outer(bilevel.Unrolled(), steps=900, tol=None))
    checkpointed = jax.grad(_outer(bilevel.Unrolled(checkpoint=True), steps=900, tol=None))
    np.testing.assert_allclose(checkpointed(penalty), plain(penalty), rtol=1e-12)

    def temp_bytes(f):
        return jax.jit(f).lower(penalty).compile().memory_analysis().temp_size_in_bytes

    # 900 stored steps against about 2 * sqrt(900) = 60.
    assert temp_bytes(checkpointed) < temp_bytes(plain) / 5


def test_truncated_and_first_order():
    penalty = jnp.asarray(0.8)
    full = jax.grad(_outer(bilevel.Unrolled(), steps=50, tol=None), argnums=(0, 1))
    truncated_all = jax.grad(_outer(bilevel.Truncated(50), steps=50, tol=None), argnums=(0, 1))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
        truncated_all(penalty, jnp.ones(5)),
        full(penalty, jnp.ones(5)),
    )
    g_penalty, g_init = jax.grad(_outer(bilevel.Truncated(5), steps=50, tol=None), argnums=(0, 1))(
        penalty, jnp.ones(5)
    )
    np.testing.assert_array_equal(g_init, np.zeros(5))
    assert 0 < abs(float(g_penalty)) < abs(float(full(penalty, jnp.ones(5))[0]))

    # FirstOrder: identity with respect to init, nothing through the hyperparameters.
    first_order = _outer(bilevel.FirstOrder())
    g_penalty, g_init = jax.grad(first_order, argnums=(0, 1))(penalty, jnp.ones(5))
    w_star, _ = bilevel.solve(
        inner_ridge, jnp.ones(5), penalty, optimizer=optax.sgd(STEP), steps=3000, tol=1e-10
    )
    np.testing.assert_allclose(g_init, jax.grad(outer_of)(w_star), rtol=1e-8)
    assert float(g_penalty) == 0.0


def test_diagnostics_report_steps_norm_and_convergence():
    _, info = bilevel.solve(
        inner_ridge, jnp.zeros(5), 1.0, optimizer=optax.sgd(STEP), steps=5000, tol=1e-8
    )
    assert bool(info.converged) and float(info.gradient_norm) <= 1e-8
    assert 0 < int(info.steps) < 5000  # stopped early
    _, info = bilevel.solve(
        inner_ridge, jnp.zeros(5), 1.0, optimizer=optax.sgd(STEP), steps=3, tol=1e-8
    )
    assert not bool(info.converged) and int(info.steps) == 3


def test_inner_solve_stopped_early_warns_and_policies_act():
    def outer(on_failure):
        return _outer(bilevel.Implicit(on_failure=on_failure), steps=5, tol=1e-8)

    with pytest.warns(metaopt.bilevel.InnerSolveWarning, match="did not reach its tolerance"):
        jax.block_until_ready(jax.grad(outer("warn"))(1.0))
    assert np.isnan(float(jax.grad(outer("nan"))(1.0)))
    with pytest.raises(Exception, match="did not reach its tolerance"):
        jax.block_until_ready(jax.grad(outer("raise"))(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(float(jax.grad(outer("ignore"))(1.0)))
        # A converged solve is silent under the default policy.
        assert np.isfinite(float(jax.grad(_outer(bilevel.Implicit()))(1.0)))


def test_fallback_policy_redoes_an_unconverged_solve_with_the_fallback_mode():
    fallback = bilevel.Implicit(on_failure=bilevel.Unrolled(checkpoint=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # falling back is the requested behaviour: silent
        short = jax.jit(jax.grad(_outer(fallback, steps=5, tol=1e-8)))(1.0)
        converged = jax.jit(jax.grad(_outer(fallback)))(1.0)
    unrolled_short = jax.grad(_outer(bilevel.Unrolled(), steps=5, tol=1e-8))(1.0)
    np.testing.assert_allclose(short, unrolled_short, rtol=1e-12)
    np.testing.assert_allclose(converged, jax.grad(_outer(bilevel.Implicit()))(1.0), rtol=1e-12)
    np.testing.assert_allclose(converged, jax.grad(exact_outer)(1.0), rtol=1e-6)


@pytest.mark.parametrize("diff", [bilevel.Implicit(), bilevel.Unrolled()])
def test_leaves_that_do_not_depend_on_the_hyperparameters(diff):
    # Only "w" is penalized: the optimality condition's "b" leaf has a zero tangent, which
    # reverse mode through the implicit linear solve must handle.
    def inner(p, penalty):
        w_part = 0.5 * jnp.sum((p["w"] - 1.0) ** 2) + 0.5 * penalty * jnp.sum(p["w"] ** 2)
        return w_part + 0.5 * (p["b"] - 2.0) ** 2

    def outer(penalty):
        init = {"w": jnp.zeros(2), "b": jnp.zeros(())}
        p, _ = bilevel.solve(
            inner, init, penalty, optimizer=optax.sgd(0.1), steps=2000, tol=1e-10, diff=diff
        )
        return jnp.sum(p["w"]) + p["b"]

    # w* = 1 / (1 + penalty) per coordinate, b* = 2.
    np.testing.assert_allclose(jax.grad(outer)(0.5), -2 / 1.5**2, rtol=1e-8)
    np.testing.assert_allclose(jax.jvp(outer, (0.5,), (1.0,))[1], -2 / 1.5**2, rtol=1e-8)


def test_capped_adjoint_solve_is_reported():
    diff = bilevel.Implicit(CG(maxiter=1))
    with pytest.warns(ImplicitDifferentiationWarning, match="converged=False"):
        jax.block_until_ready(jax.grad(_outer(diff))(jnp.linspace(0.5, 2.0, 5)))


def test_indefinite_inner_hessian_of_a_nonconvex_mlp_is_flagged():
    rng = np.random.default_rng(1)
    inputs = jnp.asarray(rng.normal(size=(16, 2)))
    targets = jnp.asarray(np.sin(rng.normal(size=16)))

    def inner(params, scale):
        hidden = jnp.tanh(inputs @ params["w1"])
        prediction = hidden @ params["w2"]
        return 0.5 * jnp.mean((prediction - scale * targets) ** 2)

    init = {"w1": jnp.asarray(rng.normal(size=(2, 8))), "w2": jnp.zeros(8)}

    def outer(scale, solver):
        params, _ = bilevel.solve(
            inner,
            init,
            scale,
            optimizer=optax.sgd(0.1),
            steps=3,
            # The adjoint solve is under test: three steps are a fixed budget, not checked.
            diff=bilevel.Implicit(solver, rtol=None),
        )
        return jnp.sum(params["w2"])

    # Three steps from a random start: the inner Hessian has negative eigenvalues there.
    hessian = jax.hessian(lambda flat: inner(unravel(flat), 1.0))
    flat, unravel = jax.flatten_util.ravel_pytree(init)
    assert float(jnp.min(jnp.linalg.eigvalsh(hessian(flat)))) < 0
    with pytest.warns(ImplicitDifferentiationWarning, match="negative_curvature=True"):
        jax.block_until_ready(jax.grad(outer)(1.0, CG()))
    # MINRES handles the symmetric indefinite system.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(float(jax.grad(outer)(1.0, MINRES(tol=1e-8))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_vmap_over_tasks_equals_a_loop(dtype):
    tasks = [regression_data(d=5, seed=s) for s in range(3)]
    xs = jnp.stack([t[0] for t in tasks]).astype(dtype)
    ys = jnp.stack([t[1] for t in tasks]).astype(dtype)
    tol = 1e-4 if dtype == jnp.float32 else 1e-10

    def task_loss(penalty, x, y):
        def inner(w, penalty):
            return 0.5 * jnp.sum((x @ w - y) ** 2) + 0.5 * penalty * jnp.sum(w**2)

        w, _ = bilevel.solve(
            inner,
            jnp.zeros(5, dtype),
            penalty,
            optimizer=optax.sgd(STEP),
            steps=4000,
            tol=tol,
            diff=bilevel.Implicit(CG(tol=1e-5 if dtype == jnp.float32 else 1e-10)),
        )
        return jnp.sum(w)

    penalty = jnp.asarray(0.7, dtype)
    batched = jax.jit(jax.vmap(jax.grad(task_loss), in_axes=(None, 0, 0)))(penalty, xs, ys)
    task_grad = jax.jit(jax.grad(task_loss))  # compiled once for the three tasks
    looped = [task_grad(penalty, xs[i], ys[i]) for i in range(3)]
    np.testing.assert_allclose(batched, looped, rtol=1e-3 if dtype == jnp.float32 else 1e-9)


@pytest.mark.parametrize(
    "optimizer",
    [
        metaopt.ademamix(0.05),
        metaopt.simplified_ademamix(0.01),
        optax.adam(0.05, eps_root=1e-16),
    ],
    ids=["ademamix", "simplified_ademamix", "optax_adam_eps_root"],
)
def test_adam_type_inner_loop_is_differentiable_twice_without_nan(optimizer):
    # At the start the second coordinate's gradient is exactly zero, so Adam's second moment
    # is 0 and d sqrt(nu) = 0 * inf: plain jnp.sqrt gives NaN second derivatives (as
    # optax.adam does without eps_root); metaopt's transforms define that product as 0.
    def inner(w, p):
        return 0.5 * (w[0] - p) ** 2 + 0.5 * (w[1] - w[0] ** 2) ** 2

    def outer(p):
        w, _ = bilevel.solve(
            inner, jnp.zeros(2), p, optimizer=optimizer, steps=30, diff=bilevel.Unrolled()
        )
        return jnp.sum(w**2)

    grad = jax.grad(outer)
    second = float(jax.grad(grad)(0.5))
    h = 1e-5
    numeric = (float(grad(0.5 + h)) - float(grad(0.5 - h))) / (2 * h)
    np.testing.assert_allclose(second, numeric, rtol=1e-6)


def test_sharpness_aware_inner_optimizer_gets_its_grad_fn():
    w, info = bilevel.solve(
        inner_ridge,
        jnp.zeros(5),
        1.0,
        optimizer=metaopt.sam(optax.sgd(STEP), rho=1e-3),
        steps=200,
        diff=bilevel.Unrolled(),
    )
    assert int(info.steps) == 200 and np.all(np.isfinite(w))


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="steps"):
        bilevel.solve(inner_ridge, jnp.zeros(5), 1.0, optimizer=optax.sgd(0.1), steps=0)
    with pytest.raises(TypeError, match="diff"):
        bilevel.solve(
            inner_ridge, jnp.zeros(5), 1.0, optimizer=optax.sgd(0.1), steps=3, diff="implicit"
        )
    with pytest.raises(ValueError, match="k"):
        bilevel.Truncated(0)
    with pytest.raises(ValueError, match="checkpoint"):
        bilevel.Unrolled(checkpoint=-2)
    with pytest.raises(ValueError, match="on_failure"):
        bilevel.Implicit(on_failure="shrug")
    with pytest.raises(ValueError, match="fall back"):
        bilevel.Implicit(on_failure=bilevel.Implicit())
    # A per-example (non-scalar) inner loss is named before any step runs, in every diff mode.
    for diff in (bilevel.Implicit(), bilevel.Unrolled(), bilevel.Truncated(2), None):
        with pytest.raises(ValueError, match=r"inner_loss must return a scalar, got .* \(5,\)"):
            bilevel.solve(
                lambda w, lam: (w - lam) ** 2,
                jnp.zeros(5),
                1.0,
                optimizer=optax.sgd(0.1),
                steps=3,
                diff=diff,
            )


def test_value_and_hypergradient_returns_the_adjoint_solve_as_data():
    def outer(w, penalty):
        return outer_of(w) + 0.01 * jnp.sum(penalty**2)  # a direct term too

    penalty = jnp.linspace(0.5, 2.0, 5)
    value, (grad,), info = jax.jit(
        lambda p: bilevel.value_and_hypergradient(
            outer, inner_ridge, jnp.zeros(5), p, optimizer=optax.sgd(STEP), steps=3000, tol=1e-10
        )
    )(penalty)
    expected = jax.grad(lambda p: exact_outer(p) + 0.01 * jnp.sum(p**2))(penalty)
    np.testing.assert_allclose(grad, expected, rtol=1e-6)
    np.testing.assert_allclose(value, exact_outer(penalty) + 0.01 * jnp.sum(penalty**2), rtol=1e-9)
    assert bool(info.inner.converged) and bool(info.adjoint.converged)
    assert float(info.adjoint.relative_residual) <= 1e-6 and int(info.adjoint.iterations) >= 1
    # The same number as jax.grad through solve(diff=Implicit()).
    via_grad = jax.grad(lambda p: outer(_solve_ridge(p), p))(penalty)
    np.testing.assert_allclose(grad, via_grad, rtol=1e-9)

    # A capped adjoint solve shows up in the data, with no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, capped = bilevel.value_and_hypergradient(
            outer,
            inner_ridge,
            jnp.zeros(5),
            penalty,
            optimizer=optax.sgd(STEP),
            steps=3000,
            tol=1e-10,
            linear_solver=CG(maxiter=1),
        )
    assert not bool(capped.adjoint.converged) and int(capped.adjoint.iterations) == 1


def _solve_ridge(penalty):
    w, _ = bilevel.solve(
        inner_ridge, jnp.zeros(5), penalty, optimizer=optax.sgd(STEP), steps=3000, tol=1e-10
    )
    return w


# A 3-dimensional quadratic for the truncation tests: inner(w, theta) = 1/2 w'Aw - theta'w.
QUADRATIC = jnp.asarray([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
THETA = jnp.asarray([1.0, -0.5, 0.25])


def inner_quadratic(w, theta):
    return 0.5 * w @ QUADRATIC @ w - theta @ w


TRUNCATION_OPTIMIZERS = {
    "momentum": optax.sgd(0.2, momentum=0.9),
    "adam": optax.adam(0.1),
    # A float64 schedule (optax's return float32 values, which round differently in and out of
    # jit): the step count must run on, not restart.
    "schedule": optax.sgd(lambda count: 0.3 / (1.0 + 0.1 * jnp.asarray(count, jnp.float64))),
}


def _truncated_reference(optimizer, theta, steps, k, frozen_theta=None):
    """The last ``k`` of ``steps`` optax steps differentiable in theta; a plain Python loop.

    The first ``steps - k`` steps run with ``frozen_theta`` (default: theta under
    stop_gradient), so the derivative flows through the last ``k`` steps only, and the
    optimizer state is carried through all of them, as in one uninterrupted run.
    """
    frozen = jax.lax.stop_gradient(theta) if frozen_theta is None else frozen_theta
    w = jnp.zeros(3)
    state = optimizer.init(w)
    for i in range(steps):
        current = frozen if i < steps - k else theta
        gradient = jax.grad(inner_quadratic)(w, current)
        updates, state = optimizer.update(gradient, state, w)
        w = optax.apply_updates(w, updates)
    return w


@pytest.mark.parametrize("name", list(TRUNCATION_OPTIMIZERS))
@pytest.mark.parametrize("fallback", [False, True], ids=["truncated", "implicit_fallback"])
def test_truncated_continues_the_optimizer_and_differentiates_the_last_k_steps(name, fallback):
    optimizer = TRUNCATION_OPTIMIZERS[name]
    steps, k = 40, 5
    # As the fallback of Implicit, a tolerance that 40 steps cannot reach makes it run.
    diff = bilevel.Implicit(on_failure=bilevel.Truncated(k)) if fallback else bilevel.Truncated(k)
    tol = 1e-30 if fallback else None

    def solution(theta, diff=diff):
        return bilevel.solve(
            inner_quadratic,
            jnp.zeros(3),
            theta,
            optimizer=optimizer,
            steps=steps,
            tol=tol,
            diff=diff,
        )[0]

    unrolled = solution(THETA, bilevel.Unrolled())
    np.testing.assert_allclose(solution(THETA), unrolled, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(
        unrolled, _truncated_reference(optimizer, THETA, steps, steps), rtol=1e-14
    )

    def outer(w):
        return jnp.sum(w * jnp.asarray([1.0, 2.0, -1.0]))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback is requested: it runs silently
        got = jax.jit(jax.grad(lambda t: outer(solution(t))))(THETA)
    reference = jax.grad(lambda t: outer(_truncated_reference(optimizer, t, steps, k)))(THETA)
    np.testing.assert_allclose(got, reference, rtol=1e-12)
    # Finite differences of the truncated map: the first steps - k steps frozen at THETA.
    h = 1e-6
    finite = [
        (
            outer(_truncated_reference(optimizer, THETA + h * e, steps, k, THETA))
            - outer(_truncated_reference(optimizer, THETA - h * e, steps, k, THETA))
        )
        / (2 * h)
        for e in jnp.eye(3)
    ]
    np.testing.assert_allclose(got, finite, rtol=1e-7)
    # Truncation changes the derivative: the full one differs.
    full = jax.grad(lambda t: outer(solution(t, bilevel.Unrolled())))(THETA)
    assert float(jnp.max(jnp.abs(full - got))) > 1e-3


def test_truncated_reports_the_steps_actually_taken():
    def run(diff):
        return bilevel.solve(
            inner_quadratic,
            jnp.zeros(3),
            THETA,
            optimizer=optax.sgd(0.3),
            steps=1000,
            tol=1e-8,
            diff=diff,
        )

    w, info = run(bilevel.Unrolled())
    taken = int(info.steps)
    assert 5 < taken < 995 and bool(info.converged)
    for diff in (bilevel.Truncated(5), bilevel.Implicit(), bilevel.FirstOrder()):
        w_diff, info_diff = run(diff)
        assert int(info_diff.steps) == taken, diff
        np.testing.assert_allclose(w_diff, w, rtol=1e-14)


def test_implicit_without_tol_flags_an_unconverged_inner_solve():
    penalty = jnp.asarray(1.0)
    short = _outer(bilevel.Implicit(), steps=3, tol=None)
    with pytest.warns(metaopt.bilevel.InnerSolveWarning, match="did not reach its tolerance"):
        wrong = float(jax.block_until_ready(jax.grad(short)(penalty)))
    exact = float(jax.grad(exact_outer)(penalty))
    assert abs(wrong - exact) > 0.1 * abs(exact)  # what the warning is about
    nan_policy = _outer(bilevel.Implicit(on_failure="nan"), steps=3, tol=None)
    assert np.isnan(float(jax.grad(nan_policy)(penalty)))

    # The criterion, checked with NumPy: |g_K| <= rtol |g_0| (rtol = 1e-3 by default).
    def report(steps, init, diff=None):
        w, info = bilevel.solve(
            inner_ridge, init, penalty, optimizer=optax.sgd(STEP), steps=steps, diff=diff
        )  # diff None: Implicit() with its default test
        x, y = np.asarray(X), np.asarray(Y)

        def gradient(v):
            return x.T @ (x @ np.asarray(v) - y) + float(penalty) * np.asarray(v)

        ratio = np.linalg.norm(gradient(w)) / np.linalg.norm(gradient(init))
        np.testing.assert_allclose(
            float(info.gradient_norm), np.linalg.norm(gradient(w)), rtol=1e-9, atol=1e-13
        )
        return ratio, bool(info.converged)

    for steps in (3, 10, 20, 300):
        ratio, converged = report(steps, jnp.zeros(5))
        assert converged == (ratio <= 1e-3), (steps, ratio)
    # 10 steps leave 3.5e-3 of the initial gradient, 20 steps 5.9e-5.
    assert not report(10, jnp.zeros(5))[1] and report(20, jnp.zeros(5))[1]
    assert report(3, jnp.zeros(5), bilevel.Implicit(rtol=0.5))[1]
    # An init that is already optimal counts as converged (the absolute floor).
    w_star = jnp.linalg.solve(X.T @ X + penalty * jnp.eye(5), X.T @ Y)
    assert report(5, w_star)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(jax.grad(_outer(bilevel.Implicit(), steps=3000, tol=None))(penalty))
        jax.block_until_ready(
            jax.grad(_outer(bilevel.Implicit(rtol=None), steps=3, tol=None))(penalty)
        )
    with pytest.raises(ValueError, match="rtol"):
        bilevel.Implicit(rtol=-1.0)
    with pytest.raises(ValueError, match="atol"):
        bilevel.Implicit(atol=-1.0)


def _counting_sgd(counter):
    """optax.sgd(STEP) that counts, on the host, every update it computes."""

    def update(updates, state, params=None):
        del params
        jax.debug.callback(lambda: counter.append(1))
        return jax.tree.map(lambda g: -STEP * g, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@pytest.mark.parametrize("steps", [5, 50, 97])
@pytest.mark.parametrize("checkpoint", [True, 7])
def test_checkpointed_unrolling_runs_exactly_the_requested_steps(steps, checkpoint):
    counter = []
    w, info = bilevel.solve(
        inner_ridge,
        jnp.zeros(5),
        1.0,
        optimizer=_counting_sgd(counter),
        steps=steps,
        diff=bilevel.Unrolled(checkpoint=checkpoint),
    )
    jax.block_until_ready(w)
    assert len(counter) == steps and int(info.steps) == steps
    plain, _ = bilevel.solve(
        inner_ridge,
        jnp.zeros(5),
        1.0,
        optimizer=optax.sgd(STEP),
        steps=steps,
        diff=bilevel.Unrolled(),
    )
    np.testing.assert_array_equal(w, plain)
