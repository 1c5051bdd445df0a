"""custom_root and custom_fixed_point against closed forms, finite differences and jaxopt."""

import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.implicit import (
    CG,
    GMRES,
    MINRES,
    Dense,
    ImplicitDifferentiationWarning,
    custom_fixed_point,
    custom_root,
)
from tests.regression_data import regression_data

with warnings.catch_warnings():
    # jaxopt announces on import that it is unmaintained; it is only the reference here.
    warnings.filterwarnings("ignore", "JAXopt is no longer maintained", DeprecationWarning)
    import jaxopt


# ----------------------------------------------------------------------------- problems
def ridge_optimality(w, penalty, x, y):
    """Gradient of 0.5 |X w - y|^2 + 0.5 sum(penalty * w^2); penalty scalar or per feature."""
    return x.T @ (x @ w - y) + penalty * w


def _ridge_solver(iterations=500, tol=1e-12):
    @custom_root(ridge_optimality, solve=CG(tol=tol))
    def solve(init, penalty, x, y):
        # Gradient descent with a safe step: the iterations are never differentiated.
        step = 1.0 / (jnp.linalg.norm(x, 2) ** 2 + jnp.max(penalty))

        def body(w, _):
            return w - step * ridge_optimality(w, penalty, x, y), None

        return jax.lax.scan(body, init, None, length=iterations)[0]

    return solve


def _closed_form_ridge(penalty, x, y):
    a = x.T @ x + jnp.diag(jnp.broadcast_to(penalty, (x.shape[1],)))
    return jnp.linalg.solve(a, x.T @ y)


def _validation_loss(w, x_val, y_val):
    return 0.5 * jnp.mean(jnp.square(x_val @ w - y_val))


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("per_feature", [False, True])
def test_ridge_hypergradient_matches_closed_form(per_feature):
    x, y, x_val, y_val = regression_data()
    penalty = jnp.linspace(0.5, 3.0, 6) if per_feature else jnp.asarray(1.7)
    solve = _ridge_solver()

    def outer(p):
        return _validation_loss(solve(jnp.zeros(6), p, x, y), x_val, y_val)

    def outer_exact(p):
        return _validation_loss(_closed_form_ridge(p, x, y), x_val, y_val)

    got, expected = jax.grad(outer)(penalty), jax.grad(outer_exact)(penalty)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # The closed form of d w*/d lambda, written out: -(X^T X + diag(lambda))^{-1} diag(w*).
    w_star = _closed_form_ridge(penalty, x, y)
    a = x.T @ x + jnp.diag(jnp.broadcast_to(penalty, (6,)))
    dw = -jnp.linalg.solve(a, jnp.diag(w_star) if per_feature else w_star)
    jacobian = jax.jacobian(solve, argnums=1)(jnp.zeros(6), penalty, x, y)
    np.testing.assert_allclose(jacobian, dw, rtol=1e-6, atol=1e-12)


def test_quadratic_with_matrix_valued_hyperparameter():
    rng = np.random.default_rng(1)
    theta = jnp.asarray(rng.normal(size=(4, 4)))
    b = jnp.asarray(rng.normal(size=4))

    def optimality(x, theta):
        return (theta @ theta.T + jnp.eye(4)) @ x - b

    @custom_root(optimality, solve=CG(tol=1e-13))
    def solve(init, theta):
        return jnp.linalg.solve(theta @ theta.T + jnp.eye(4), b) + 0.0 * init

    def outer(theta):
        return jnp.sum(jnp.sin(solve(jnp.zeros(4), theta)))

    def outer_exact(theta):
        return jnp.sum(jnp.sin(jnp.linalg.solve(theta @ theta.T + jnp.eye(4), b)))

    np.testing.assert_allclose(jax.grad(outer)(theta), jax.grad(outer_exact)(theta), rtol=1e-9)


