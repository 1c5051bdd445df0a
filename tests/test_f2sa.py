"""bilevel.F2SA: the fully first-order estimate against closed forms, without second derivatives.

The problem: ridge regression with a log-penalty, inner g(y, x) = |A y - b|^2 / 2 +
exp(x) |y|^2 / 2, outer f(y, x) = |C y - d|^2 / 2 (float64: the conftest enables x64).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import bilevel

_RNG = np.random.default_rng(0)
N, P = 20, 5
A = _RNG.normal(size=(N, P))
_W = _RNG.normal(size=P)
B = A @ _W + 0.5 * _RNG.normal(size=N)
C = _RNG.normal(size=(N, P))
D = C @ _W + 0.5 * _RNG.normal(size=N)
A, B, C, D = (jnp.asarray(v) for v in (A, B, C, D))
# Inner step 1 / L: the largest curvature of g (and of g + f / lambda for lambda >= 40).
L = float(np.linalg.eigvalsh(np.asarray(A.T @ A))[-1]) + np.exp(0.3) + 1.0


def inner(y, x):
    return 0.5 * jnp.sum((A @ y - B) ** 2) + 0.5 * jnp.exp(x) * jnp.sum(y**2)


def outer(y, x):
    return 0.5 * jnp.sum((C @ y - D) ** 2)


def y_star(x):
    return jnp.linalg.solve(A.T @ A + jnp.exp(x) * jnp.eye(P), A.T @ B)


def exact_hypergradient(x):
    return jax.grad(lambda x: outer(y_star(x), x))(x)


def _x_star():
    """The minimizer of F(x) = f(y*(x), x), by bisection on its closed-form derivative."""
    lo, hi = -3.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if exact_hypergradient(mid) > 0 else (mid, hi)
    return 0.5 * (lo + hi)


X_STAR = _x_star()  # -0.92838; F''(x*) = 0.0715


def _step(f2sa):
    return jax.jit(f2sa.hypergradient, static_argnums=(0, 1))


def test_estimate_error_falls_as_one_over_multiplier():
    # Inner solves to round-off (3000 steps at contraction <= 0.87), so what is left is the
    # penalty's bias, O(1/lambda) by the paper's Lemma 3.1. Measured at x = 0.3 (exact
    # hypergradient 0.475892):
    #   lambda   1e1       1e2       1e3       1e4
    #   error    6.251e-2  5.979e-3  5.871e-4  5.859e-5   (error * lambda: 0.625 .. 0.586)
    # log-log slope -1.01.
    x = jnp.asarray(0.3)
    exact = float(exact_hypergradient(x))
    multipliers = np.array([1e1, 1e2, 1e3, 1e4])
    errors = []
    for multiplier in multipliers:
        f2sa = bilevel.F2SA(multiplier, optax.sgd(1.0 / L), inner_steps=3000)
        grad, _, info = _step(f2sa)(outer, inner, x, f2sa.init(x, jnp.zeros(P)))
        assert float(info.y.gradient_norm) < 1e-12 and float(info.z.gradient_norm) < 1e-12
        assert bool(info.finite) and float(info.multiplier) == multiplier
        errors.append(abs(float(grad) - exact))
    errors = np.array(errors)
    slope = np.polyfit(np.log(multipliers), np.log(errors), 1)[0]
    assert -1.1 < slope < -0.9, (slope, errors)
    scaled = errors * multipliers
    assert scaled.max() / scaled.min() < 1.15, scaled


class SecondDerivativeError(Exception):
    pass


@jax.custom_jvp
def _one(value):
    return jnp.ones_like(value)


@_one.defjvp
def _one_jvp(primals, tangents):
    raise SecondDerivativeError("a loss was differentiated twice")


@jax.custom_jvp
def _first_order_only(value):
    """The identity on a loss value; its derivative's rule differentiates ``_one``, which raises.

    A first derivative of the loss calls the rule below with a primal that is not being
    differentiated, so ``_one`` is just evaluated. Any second derivative (a Hessian-vector
    product by jvp-of-grad or grad-of-grad, mixed partials included, since the loss value
    depends on every input) differentiates the rule itself, hence ``_one``: the trace fails.
    """
    return value


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    (value,), (tangent,) = primals, tangents
    return _first_order_only(value), tangent * _one(value)


def _probed(loss):
    return lambda y, x: _first_order_only(loss(y, x))


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_no_second_derivative_is_evaluated(momentum):
    f2sa = bilevel.F2SA(10.0, optax.adam(0.1), inner_steps=3, momentum=momentum)
    x = jnp.asarray(0.3)
    state = f2sa.init(x, jnp.zeros(P))
    jaxpr = jax.make_jaxpr(f2sa.hypergradient, static_argnums=(0, 1))(
        _probed(outer), _probed(inner), x, state
    )
    assert "custom_jvp_call" in str(jaxpr)  # the probes are in the traced program
    if momentum is None:  # the estimate through the probes is the estimate
        both = jax.jit(
            lambda x, state: (
                f2sa.hypergradient(_probed(outer), _probed(inner), x, state)[0],
                f2sa.hypergradient(outer, inner, x, state)[0],
            )
        )
        np.testing.assert_allclose(*both(x, state), rtol=1e-14)
    # Negative control: the implicit hypergradient uses Hessian-vector products; the probe
    # sees them.
    with pytest.raises(SecondDerivativeError):
        jax.make_jaxpr(
            lambda x: bilevel.value_and_hypergradient(
                _probed(outer),
                _probed(inner),
                jnp.zeros(P),
                x,
                optimizer=optax.sgd(0.01),
                steps=3,
            )
        )(x)
    with pytest.raises(SecondDerivativeError):  # and so does a plain jax.hessian
        jax.hessian(_probed(inner))(jnp.zeros(P), x)


def _outer_loop(f2sa, optimizer, steps, losses=None, x0=0.3):
    def body(carry, k):
        x, state, opt_state = carry
        f, g = (outer, inner) if losses is None else losses(k)
        grad, state, _ = f2sa.hypergradient(f, g, x, state)
        updates, opt_state = optimizer.update(grad, opt_state, x)
        return (optax.apply_updates(x, updates), state, opt_state), None

    x0 = jnp.asarray(x0)
    carry = (x0, f2sa.init(x0, jnp.zeros(P)), optimizer.init(x0))
    run = jax.jit(lambda carry: jax.lax.scan(body, carry, jnp.arange(steps))[0])
    return run(carry)[0]


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_outer_loop_reaches_the_bilevel_solution(momentum):
    # lambda grows linearly from 10 to 1e4 over 200 steps, then stays. The estimate's bias at
    # the end is about 0.59 / lambda = 5.9e-5 (test above), which moves the stationary point
    # by bias / F''(x*) = 5.9e-5 / 0.0715 = 8.3e-5 (measured: x - x* = -8.9e-5). The tolerance
    # 3e-4 leaves room for Adam's last oscillations; x starts 1.23 away.
    schedule = optax.linear_schedule(10.0, 1e4, 200)
    f2sa = bilevel.F2SA(schedule, optax.sgd(1.0 / L), inner_steps=20, momentum=momentum)
    x = _outer_loop(f2sa, optax.adam(0.05), 300)
    assert abs(float(x) - X_STAR) < 3e-4, (float(x), X_STAR)
    if momentum is not None:
        # With losses that do not change between calls, the recursive-momentum directions are
        # the plain gradients: the same run as plain F2SA.
        plain = bilevel.F2SA(schedule, optax.sgd(1.0 / L), inner_steps=20)
        np.testing.assert_allclose(x, _outer_loop(plain, optax.adam(0.05), 300), rtol=1e-10)


def _minibatches(seed, size=5):
    """The outer loss on ``size`` random validation rows per call (unbiased: scaled by N/size)."""

    def losses(k):
        rows = jax.random.choice(jax.random.fold_in(jax.random.key(seed), k), N, (size,), False)
        c, d = C[rows], D[rows]
        return (lambda y, x: 0.5 * (N / size) * jnp.sum((c @ y - d) ** 2)), inner

    return losses


def test_momentum_reduces_the_variance_of_minibatch_estimates():
    # At x*, 300 calls with a new minibatch of the outer loss each (the first 100 dropped):
    # measured standard deviation of the estimate 0.319 plain, 0.098 with momentum 0.02, same
    # mean (0.0115 and 0.0124, against the exact 0 and the 1/lambda bias 0.006).
    def estimates(momentum):
        f2sa = bilevel.F2SA(100.0, optax.sgd(1.0 / L), inner_steps=10, momentum=momentum)
        losses = _minibatches(0)
        x = jnp.asarray(X_STAR)

        def body(state, k):
            f, g = losses(k)
            grad, state, _ = f2sa.hypergradient(f, g, x, state)
            return state, grad

        run = jax.jit(lambda state: jax.lax.scan(body, state, jnp.arange(300))[1])
        return np.asarray(run(f2sa.init(x, y_star(x))))[100:]

    plain, momentum = estimates(None), estimates(0.02)
    assert momentum.std() < 0.5 * plain.std(), (momentum.std(), plain.std())
    assert abs(momentum.mean() - plain.mean()) < 0.05, (momentum.mean(), plain.mean())


def _broken_inner(y, x):
    # NaN, gradients included, for the task whose x is above 5.
    return inner(y, x) * jnp.where(x > 5.0, jnp.nan, 1.0)


def _call(on_failure, x, *, jit=False, vmap=False):
    f2sa = bilevel.F2SA(10.0, optax.sgd(1.0 / L), inner_steps=5, on_failure=on_failure)
    init = f2sa.init
    if vmap:
        init = jax.vmap(init, in_axes=(0, None))
    state = init(x, jnp.zeros(P))
    step = f2sa.hypergradient
    if vmap:
        step = jax.vmap(step, in_axes=(None, None, 0, 0))
    if jit:
        step = jax.jit(step, static_argnums=(0, 1))
    return state, step(outer, _broken_inner, x, state)


def test_nan_in_the_inner_loss_warns_and_leaves_the_state_unchanged():
    x = jnp.asarray(10.0)
    with pytest.warns(bilevel.F2SAWarning, match="inner solve of y returned non-finite"):
        state, (grad, new_state, info) = _call("warn", x)
    assert not np.isfinite(grad) and not bool(info.finite)
    assert not bool(info.y.converged) and not bool(info.z.converged)
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
        np.testing.assert_array_equal(old, new)


def test_failure_policies():
    x = jnp.asarray(10.0)
    _, (grad, _, info) = _call("nan", x)  # no warning (pytest makes one an error)
    assert np.isnan(grad) and not bool(info.finite)
    _, (grad, _, info) = _call("ignore", x)
    assert not np.isfinite(grad)
    with pytest.raises(RuntimeError, match="F2SA step failed"):
        _call("raise", x)
    # A healthy task is untouched by the policies that act.
    for policy in ("nan", "raise"):
        _, (grad, _, info) = _call(policy, jnp.asarray(0.3))
        assert np.isfinite(grad) and bool(info.finite)


def test_vmap_over_two_tasks_reports_once_and_keeps_the_healthy_one():
    x = jnp.array([0.3, 10.0])
    with pytest.warns(bilevel.F2SAWarning) as caught:
        state, (grad, new_state, info) = _call("warn", x, jit=True, vmap=True)
    assert len(caught) == 1
    np.testing.assert_array_equal(info.finite, [True, False])
    np.testing.assert_array_equal(info.y.converged, [True, False])
    np.testing.assert_array_equal(new_state.count, [1, 0])
    _, (alone, alone_state, _) = _call("warn", jnp.asarray(0.3))
    np.testing.assert_allclose(grad[0], alone, rtol=1e-12)
    np.testing.assert_allclose(new_state.z[0], alone_state.z, rtol=1e-12)
    np.testing.assert_array_equal(new_state.z[1], state.z[1])
    _, (grad, _, _) = _call("nan", x, jit=True, vmap=True)
    assert np.isfinite(grad[0]) and np.isnan(grad[1])
    with pytest.raises(Exception, match="F2SA step failed"):  # compiled: from the callback
        jax.block_until_ready(_call("raise", x, jit=True, vmap=True)[1])


def test_schedule_is_used_at_the_outer_step_count():
    f2sa = bilevel.F2SA(lambda k: 10.0 * (k + 1), optax.sgd(1.0 / L), inner_steps=2)
    x = jnp.asarray(0.3)
    state = f2sa.init(x, jnp.zeros(P))
    step = _step(f2sa)
    seen = []
    for _ in range(3):
        _, state, info = step(outer, inner, x, state)
        seen.append(float(info.multiplier))
    assert seen == [10.0, 20.0, 30.0] and int(state.count) == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"multiplier": 0.0}, ValueError, r"multiplier must be a finite number > 0.*0\.0"),
        ({"multiplier": -1.0}, ValueError, "multiplier must be a finite number > 0"),
        ({"multiplier": float("nan")}, ValueError, "multiplier must be a finite number > 0"),
        ({"multiplier": True}, TypeError, "multiplier"),
        ({"multiplier": "big"}, TypeError, "multiplier must be a number"),
        (
            {"multiplier": optax.linear_schedule(100.0, 10.0, 50)},
            ValueError,
            r"must not decrease.*multiplier\(0\) = 100\.0 > multiplier\(1\) = 98\.2.*"
            r"non-decreasing schedule",
        ),
        (  # a late drop, inside the checked counts
            {"multiplier": lambda k: jnp.where(k < 5000, 10.0, 5.0)},
            ValueError,
            r"multiplier\(4999\) = 10\.0 > multiplier\(5000\) = 5\.0",
        ),
        (  # a schedule written with Python control flow is checked too
            {"multiplier": lambda k: 10.0 if k < 3 else 1.0},
            ValueError,
            r"multiplier\(2\) = 10\.0 > multiplier\(3\) = 1\.0",
        ),
        (
            {"multiplier": optax.linear_schedule(0.0, 10.0, 50)},
            ValueError,
            r"finite and > 0 at every step.*multiplier\(0\) = 0\.0",
        ),
        ({"inner_steps": 0}, ValueError, "inner_steps must be a positive integer"),
        ({"inner_steps": 2.5}, ValueError, "inner_steps"),
        ({"inner_steps": True}, ValueError, "inner_steps"),
        ({"momentum": 0.0}, ValueError, r"momentum must be None or a number in \(0, 1\]"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"momentum": True}, ValueError, "momentum"),
        ({"on_failure": "loud"}, ValueError, "on_failure must be one of"),
        ({"inner_optimizer": "sgd"}, TypeError, "inner_optimizer must be an optax"),
        ({"check_steps": -1}, ValueError, "check_steps"),
    ],
)
def test_bad_configuration_is_rejected_at_construction(kwargs, error, match):
    arguments = {"multiplier": 10.0, "inner_optimizer": optax.sgd(0.1)} | kwargs
    with pytest.raises(error, match=match):
        bilevel.F2SA(**arguments)


def test_a_decrease_after_check_steps_is_not_seen_and_check_steps_is_the_knob():
    def late(k):
        return jnp.where(k < 20_000, 10.0, 5.0)

    bilevel.F2SA(late, optax.sgd(0.1))  # checked on 0..10_000 only
    with pytest.raises(ValueError, match=r"multiplier\(19999\)"):
        bilevel.F2SA(late, optax.sgd(0.1), check_steps=20_000)


@pytest.mark.parametrize("which", ["outer_loss", "inner_loss"])
def test_a_loss_that_is_not_scalar_is_rejected_at_the_first_call(which):
    f2sa = bilevel.F2SA(10.0, optax.sgd(0.1))
    x = jnp.asarray(0.3)
    state = f2sa.init(x, jnp.zeros(P))

    def per_example(y, x):
        return (A @ y - B) ** 2

    losses = (per_example, inner) if which == "outer_loss" else (outer, per_example)
    with pytest.raises(ValueError, match=rf"{which} must return a scalar.*shape \(20,\)"):
        f2sa.hypergradient(*losses, x, state)


def test_float32_huge_input_zero_gradient_and_mismatched_tree():
    f2sa = bilevel.F2SA(multiplier=100.0, inner_optimizer=optax.sgd(1 / L), inner_steps=5)
    # float32 stays float32 in the estimate and the state.
    state = f2sa.init(jnp.float32(0.3), jnp.zeros(P, jnp.float32))
    grad, state32, info = f2sa.hypergradient(outer, inner, jnp.float32(0.3), state)
    assert grad.dtype == state32.y.dtype == state32.z.dtype == jnp.float32
    assert bool(info.finite)
    # A huge hyperparameter (exp overflows): flagged, warned, the state left as it was.
    state = f2sa.init(0.3, jnp.zeros(P))
    with pytest.warns(bilevel.F2SAWarning):
        grad, after, info = f2sa.hypergradient(outer, inner, 1e30, state)
    assert not bool(info.finite) and not bool(jnp.isfinite(grad))
    assert int(after.count) == 0 and bool(jnp.all(after.y == state.y))
    # An outer loss that does not depend on anything: a zero estimate, finite.
    grad, _, info = f2sa.hypergradient(lambda y, x: 0.0 * jnp.sum(y), inner, 0.3, state)
    assert float(grad) == 0.0 and bool(info.finite)

    # Hyperparameters whose tree differs from the ones init was given: a named error.
    def tree_inner(y, h):
        return inner(y, sum(jax.tree.leaves(h)))

    def tree_outer(y, h):
        return outer(y, sum(jax.tree.leaves(h)))

    state = f2sa.init({"a": 0.3}, jnp.zeros(P))
    with pytest.raises(ValueError, match=r"hparams.*state.previous_hparams"):
        f2sa.hypergradient(tree_outer, tree_inner, {"a": 0.3, "b": 0.0}, state)


def test_batched_solves_equal_the_solves_one_after_the_other():
    # The default runs both solves in one loop, the inner gradient at y and z in one vmap;
    # batched_solves=False runs them one after the other. Same iterates up to rounding, over
    # several warm-started calls with a growing multiplier, with Adam (optimizer state carried).
    # Measured: relative differences at most 1.3e-14.
    schedule = lambda k: 10.0 + 5.0 * k
    results = []
    for batched in (True, False):
        f2sa = bilevel.F2SA(schedule, optax.adam(0.05), inner_steps=7, batched_solves=batched)
        state, x, estimates = f2sa.init(0.3, jnp.zeros(P)), jnp.asarray(0.3), []
        for _ in range(3):
            grad, state, info = _step(f2sa)(outer, inner, x, state)
            estimates.append(grad)
            x = x - 0.1 * grad
        results.append((jnp.stack(estimates), state.y, state.z, info.y.gradient_norm))
    for batched, separate in zip(*results, strict=True):
        np.testing.assert_allclose(batched, separate, rtol=1e-12)
    assert "batched_solves=True" in repr(bilevel.F2SA(1.0, optax.sgd(0.1)))
    with pytest.raises(TypeError, match="batched_solves must be True or False, got"):
        bilevel.F2SA(1.0, optax.sgd(0.1), batched_solves="yes")
