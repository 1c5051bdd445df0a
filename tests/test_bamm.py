"""bilevel.SLBAMM on a lower level with many minimizers, against implicit differentiation.

The toy problem of Liu et al. (BDA, ICML 2020; sl-BAMM, ICML 2023), in dimension n:

    F(x, y) = 1/2 |x - y2|^2 + 1/2 |y1 - e|^2,      f(x, y) = 1/2 |y1|^2 - x^T y1.

The lower level ignores y2: its minimizers are {y1 = x, y2 anything}, and its Hessian
diag(I, 0) is singular. The optimistic bilevel solution picks y2 = x, then minimizes
1/2 |x - e|^2: x* = y1* = y2* = e (the all-ones vector), in closed form.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import bilevel, implicit

N = 10
E = jnp.ones(N)


def outer_loss(y, x, target=E):
    return 0.5 * jnp.sum((x - y[1]) ** 2) + 0.5 * jnp.sum((y[0] - target) ** 2)


def inner_loss(y, x):
    return 0.5 * jnp.sum(y[0] ** 2) - x @ y[0]


def _method(**overrides):
    config = dict(
        learning_rate=0.3,
        inner_learning_rate=0.9,
        multiplier_learning_rate=0.9,
        mu=0.9,
        mu_power=10.0,
    )
    return bilevel.SLBAMM(**{**config, **overrides})


def _start(dtype=jnp.float64):
    zeros = jnp.zeros(N, dtype)
    return zeros, (zeros, zeros)


def _run(method, state, steps, outer=outer_loss, inner=inner_loss):
    def body(state, _):
        state, info = method.step(outer, inner, state)
        return state, info

    return jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(state)


def _distance(x):
    return float(jnp.linalg.norm(x - E) / jnp.linalg.norm(E))


def test_one_step_matches_the_update_equations_written_with_explicit_matrices():
    # A coupled quadratic with a rank-2 lower-level Hessian A (4 x 4): f = y'Ay/2 - x'By,
    # F = y'Cy/2 + c'y + |x - d|^2/2 + x'Gy. Then grad_y f = Ay - B'x, Hess_yy f z = Az,
    # Hess_xy f z = -Bz, grad_y F = Cy + c + G'x, grad_x F = x - d + Gy; the step is written
    # out in NumPy from these, at step count k = 3 (mu_3 = mu * 4 ** (-1 / p)).
    rng = np.random.default_rng(0)
    u = rng.standard_normal((4, 2))
    a, b = u @ u.T, rng.standard_normal((3, 4))
    v = rng.standard_normal((4, 4))
    c_mat, c = v @ v.T + np.eye(4), rng.standard_normal(4)
    d, g = rng.standard_normal(3), rng.standard_normal((3, 4))
    x, y, z = rng.standard_normal(3), rng.standard_normal(4), rng.standard_normal(4)

    def inner(y, x):
        return 0.5 * y @ a @ y - x @ b @ y

    def outer(y, x):
        return 0.5 * y @ c_mat @ y + c @ y + 0.5 * jnp.sum((x - d) ** 2) + x @ g @ y

    alpha, beta, eta, mu, p = 0.05, 0.1, 0.2, 0.7, 3.0
    method = bilevel.SLBAMM(alpha, beta, eta, mu=mu, mu_power=p)
    state = method.init(jnp.asarray(x), jnp.asarray(y), z=jnp.asarray(z))
    new, info = method.step(outer, inner, state._replace(step=jnp.asarray(3, jnp.int32)))

    mu_k = mu * 4.0 ** (-1.0 / p)
    y1 = y - beta * (mu_k * (c_mat @ y + c + g.T @ x) + (1 - mu_k) * (a @ y - b.T @ x))
    residual = a @ z - (c_mat @ y1 + c + g.T @ x)
    z1 = z - eta * residual
    direction = x - d + g @ y1 + b @ z1
    x1 = x - alpha * direction
    np.testing.assert_allclose(new.y, y1, rtol=1e-13)
    np.testing.assert_allclose(new.z, z1, rtol=1e-13)
    np.testing.assert_allclose(new.x, x1, rtol=1e-13)
    np.testing.assert_allclose(info.mu, mu_k, rtol=1e-15)
    np.testing.assert_allclose(info.multiplier_residual_norm, np.linalg.norm(residual))
    np.testing.assert_allclose(info.hypergradient_norm, np.linalg.norm(direction))
    np.testing.assert_allclose(info.inner_gradient_norm, np.linalg.norm(a @ y1 - b.T @ x))
    np.testing.assert_allclose(info.outer_loss, outer(y1, x))
    assert int(new.step) == 4


def test_slbamm_reaches_the_bilevel_solution_without_lower_level_strong_convexity():
    state, infos = _run(_method(), _method().init(*_start()), 400)
    # Measured: relative distances 4e-16 (x), 2e-16 (y1), 6e-16 (y2) after 400 steps, and
    # every KKT residual at round-off: the iterates contract to the solution linearly once
    # the averaging weight mu_k has decayed (mu_power 10: mu_400 = 0.49). 1e-10 leaves six
    # orders of margin and still fails for any other limit point (the implicit one below is
    # at relative distance 0.5).
    assert _distance(state.x) < 1e-10
    assert _distance(state.y[0]) < 1e-10
    assert _distance(state.y[1]) < 1e-10
    assert float(infos.hypergradient_norm[-1]) < 1e-10
    assert float(infos.inner_gradient_norm[-1]) < 1e-10
    assert float(infos.outer_loss[-1]) < 1e-20
    assert bool(jnp.all(infos.finite)) and int(state.skipped_steps) == 0
    assert int(state.step) == 400


def test_slbamm_needs_the_averaging_to_pick_the_right_lower_level_solution():
    # The same steps with a negligible upper-level weight in the y-step: y2 stays where it
    # started (the lower level does not move it), and x settles at (e + y2_0) / 2, where
    # implicit differentiation ends too (see below). Averaging is what selects y2 = x.
    method = _method(mu=1e-12)
    state, _ = _run(method, method.init(*_start()), 400)
    np.testing.assert_allclose(state.x, 0.5 * E, atol=1e-9)
    np.testing.assert_allclose(state.y[1], 0.0, atol=1e-9)


def test_when_the_levels_disagree_the_iterate_trails_the_solution_by_mu_k():
    # The authors' strongly convex example: f = |y|^2/2 - x'y (y* = x), F = |y|^2/2 +
    # |x - e|^2/2, solved by x* = e/2. The y-step minimizes mu F + (1 - mu) f, whose
    # minimizer is (1 - mu) x, and the fixed point of the other two steps is then
    # x = e / (2 - mu): sl-BAMM is biased by the averaging weight, and converges as mu_k -> 0.
    # Measured (mu = 0.5, mu_power = 1, 300 steps): relative error 8.362e-4 against
    # mu / (2 - mu) = 8.340e-4 for the last mu = 0.5 / 300 (1.0026 times it).
    def inner(y, x):
        return 0.5 * jnp.sum(y**2) - x @ y

    def outer(y, x):
        return 0.5 * jnp.sum(y**2) + 0.5 * jnp.sum((x - E) ** 2)

    method = _method(mu=0.5, mu_power=1.0)
    state, infos = _run(method, method.init(jnp.zeros(N), jnp.zeros(N)), 300, outer, inner)
    mu = float(infos.mu[-1])
    np.testing.assert_allclose(mu, 0.5 / 300, rtol=1e-12)
    np.testing.assert_allclose(state.x, E / (2.0 - mu), rtol=1e-5)
    assert 0.8 * mu / (2 - mu) < _distance(2.0 * state.x) < 1.2 * mu / (2 - mu)


def _implicit_outer_loop(solver, steps):
    """Outer gradient descent on x, the hypergradient by bilevel.solve with Implicit(solver)."""
    y0 = (jnp.zeros(N), jnp.zeros(N))
    optimizer = optax.sgd(0.2)

    def loss(x):
        y, _ = bilevel.solve(
            inner_loss,
            y0,
            x,
            optimizer=optax.sgd(0.5),
            steps=200,
            tol=1e-12,
            diff=bilevel.Implicit(solver),
        )
        return outer_loss(y, x)

    @jax.jit
    def step(x, opt_state):
        value, grad = jax.value_and_grad(loss)(x)
        updates, opt_state = optimizer.update(grad, opt_state, x)
        return optax.apply_updates(x, updates), opt_state, value, grad

    x = jnp.zeros(N)
    opt_state = optimizer.init(x)
    grads = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x, opt_state, _, grad = step(x, opt_state)
            grads.append(grad)
    return x, jnp.stack(grads), [w.category for w in caught]


def test_implicit_differentiation_with_cg_breaks_down_on_the_singular_lower_level():
    # Measured: the first hypergradient (at x = 0, where y2 = x happens to hold and the adjoint
    # system H u = grad_y F is consistent) is finite, -e. From the second outer step on, the
    # right-hand side has a component y2 - x in the null space of H = diag(I, 0): CG meets a
    # direction of zero curvature, divides by it, and returns garbage, with a warning per step:
    # NaN where round-off leaves that curvature exactly 0, about 1e30 where it leaves 1e-31
    # (both seen, with XLA's LLVM optimizations on and off).
    x, grads, caught = _implicit_outer_loop(implicit.CG(), steps=3)
    np.testing.assert_allclose(grads[0], -E)

    def garbage(v):
        return not bool(jnp.all(jnp.isfinite(v))) or float(jnp.max(jnp.abs(v))) > 1e20

    assert garbage(grads[1]) and garbage(x)
    assert implicit.ImplicitDifferentiationWarning in caught


def test_implicit_differentiation_with_damped_cg_converges_elsewhere():
    # Damping (ridge) makes the adjoint system solvable, and CG converges without a warning;
    # but the inner solve leaves y2 at its start (0), the lower level being indifferent to it,
    # so the implicit derivative sees dy2*/dx = 0 and the outer loop minimizes
    # 1/2 |x - 0|^2 + 1/2 |x - e|^2. Measured: x = 0.5 e to 2.5e-9 after 100 outer steps,
    # silently, at relative distance 0.5 from the bilevel solution x* = e that SLBAMM reaches.
    x, grads, caught = _implicit_outer_loop(implicit.CG(tol=1e-10, ridge=1e-8), steps=100)
    assert caught == []
    np.testing.assert_allclose(x, 0.5 * E, atol=1e-7)
    assert float(jnp.linalg.norm(grads[-1])) < 1e-10
    assert abs(_distance(x) - 0.5) < 1e-6


def test_f2sa_reaches_the_bilevel_solution_through_its_penalized_solve():
    # F2SA's lower-level solve leaves y2 where it started, as the implicit inner solve does,
    # but its penalized solve min_z F/lambda + f does see y2 (through F) and takes it to x,
    # so its estimate (x - z2) + lambda (y1 - z1) vanishes only at x = e: F2SA converges to
    # the bilevel solution here. Measured (lambda = 100, 50 steps of sgd(0.9) per solve,
    # outer sgd(0.2)): relative distance 6e-15 after 300 outer steps; the penalized solve's
    # curvature in z2 is 1/lambda, so a larger lambda is slower (lambda = 1e3 with 20 inner
    # steps of sgd(0.5): still 0.12 away after 300 outer steps).
    f2sa = bilevel.F2SA(multiplier=100.0, inner_optimizer=optax.sgd(0.9), inner_steps=50)
    optimizer = optax.sgd(0.2)

    def body(carry, _):
        x, opt_state, state = carry
        grad, state, _ = f2sa.hypergradient(outer_loss, inner_loss, x, state)
        updates, opt_state = optimizer.update(grad, opt_state, x)
        return (optax.apply_updates(x, updates), opt_state, state), None

    x = jnp.zeros(N)
    start = (x, optimizer.init(x), f2sa.init(x, (jnp.zeros(N), jnp.zeros(N))))
    x, _, state = jax.jit(lambda c: jax.lax.scan(body, c, None, length=300)[0])(start)
    assert _distance(x) < 1e-10
    np.testing.assert_allclose(state.y[1], 0.0)  # the lower-level solve never moves y2
    np.testing.assert_allclose(state.z[1], E, atol=1e-10)


def test_the_state_never_takes_a_non_finite_value():
    method = _method()
    x, y = _start()
    state = method.init(x, y)

    # A NaN in the state: the step is skipped and counted, nothing new is written.
    bad = state._replace(y=(y[0].at[0].set(jnp.nan), y[1]))
    new, info = method.step(outer_loss, inner_loss, bad)
    assert not bool(info.finite)
    assert int(new.step) == 0 and int(new.skipped_steps) == 1
    assert bool(jnp.all(jnp.isfinite(new.x))) and bool(jnp.all(new.z[0] == 0.0))

    # A loss that is NaN on a region: the steps into it are skipped, the others taken.
    def sometimes_nan(y, x):
        return jnp.where(x[0] > 0.5, jnp.nan, outer_loss(y, x))

    state, infos = _run(method, state, 50, outer=sometimes_nan)
    assert bool(jnp.all(jnp.isfinite(state.x))) and bool(jnp.all(jnp.isfinite(state.z[1])))
    assert int(state.skipped_steps) == int(jnp.sum(~infos.finite)) > 0
    assert int(state.step) + int(state.skipped_steps) == 50

    # A NaN step size (a traced hyperparameter gone wrong) is skipped too.
    nan_rate = _method(learning_rate=jnp.asarray(0.3))
    new, info = jax.jit(
        lambda s, rate: bilevel.SLBAMM(
            learning_rate=rate,
            inner_learning_rate=0.9,
            multiplier_learning_rate=0.9,
        ).step(outer_loss, inner_loss, s)
    )(nan_rate.init(x, y), jnp.nan)
    assert not bool(info.finite) and int(new.skipped_steps) == 1


def test_jit_and_eager_agree_and_vmap_solves_two_tasks():
    method = _method()
    state = method.init(*_start())
    eager, _ = method.step(outer_loss, inner_loss, state)
    jitted, _ = jax.jit(lambda s: method.step(outer_loss, inner_loss, s))(state)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14)

    # Two tasks with different upper-level targets, each with its own solution x* = target.
    targets = jnp.stack([E, -2.0 * E])
    states = jax.vmap(lambda _: method.init(*_start()))(targets)

    def solve_task(state, target):
        def body(state, _):
            outer = lambda y, x: outer_loss(y, x, target)
            return method.step(outer, inner_loss, state)[0], None

        return jax.lax.scan(body, state, None, length=400)[0]

    solved = jax.jit(jax.vmap(solve_task))(states, targets)
    np.testing.assert_allclose(solved.x, targets, atol=1e-10)
    np.testing.assert_allclose(solved.y[1], targets, atol=1e-10)
    assert solved.step.tolist() == [400, 400]


def test_schedules_traced_rates_and_float32():
    # Step sizes may be schedules; the dtypes of float32 variables are kept.
    method = _method(learning_rate=optax.constant_schedule(0.3))
    x, y = _start(jnp.float32)
    state, infos = _run(method, method.init(x, y), 400)
    assert state.x.dtype == jnp.float32 and state.z[0].dtype == jnp.float32
    assert _distance(state.x) < 1e-5  # float32 round-off
    np.testing.assert_allclose(float(infos.mu[0]), 0.9)
    np.testing.assert_allclose(float(infos.mu[9]), 0.9 * 10.0 ** (-0.1), rtol=1e-6)

    # A traced learning rate: the map from it to the final x is differentiable.
    def final_x(rate):
        m = _method(learning_rate=rate)
        return jnp.sum(_run(m, m.init(*_start()), 5)[0].x)

    assert bool(jnp.isfinite(jax.grad(final_x)(0.3)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"multiplier_learning_rate": 0.0}, r"multiplier_learning_rate=0\.0.*multiplier z"),
        ({"multiplier_learning_rate": -0.5}, r"multiplier_learning_rate=-0\.5"),
        ({"inner_learning_rate": -1.0}, r"inner_learning_rate=-1\.0.*step size of y"),
        ({"learning_rate": 0}, r"learning_rate=0.*step size of x"),
        ({"mu": 0.0}, r"mu must lie in \(0, 1\], got mu=0\.0"),
        ({"mu": 1.5}, r"mu=1\.5"),
        ({"mu_power": 0.0}, r"mu_power must be a positive number, got mu_power=0\.0"),
        ({"mu_power": "2"}, r"mu_power='2'"),
    ],
)
def test_bad_configuration_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        _method(**overrides)


def test_bad_types_and_bad_losses_are_named():
    with pytest.raises(TypeError, match=r"learning_rate must be a real number"):
        _method(learning_rate="0.1")
    with pytest.raises(TypeError, match=r"mu must be a number or an array"):
        _method(mu=lambda k: 0.5)
    method = _method()
    with pytest.raises(TypeError, match=r"y must hold floating-point arrays.*int"):
        method.init(jnp.zeros(2), jnp.arange(3))
    with pytest.raises(ValueError, match=r"z must have the structure and shapes of y"):
        method.init(jnp.zeros(2), jnp.zeros(3), z=jnp.zeros(4))
    state = method.init(*_start())
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar, got .*\(10,\)"):
        method.step(outer_loss, lambda y, x: y[0] - x, state)
    with pytest.raises(ValueError, match=r"outer_loss must return a scalar"):
        method.step(lambda y, x: (outer_loss(y, x), 0.0), inner_loss, state)