def test_logistic_regression_matches_finite_differences_of_an_accurate_solve():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(60, 5)))
    labels = jnp.asarray((rng.random(60) < 0.5).astype(np.float64))
    x_val = jnp.asarray(rng.normal(size=(30, 5)))
    labels_val = jnp.asarray((rng.random(30) < 0.5).astype(np.float64))

    def loss(w, data, labels):
        logits = data @ w
        return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)

    def optimality(w, log_penalty):
        return jax.grad(loss)(w, x, labels) + jnp.exp(log_penalty) * w

    def newton(init, log_penalty):
        def body(w, _):
            hessian = jax.hessian(loss)(w, x, labels) + jnp.exp(log_penalty) * jnp.eye(5)
            return w - jnp.linalg.solve(hessian, optimality(w, log_penalty)), None

        return jax.lax.scan(body, init, None, length=30)[0]

    implicit = custom_root(optimality, solve=CG(tol=1e-13))(newton)

    def outer(solver, log_penalty):
        return loss(solver(jnp.zeros(5), log_penalty), x_val, labels_val)

    log_penalty = jnp.asarray(np.log(0.05))
    got = jax.grad(functools.partial(outer, implicit))(log_penalty)
    h = 1e-5
    numeric = (outer(newton, log_penalty + h) - outer(newton, log_penalty - h)) / (2 * h)
    np.testing.assert_allclose(got, numeric, rtol=1e-6)


# ----------------------------------------------------------------------------- autodiff modes
def test_forward_mode_equals_reverse_mode():
    x, y, _, _ = regression_data(seed=3)
    solve = _ridge_solver()
    penalty = jnp.linspace(0.5, 2.0, 6)
    forward = jax.jacfwd(solve, argnums=1)(jnp.zeros(6), penalty, x, y)
    reverse = jax.jacrev(solve, argnums=1)(jnp.zeros(6), penalty, x, y)
    np.testing.assert_allclose(forward, reverse, rtol=1e-10, atol=1e-14)
    # And through the data, a second argument.
    forward_x = jax.jacfwd(solve, argnums=2)(jnp.zeros(6), penalty, x, y)
    reverse_x = jax.jacrev(solve, argnums=2)(jnp.zeros(6), penalty, x, y)
    np.testing.assert_allclose(forward_x, reverse_x, rtol=1e-10, atol=1e-14)


