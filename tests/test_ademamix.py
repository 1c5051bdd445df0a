"""AdEMAMix and simplified AdEMAMix against optax.contrib and a NumPy transcription of the paper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from tests import references


def _gradient_sequence(steps, dim, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=dim).astype(dtype) for _ in range(steps)]


def _run(opt, grads, theta0):
    params = jnp.asarray(theta0)
    state = opt.init(params)
    trajectory = [np.asarray(params)]
    for g in grads:
        updates, state = opt.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(np.asarray(params))
    return trajectory


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ademamix_is_bitwise_identical_to_optax_contrib(dtype):
    grads = _gradient_sequence(30, 7, seed=0, dtype=dtype)
    theta0 = np.linspace(-1, 1, 7).astype(dtype)
    kwargs = dict(b1=0.8, b2=0.99, b3=0.995, alpha=4.0, eps=1e-6, weight_decay=0.05)
    ours = _run(metaopt.ademamix(0.01, **kwargs), grads, theta0)
    theirs = _run(optax.contrib.ademamix(0.01, **kwargs), grads, theta0)
    np.testing.assert_array_equal(np.stack(ours), np.stack(theirs))


def test_ademamix_schedules_match_optax_contrib():
    # A schedule passed by the user is evaluated at the 0-based count, as optax does.
    grads = _gradient_sequence(25, 5, seed=1)
    theta0 = np.zeros(5)
    alpha = optax.linear_schedule(0.0, 5.0, 10)
    b3 = optax.linear_schedule(0.9, 0.999, 10)
    ours = _run(metaopt.ademamix(0.02, b3=b3, alpha=alpha), grads, theta0)
    theirs = _run(optax.contrib.ademamix(0.02, b3=b3, alpha=alpha), grads, theta0)
    np.testing.assert_array_equal(np.stack(ours), np.stack(theirs))


@pytest.mark.parametrize(
    "alpha_warmup, b3_warmup", [(None, None), (10, None), (None, 12), (20, 20), (7, 40)]
)
def test_ademamix_matches_paper_algorithm_with_warmups(alpha_warmup, b3_warmup):
    grads = _gradient_sequence(40, 6, seed=2)
    theta0 = np.linspace(-2, 2, 6)
    hp = dict(b1=0.9, b2=0.999, b3=0.9999, alpha=8.0, eps=1e-8, weight_decay=0.1)
    expected = references.ademamix_reference(
        grads, theta0, 0.01, alpha_warmup=alpha_warmup, b3_warmup=b3_warmup, **hp
    )
    opt = metaopt.ademamix(
        0.01,
        hp["b1"],
        hp["b2"],
        hp["b3"],
        hp["alpha"],
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
        alpha_warmup_steps=alpha_warmup,
        b3_warmup_steps=b3_warmup,
    )
    got = _run(opt, grads, theta0)
    np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("t", [0, 1, 5, 37, 100, 250])
def test_warmup_functions_match_paper_formulas(t):
    np.testing.assert_allclose(
        float(metaopt.ademamix_alpha_warmup(t, 8.0, 100)),
        references.ademamix_alpha_warmup(t, 8.0, 100),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        float(metaopt.ademamix_b3_warmup(jnp.float64(t), 0.9999, 0.9, 100)),
        references.ademamix_b3_warmup(t, 0.9999, 0.9, 100),
        rtol=1e-12,
    )


def test_b3_warmup_reaches_half_life_midpoint():
    # Half-life h(b) = ln(1/2)/ln(b) is interpolated linearly: at t = T/2 it is the mean.
    def half_life(b):
        return np.log(0.5) / np.log(b)

    mid = float(metaopt.ademamix_b3_warmup(jnp.float64(50), 0.9999, 0.9, 100))
    np.testing.assert_allclose(
        half_life(mid), 0.5 * (half_life(0.9) + half_life(0.9999)), rtol=1e-9
    )


def test_simplified_ademamix_matches_optax_and_paper():
    grads = _gradient_sequence(30, 4, seed=3)
    theta0 = np.ones(4)
    kw = dict(b1=0.95, b2=0.99, alpha=2.0, eps=1e-8, weight_decay=0.01)
    ours = _run(metaopt.simplified_ademamix(0.003, **kw), grads, theta0)
    theirs = _run(optax.contrib.simplified_ademamix(0.003, **kw), grads, theta0)
    expected = references.simplified_ademamix_reference(grads, theta0, 0.003, **kw)
    # optax updates nu as g^2 + b2 (nu - g^2), metaopt as (1 - b2) g^2 + b2 nu (the paper's
    # form): equal up to rounding, so the comparison is at float64 round-off, not bitwise.
    np.testing.assert_allclose(np.stack(ours), np.stack(theirs), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(np.stack(ours), np.stack(expected), rtol=1e-12, atol=1e-14)


def test_mu_dtype_keeps_moments_in_requested_dtype():
    opt = metaopt.ademamix(0.01, mu_dtype=jnp.bfloat16)
    params = jnp.ones(3, jnp.float32)
    state = opt.init(params)
    updates, state = opt.update(jnp.ones(3, jnp.float32), state, params)
    inner = state[0]
    assert inner.m1.dtype == jnp.bfloat16 and inner.m2.dtype == jnp.bfloat16
    assert inner.nu.dtype == jnp.float32 and updates.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(b1=1.0), "b1"),
        (dict(b2=-0.1), "b2"),
        (dict(b3=1.5), "b3"),
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha_warmup_steps=0), "alpha_warmup_steps"),
        (dict(b3_warmup_steps=2.5), "b3_warmup_steps"),
        (dict(eps=-1e-8), "eps"),
    ],
)
def test_bad_configuration_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name}.*got {name}="):
        metaopt.ademamix(0.01, **kwargs)


def test_negative_learning_rate_is_rejected():
    with pytest.raises(ValueError, match="learning_rate"):
        metaopt.ademamix(-0.1)


def test_traced_betas_and_alpha_are_accepted_without_recompiling():
    traces = []

    @jax.jit
    def step(alpha, b3):
        traces.append(None)
        opt = metaopt.ademamix(0.1, b3=b3, alpha=alpha, b3_warmup_steps=10)
        params = jnp.ones(3)
        updates, _ = opt.update(jnp.ones(3), opt.init(params), params)
        return updates

    a = step(jnp.float64(2.0), jnp.float64(0.99))
    b = step(jnp.float64(3.0), jnp.float64(0.999))
    assert len(traces) == 1
    assert not np.allclose(a, b)


def _loss_after_steps(optimizer, start, target, steps=20):
    # Inner problem whose gradient is exactly zero at some coordinates: w[2] never enters the
    # loss (its second moment stays 0 at every step) and, from w = 0, w[1]'s first gradient
    # w[1] - w[0]**2 is 0 while depending on the start point.
    def inner(w):
        return 0.5 * (w[0] - target) ** 2 + 0.5 * (w[1] - w[0] ** 2) ** 2 + 0.0 * w[2]

    def body(carry, _):
        w, state = carry
        updates, state = optimizer.update(jax.grad(inner)(w), state, w)
        return (optax.apply_updates(w, updates), state), None

    (w, _), _ = jax.lax.scan(body, (start, optimizer.init(start)), None, length=steps)
    return jnp.sum((w - jnp.array([1.0, 0.5, 0.2])) ** 2)


@pytest.mark.parametrize("make", [metaopt.ademamix, metaopt.simplified_ademamix])
def test_meta_gradients_need_no_eps_root(make):
    # The docs' claim: with the default eps_root=0, derivatives through AdEMAMix steps are
    # finite where a second moment is exactly 0, and equal finite differences where the loss
    # after the steps is smooth. optax.adam gives NaN on the same problem without eps_root.
    def outer(hyper):  # hyper = (learning rate, inner target)
        return _loss_after_steps(make(hyper[0]), jnp.zeros(3), hyper[1])

    hyper = jnp.array([0.05, 0.7])
    grad = jax.jit(jax.grad(outer))(hyper)
    h = 1e-6
    numeric = [(outer(hyper + h * e) - outer(hyper - h * e)) / (2 * h) for e in jnp.eye(2)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-6)
    # jax.hessian is forward over reverse through the scanned steps (it was NaN while the
    # square root's protection was a custom_jvp rule: lax.scan evaluated the rule's primal as
    # a plain sqrt).
    hessian = jax.jit(jax.hessian(outer))(hyper)
    gradient = jax.jit(jax.grad(outer))
    numeric = [(gradient(hyper + h * e) - gradient(hyper - h * e)) / (2 * h) for e in jnp.eye(2)]
    np.testing.assert_allclose(hessian, np.stack(numeric, axis=1), rtol=1e-5)

    # MAML-style: the gradient with respect to the start point differentiates the inner
    # gradient itself, at w[1]'s zero first gradient.
    def from_start(start, optimizer):
        return _loss_after_steps(optimizer, start, 0.7)

    start = jnp.zeros(3)
    assert np.all(np.isfinite(jax.grad(from_start)(start, make(0.05))))
    assert np.all(np.isnan(jax.grad(from_start)(start, optax.adam(0.05))[:2]))
    assert np.all(np.isfinite(jax.grad(from_start)(start, optax.adam(0.05, eps_root=1e-12))))