def test_hessian_vector_products_match_finite_differences():
    x, y, x_val, y_val = regression_data(seed=4)
    solve = _ridge_solver()

    def outer(p):
        return _validation_loss(solve(jnp.zeros(6), p, x, y), x_val, y_val)

    penalty = jnp.linspace(0.5, 2.0, 6)
    v = jnp.asarray(np.random.default_rng(5).normal(size=6))
    hvp = jax.jvp(jax.grad(outer), (penalty,), (v,))[1]
    h = 1e-5
    grad_outer = jax.jit(jax.grad(outer))  # compiled once for both points
    numeric = (grad_outer(penalty + h * v) - grad_outer(penalty - h * v)) / (2 * h)
    np.testing.assert_allclose(hvp, numeric, rtol=1e-6, atol=1e-12)
    # The full Hessian (reverse over reverse) agrees with the closed form's.
    exact = jax.hessian(lambda p: _validation_loss(_closed_form_ridge(p, x, y), x_val, y_val))(
        penalty
    )
    np.testing.assert_allclose(jax.hessian(outer)(penalty), exact, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_vmap_over_tasks_equals_a_loop(dtype):
    tasks = [regression_data(seed=s) for s in range(4)]
    xs = jnp.stack([t[0] for t in tasks]).astype(dtype)
    ys = jnp.stack([t[1] for t in tasks]).astype(dtype)
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    solve = _ridge_solver(iterations=300, tol=tol)
    penalty = jnp.asarray(1.3, dtype)

    def task_loss(p, x, y):
        return jnp.sum(solve(jnp.zeros(6, dtype), p, x, y) ** 2)

    batched = jax.vmap(jax.grad(task_loss), in_axes=(None, 0, 0))(penalty, xs, ys)
    task_grad = jax.jit(jax.grad(task_loss))  # compiled once for the four tasks
    looped = jnp.stack([task_grad(penalty, xs[i], ys[i]) for i in range(4)])
    rtol = 1e-4 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(batched, looped, rtol=rtol)

    # grad of vmap with the hyperparameter not batched, passed as an argument ...
    def meta_loss(p):
        return jnp.sum(jax.vmap(lambda x, y: task_loss(p, x, y))(xs, ys))

    np.testing.assert_allclose(jax.grad(meta_loss)(penalty), jnp.sum(looped), rtol=rtol)

    # ... and closed over by both the optimality function and the solver.
    def meta_loss_closed(p):
        @custom_root(lambda w, x, y: ridge_optimality(w, p, x, y), solve=CG(tol=tol))
        def solve_closed(init, x, y):
            return jnp.linalg.solve(x.T @ x + p * jnp.eye(6, dtype=dtype), x.T @ y) + 0 * init

        return jnp.sum(
            jax.vmap(lambda x, y: jnp.sum(solve_closed(jnp.zeros(6, dtype), x, y) ** 2))(xs, ys)
        )

    np.testing.assert_allclose(jax.grad(meta_loss_closed)(penalty), jnp.sum(looped), rtol=rtol)

    # grad of jit, with the task's data closed over: the JVP rule is traced after the jit's
    # trace, where a vmap tracer over constant data used to escape (UnexpectedTracerError).
    def meta_loss_data_closed(p):
        def one_task(x, y):
            @custom_root(lambda w, p: ridge_optimality(w, p, x, y), solve=CG(tol=tol))
            def solve_task(init, p):
                return jnp.linalg.solve(x.T @ x + p * jnp.eye(6, dtype=dtype), x.T @ y) + 0 * init

            return jnp.sum(solve_task(jnp.zeros(6, dtype), p) ** 2)

        return jnp.sum(jax.vmap(one_task)(xs, ys))

    np.testing.assert_allclose(
        jax.grad(jax.jit(meta_loss_data_closed))(penalty), jnp.sum(looped), rtol=rtol
    )


def test_jit_keyword_arguments_aux_and_zero_init_gradient():
    x, y, _, _ = regression_data(seed=6)

    @custom_root(lambda w, x, y, *, penalty: ridge_optimality(w, penalty, x, y), has_aux=True)
    def solve(init, x, y, *, penalty):
        w = _closed_form_ridge(penalty, x, y) + 0.0 * init
        return w, {"steps": jnp.asarray(7), "norm": jnp.linalg.norm(w)}

    def outer(init, penalty):
        w, aux = solve(init, x, y, penalty=penalty)
        return jnp.sum(w) + 0.0 * aux["norm"]

    grad_init, grad_penalty = jax.jit(jax.grad(outer, argnums=(0, 1)))(jnp.ones(6), 2.0)
    np.testing.assert_array_equal(grad_init, np.zeros(6))
    expected = jax.grad(lambda p: jnp.sum(_closed_form_ridge(p, x, y)))(2.0)
    np.testing.assert_allclose(grad_penalty, expected, rtol=1e-8)
    assert int(solve(jnp.ones(6), x, y, penalty=2.0)[1]["steps"]) == 7


def test_matches_jaxopt_custom_root():
    x, y, x_val, y_val = regression_data(seed=7)
    solver = _ridge_solver()
    reference = jaxopt.implicit_diff.custom_root(
        lambda w, p, x, y: ridge_optimality(w, p, x, y),
        solve=functools.partial(jaxopt.linear_solve.solve_cg, tol=1e-12),
    )(lambda init, p, x, y: solver(init, p, x, y))

    def outer(solve, p):
        return _validation_loss(solve(jnp.zeros(6), p, x, y), x_val, y_val)

    penalty = jnp.linspace(0.5, 2.0, 6)
    np.testing.assert_allclose(
        jax.grad(functools.partial(outer, solver))(penalty),
        jax.grad(functools.partial(outer, reference))(penalty),
        rtol=1e-9,
    )


def test_unrolled_derivative_approaches_the_implicit_one():
    x, y, x_val, y_val = regression_data(seed=8)
    penalty = jnp.asarray(1.0)
    implicit = jax.grad(
        lambda p: _validation_loss(_ridge_solver()(jnp.zeros(6), p, x, y), x_val, y_val)
    )(penalty)

    def unrolled(p, steps):
        step = 1.0 / (jnp.linalg.norm(x, 2) ** 2 + 1.0)

        def body(w, _):
            return w - step * ridge_optimality(w, p, x, y), None

        w = jax.lax.scan(body, jnp.zeros(6), None, length=steps)[0]
        return _validation_loss(w, x_val, y_val)

    errors = [
        float(abs(jax.grad(unrolled)(penalty, k) - implicit) / abs(implicit))
        for k in (5, 10, 20, 40, 80)
    ]
    # Each doubling of the unrolled steps shrinks the gap until it reaches round-off.
    assert all(b < a or b < 1e-13 for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-10 < 1e-3 < errors[0]


def test_custom_fixed_point_square_root_and_gradient_step():
    @custom_fixed_point(lambda s, t: 0.5 * (s + t / s))
    def square_root(init, t):
        return jax.lax.fori_loop(0, 40, lambda _, s: 0.5 * (s + t / s), init)

    t = jnp.asarray(7.0)
    np.testing.assert_allclose(jax.grad(square_root, argnums=1)(1.0, t), 0.5 / np.sqrt(7.0))

    # A gradient step of a convex objective: its fixed point is the ridge solution.
    x, y, _, _ = regression_data(seed=9)
    step = 1.0 / (float(jnp.linalg.norm(x, 2)) ** 2 + 3.0)

    def gradient_step(w, p):
        return w - step * ridge_optimality(w, p, x, y)

    @custom_fixed_point(gradient_step, solve=GMRES(tol=1e-12))
    def fixed_point(init, p):
        return jax.lax.fori_loop(0, 3000, lambda _, w: gradient_step(w, p), init)

    got = jax.grad(lambda p: jnp.sum(fixed_point(jnp.zeros(6), p)))(jnp.asarray(1.5))
    expected = jax.grad(lambda p: jnp.sum(_closed_form_ridge(p, x, y)))(jnp.asarray(1.5))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ----------------------------------------------------------------------------- non-JAX solvers
def _numpy_ridge(init, penalty, x, y):
    """Ridge by NumPy conjugate gradients in a Python loop that stops early: not JAX code."""
    x, y, penalty = np.asarray(x), np.asarray(y), np.asarray(penalty)
    a = x.T @ x + np.diag(np.broadcast_to(penalty, (x.shape[1],)))
    w = np.zeros(x.shape[1]) if init is None else np.array(init, dtype=np.float64)
    r = x.T @ y - a @ w
    p = r.copy()
    while np.linalg.norm(r) > 1e-13 * np.linalg.norm(x.T @ y):
        alpha = (r @ r) / (p @ a @ p)
        w, r_next = w + alpha * p, r - alpha * (a @ p)
        p, r = r_next + (r_next @ r_next) / (r @ r) * p, r_next
    return w


@pytest.mark.parametrize("per_feature", [False, True])
def test_numpy_solver_outside_jit(per_feature):
    x, y, x_val, y_val = regression_data(seed=11)
    penalty = jnp.linspace(0.5, 3.0, 6) if per_feature else jnp.asarray(1.7)
    solve = custom_root(ridge_optimality, solve=CG(tol=1e-12))(_numpy_ridge)

    def outer(p):
        return _validation_loss(solve(jnp.zeros(6), p, x, y), x_val, y_val)

    expected = jax.grad(lambda p: _validation_loss(_closed_form_ridge(p, x, y), x_val, y_val))
    np.testing.assert_allclose(jax.grad(outer)(penalty), expected(penalty), rtol=1e-8)
    # Forward mode, and the derivative with respect to the data, through the same NumPy code.
    exact = jax.jacfwd(_closed_form_ridge, argnums=(0, 1))(penalty, x, y)
    got = jax.jacfwd(solve, argnums=(1, 2))(jnp.zeros(6), penalty, x, y)
    for g, e in zip(got, exact, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-12)
    # jaxopt's convention: no initial point when the solver does not need one.
    np.testing.assert_allclose(
        jax.grad(lambda p: jnp.sum(solve(None, p, x, y)))(penalty),
        jax.grad(lambda p: jnp.sum(_closed_form_ridge(p, x, y)))(penalty),
        rtol=1e-8,
    )


def test_numpy_fixed_point_solver_outside_jit():
    # Heron's iteration in plain Python floats, stopped when it no longer moves.
    def heron(s, t):
        return 0.5 * (s + t / s)

    @custom_fixed_point(heron)
    def square_root(init, t):
        s, t = float(init), float(t)
        while abs(heron(s, t) - s) > 1e-15 * s:
            s = heron(s, t)
        return np.asarray(s)

    t = jnp.asarray(7.0)
    np.testing.assert_allclose(jax.grad(square_root, argnums=1)(1.0, t), 0.5 / np.sqrt(7.0))
    np.testing.assert_allclose(
        jax.jacfwd(jax.grad(square_root, argnums=1), argnums=1)(1.0, t), -0.25 * 7.0**-1.5
    )


def test_numpy_solver_under_jit_and_vmap_through_pure_callback():
    x, y, x_val, y_val = regression_data(seed=12)

    @custom_root(ridge_optimality, solve=CG(tol=1e-12))
    def solve(init, p, x, y):
        shape = jax.ShapeDtypeStruct(init.shape, init.dtype)
        return jax.pure_callback(_numpy_ridge, shape, init, p, x, y, vmap_method="sequential")

    def outer(p):
        return _validation_loss(solve(jnp.zeros(6), p, x, y), x_val, y_val)

    def outer_exact(p):
        return _validation_loss(_closed_form_ridge(p, x, y), x_val, y_val)

    penalties = jnp.array([0.3, 1.0, 2.5])
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.grad(outer)))(penalties),
        jax.vmap(jax.grad(outer_exact))(penalties),
        rtol=1e-8,
    )
    # Without the callback, jit hands the NumPy solver tracers, as it would to any function.
    plain = custom_root(ridge_optimality)(_numpy_ridge)
    with pytest.raises(jax.errors.TracerArrayConversionError):
        jax.jit(lambda p: plain(jnp.zeros(6), p, x, y))(1.0)


# ----------------------------------------------------------------------------- failure policy
def _capped(on_failure, solve=None):
    """Ridge with an ill-conditioned design and a linear solve capped far below convergence."""
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.normal(size=(30, 12)) * np.geomspace(1.0, 300.0, 12))
    y = jnp.asarray(rng.normal(size=30))

    @custom_root(ridge_optimality, solve=solve or CG(maxiter=2, tol=1e-10), on_failure=on_failure)
    def ridge(init, p, x, y):
        return _closed_form_ridge(p, x, y) + 0.0 * init

    return lambda p: jnp.sum(ridge(jnp.zeros(12), p, x, y))


def test_capped_adjoint_solve_warns_by_default():
    with pytest.warns(ImplicitDifferentiationWarning, match="converged=False"):
        g = jax.grad(_capped("warn"))(0.1)
        jax.block_until_ready(g)
    assert np.isfinite(float(g))


def test_capped_adjoint_solve_policy_nan():
    assert np.isnan(float(jax.grad(_capped("nan"))(0.1)))


def test_capped_adjoint_solve_policy_raise():
    with pytest.raises(Exception, match="implicit derivative failed"):
        jax.block_until_ready(jax.grad(_capped("raise"))(0.1))


def test_raise_policy_puts_the_library_message_first():
    # Outside jit the report runs in Python, so the user reads our RuntimeError, not XLA's
    # JaxRuntimeError with a callback traceback in front of it.
    with pytest.raises(RuntimeError) as caught:
        jax.grad(_capped("raise"))(0.1)
    assert type(caught.value) is RuntimeError
    first_line = str(caught.value).splitlines()[0]
    assert first_line.startswith("the linear solve of an implicit derivative failed"), first_line

    # The same through bilevel.solve, for an inner solve that stopped short of its tolerance.
    import optax

    from metaopt import bilevel

    def short_solve(penalty, diff):
        w, _ = bilevel.solve(
            lambda w, p: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * p * jnp.sum(w**2),
            jnp.zeros(3),
            penalty,
            optimizer=optax.sgd(0.1),
            steps=3,
            tol=1e-10,
            diff=diff,
        )
        return jnp.sum(w)

    implicit_raise = bilevel.Implicit(on_failure="raise")
    with pytest.raises(RuntimeError) as caught:
        jax.grad(short_solve)(0.5, implicit_raise)
    assert type(caught.value) is RuntimeError
    assert "inner solve" in str(caught.value).splitlines()[0]

    # Under jit the report runs inside the compiled computation: XLA raises a JaxRuntimeError
    # whose text starts with the callback's traceback; our exception is its last line.
    with pytest.raises(jax.errors.JaxRuntimeError) as caught:
        jax.block_until_ready(jax.jit(jax.grad(_capped("raise")))(0.1))
    assert "RuntimeError: the linear solve of an implicit derivative failed" in str(caught.value)


def test_capped_adjoint_solve_policy_ignore_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(float(jax.grad(_capped("ignore"))(0.1)))


def test_converged_adjoint_solve_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = jax.grad(_capped("warn", solve=Dense(tol=1e-8)))(0.1)
    assert np.isfinite(float(g))


def test_indefinite_jacobian_is_flagged_and_minres_handles_it():
    # A saddle point: optimality is the gradient of 0.5 x^T diag(2, -1) x - theta^T x.
    diagonal = jnp.array([2.0, -1.0])

    def optimality(x, theta):
        return diagonal * x - theta

    def exact(init, theta):
        return theta / diagonal + 0.0 * init

    with pytest.warns(ImplicitDifferentiationWarning, match="negative_curvature=True"):
        jax.block_until_ready(
            jax.grad(lambda t: jnp.sum(custom_root(optimality)(exact)(jnp.zeros(2), t)))(
                jnp.ones(2)
            )
        )
    with_minres = custom_root(optimality, solve=MINRES(tol=1e-12))(exact)
    np.testing.assert_allclose(
        jax.grad(lambda t: jnp.sum(with_minres(jnp.zeros(2), t)))(jnp.ones(2)), [0.5, -1.0]
    )


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="on_failure"):
        custom_root(ridge_optimality, on_failure="explode")
    with pytest.raises(TypeError, match="solve"):
        custom_root(ridge_optimality, solve="cg")

    @custom_root(lambda w, p: jnp.sum(w) - p)  # scalar residual for a vector solution
    def wrong(init, p):
        return init

    with pytest.raises(ValueError, match="shaped like the solution"):
        wrong(jnp.zeros(3), 1.0)


@pytest.mark.parametrize("on_failure", ["ignore", "warn"])
def test_nan_outer_loss_gives_nan_hypergradient(on_failure):
    # A NaN in the validation data makes the outer loss and its gradient NaN; the implicit
    # hypergradient used to come back as exactly 0.0 (the adjoint solve returned its zero start).
    import optax

    from metaopt import bilevel

    x, y, x_val, y_val = regression_data(seed=13)
    y_val = y_val.at[3].set(jnp.nan)

    def inner(w, log_penalty):
        return 0.5 * jnp.sum((x @ w - y) ** 2) + 0.5 * jnp.exp(log_penalty) * jnp.sum(w**2)

    def outer(log_penalty, solver=None):
        w, _ = bilevel.solve(
            inner,
            jnp.zeros(6),
            log_penalty,
            optimizer=optax.sgd(0.004),
            steps=3000,
            tol=1e-9,
            diff=bilevel.Implicit(solver or CG(tol=1e-10), on_failure=on_failure),
        )
        return _validation_loss(w, x_val, y_val)

    def run(**kwargs):
        return jax.block_until_ready(jax.grad(lambda p: outer(p, **kwargs))(jnp.asarray(0.0)))

    if on_failure == "warn":
        with pytest.warns(ImplicitDifferentiationWarning, match="relative_residual=nan"):
            assert np.isnan(run())
    else:
        assert np.isnan(run())
        # The same with a direct and another Krylov solver.
        assert np.isnan(run(solver=Dense())) and np.isnan(run(solver=MINRES()))

    # custom_root alone, in forward mode too: a NaN tangent gives a NaN derivative.
    solve = _ridge_solver()
    tangent = jnp.full(6, jnp.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImplicitDifferentiationWarning)
        assert np.all(
            np.isnan(jax.jvp(lambda p: solve(jnp.zeros(6), p, x, y), (jnp.ones(6),), (tangent,))[1])
        )


def test_optimality_dtype_differing_from_the_solution_is_named():
    # A float64 constant promotes a float32 solution's residual: the error must say so.
    scale = jnp.asarray(2.0, jnp.float64)

    @custom_root(lambda x, t: {"w": scale * x["w"] - t, "b": x["b"] - t.astype(jnp.float32)})
    def solve(init, t):
        return {"w": (t / 2).astype(jnp.float32), "b": t.astype(jnp.float32)}

    init = {"w": jnp.zeros(3, jnp.float32), "b": jnp.zeros(3, jnp.float32)}
    with pytest.raises(TypeError, match=r"float64 for \['w'\], whose solution is float32"):
        jax.grad(lambda t: jnp.sum(solve(init, t)["w"]))(jnp.ones(3, jnp.float32))


def test_failure_report_runs_once_per_batch_and_never_on_success():
    # A host callback costs milliseconds: under vmap (nested too) it must run only when some
    # element failed, once, with the flags of the whole batch.
    from metaopt.implicit._custom_root import report_on_failure

    calls = []

    def report(failed, value):
        calls.append((np.asarray(failed).tolist(), np.asarray(value).shape))

    def check(x):
        return report_on_failure(x, x > 2.0, report, x)

    nested = jax.jit(jax.vmap(jax.vmap(check)))
    jax.block_until_ready(nested(jnp.zeros((2, 3))))
    assert calls == []
    jax.block_until_ready(nested(jnp.zeros((2, 3)).at[1, 2].set(5.0)))
    assert calls == [([[False, False, False], [False, False, True]], (2, 3))]
    # Differentiating through the caller is unaffected.
    grad = jax.grad(lambda x: jnp.sum(jax.vmap(check)(x) ** 2))(jnp.ones(3))
    np.testing.assert_allclose(grad, 2 * np.ones(3))


def test_failure_report_is_no_effect_and_changes_no_bit():
    # An effect (jax.debug.callback) takes a jitted call off JAX's asynchronous dispatch, which
    # cost iMAML's meta-gradient about 0.9 ms per call: the compiled check must have none, and
    # the value it guards must come back bit for bit, signed zeros and NaN included.
    from metaopt.implicit._custom_root import report_on_failure

    calls = []

    def guarded(x):
        return report_on_failure(x, jnp.any(x > 1e30), lambda f, v: calls.append(1), x)

    x = jnp.array([-0.0, 0.0, jnp.nan, -jnp.inf, 1.5, -2.0], jnp.float32)
    assert not jax.make_jaxpr(guarded)(x).effects
    out = np.asarray(jax.jit(guarded)(x))
    np.testing.assert_array_equal(out.view(np.uint32), np.asarray(x).view(np.uint32))
    assert calls == []
    ints = jnp.array([3, -1], jnp.int32)
    np.testing.assert_array_equal(
        jax.jit(lambda v: report_on_failure(v, v > 5, print, v))(ints), ints
    )

    @custom_root(lambda x, theta: 3.0 * x - theta, on_failure="warn")
    def solve(init, theta):
        return theta / 3.0

    meta_gradient = jax.grad(lambda theta: jnp.sum(solve(jnp.zeros(2), theta) ** 2))
    assert not jax.make_jaxpr(meta_gradient)(jnp.ones(2)).effects


@pytest.mark.parametrize("budgeted", [True, False])
def test_checking_a_solve_costs_no_extra_product_when_nothing_needs_it(budgeted):
    # The residual recomputed from the solution (one more matrix-vector product) is only
    # reported: "ignore" must not pay for it, nor must "warn" on a fixed iteration budget,
    # whose residual is not a failure. Counted in XLA's flops of the compiled derivative,
    # where one product with the 300 x 300 matrix is 180,000 flops.
    n = 300
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    matrix = jnp.asarray((q * np.linspace(1.0, 10.0, n)) @ q.T)
    solver = CG(maxiter=5, fixed_iterations=True) if budgeted else CG(maxiter=5)

    def flops(on_failure):
        @custom_root(lambda x, theta: matrix @ x - theta, solve=solver, on_failure=on_failure)
        def argmin(init, theta):
            return jnp.linalg.solve(matrix, theta)

        def outer(theta):
            return jnp.sum(argmin(jnp.zeros(n), theta) ** 2)

        cost = jax.jit(jax.grad(outer)).lower(jnp.ones(n)).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    product = 2 * n * n
    ignore, warn, nan = flops("ignore"), flops("warn"), flops("nan")
    # "ignore" never reads the residual; on a fixed budget neither do "warn" and "nan".
    extra = 0 if budgeted else product  # else convergence is judged on the true residual
    assert abs(warn - ignore - extra) < 0.5 * product, (warn, ignore)
    assert abs(nan - ignore - extra) < 0.5 * product, (nan, ignore)
