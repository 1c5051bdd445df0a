"""Factorized: the implicit derivative solved with the solver's own factorization, against the
closed form (autodiff of jnp.linalg.solve) and the CG path, in float64."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import cho_factor, cho_solve, lu_factor, lu_solve

from metaopt import bilevel
from metaopt.implicit import (
    CG,
    Factorized,
    ImplicitDifferentiationWarning,
    custom_fixed_point,
    custom_root,
    root_vjp,
)

_FEATURES, _SAMPLES = 6, 20


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((_SAMPLES, _FEATURES)) * np.logspace(0, -1, _FEATURES)
    y = x @ rng.standard_normal(_FEATURES) + 0.1 * rng.standard_normal(_SAMPLES)
    x_val = rng.standard_normal((_SAMPLES, _FEATURES))
    y_val = rng.standard_normal(_SAMPLES)
    gram, moment = x.T @ x / _SAMPLES, x.T @ y / _SAMPLES
    return tuple(jnp.asarray(a, jnp.float64) for a in (gram, moment, x_val, y_val))


GRAM, MOMENT, X_VAL, Y_VAL = _data()
LOG_PENALTY = jnp.linspace(-3.0, 0.0, _FEATURES)


def optimality(w, log_penalty):
    """Gradient of 0.5 w'Gw - m'w + 0.5 sum(exp(log_penalty) w^2)."""
    return GRAM @ w + jnp.exp(log_penalty) * w - MOMENT


def _hessian(log_penalty):
    return GRAM + jnp.diag(jnp.exp(log_penalty))


def _cholesky_solver(*, stale=1.0, **options):
    """The ridge solution by Cholesky, its factor returned as aux (of a scaled penalty when
    ``stale`` is not 1: a factor of the wrong matrix)."""
    options.setdefault("solve", Factorized(cho_solve, symmetric=True))

    @custom_root(optimality, has_aux=True, **options)
    def solver(init, log_penalty):
        del init
        w = cho_solve(cho_factor(_hessian(log_penalty)), MOMENT)
        return w, cho_factor(_hessian(log_penalty + jnp.log(stale)))

    return solver


@custom_root(optimality, solve=CG(tol=1e-13))
def _cg_solver(init, log_penalty):
    del init
    return jnp.linalg.solve(_hessian(log_penalty), MOMENT)


def _closed_form(log_penalty):
    return jnp.linalg.solve(_hessian(log_penalty), MOMENT)


def _outer(solution):
    def loss(log_penalty):
        w = solution(log_penalty)
        return 0.5 * jnp.mean((X_VAL @ w - Y_VAL) ** 2)

    return loss


def _reused(log_penalty, **options):
    return _cholesky_solver(**options)(None, log_penalty)[0]


def test_hypergradient_equals_closed_form_and_cg():
    # Eager: the solver and the rule run outside jit too (jit is tested below).
    reused = jax.grad(_outer(_reused))(LOG_PENALTY)
    closed = jax.jit(jax.grad(_outer(_closed_form)))(LOG_PENALTY)
    cg = jax.jit(jax.grad(_outer(lambda p: _cg_solver(None, p))))(LOG_PENALTY)
    np.testing.assert_allclose(reused, closed, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(reused, cg, rtol=1e-10, atol=1e-14)


def test_jvp_and_vjp_equal_closed_form():
    tangent = jnp.linspace(1.0, -1.0, _FEATURES)
    _, reused = jax.jit(lambda t: jax.jvp(_reused, (LOG_PENALTY,), (t,)))(tangent)
    _, closed = jax.jvp(_closed_form, (LOG_PENALTY,), (tangent,))
    np.testing.assert_allclose(reused, closed, rtol=1e-10, atol=1e-14)
    cotangent = jnp.arange(1.0, _FEATURES + 1.0)
    (reused,) = jax.jit(lambda c: jax.vjp(_reused, LOG_PENALTY)[1](c))(cotangent)
    (closed,) = jax.vjp(_closed_form, LOG_PENALTY)[1](cotangent)
    np.testing.assert_allclose(reused, closed, rtol=1e-10, atol=1e-14)


def test_second_derivatives_equal_closed_form():
    reused = jax.jit(jax.hessian(_outer(_reused)))(LOG_PENALTY)
    closed = jax.jit(jax.hessian(_outer(_closed_form)))(LOG_PENALTY)
    np.testing.assert_allclose(reused, closed, rtol=1e-9, atol=1e-13)


def test_jit_and_vmap():
    grad = jax.grad(_outer(_reused))
    closed = jax.grad(_outer(_closed_form))(LOG_PENALTY)
    np.testing.assert_allclose(jax.jit(grad)(LOG_PENALTY), closed, rtol=1e-10, atol=1e-14)
    batch = jnp.stack([LOG_PENALTY, LOG_PENALTY + 1.0, LOG_PENALTY - 0.5])
    batched = jax.jit(jax.vmap(grad))(batch)  # the factors are batched too
    closed = jax.jit(jax.vmap(jax.grad(_outer(_closed_form))))(batch)
    np.testing.assert_allclose(batched, closed, rtol=1e-10, atol=1e-14)
    jacobians = jax.jit(jax.vmap(jax.jacfwd(_reused)))(batch)
    closed = jax.jit(jax.vmap(jax.jacfwd(_closed_form)))(batch)
    np.testing.assert_allclose(jacobians, closed, rtol=1e-10, atol=1e-14)


def test_the_hypergradient_has_no_iterative_solve():
    # Reusing the factor leaves triangular solves only: no while loop, unlike CG.
    reused = jax.jit(jax.grad(_outer(_reused))).lower(LOG_PENALTY).as_text()
    cg = jax.jit(jax.grad(_outer(lambda p: _cg_solver(None, p)))).lower(LOG_PENALTY).as_text()
    assert "while" not in reused
    assert "while" in cg


# A non-symmetric Jacobian: F(x, theta) = A x - B theta, solved by LU.
_A = jnp.asarray(np.random.default_rng(1).standard_normal((4, 4)) + 4.0 * np.eye(4))
_B = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3)))
_THETA = jnp.array([0.5, -1.0, 2.0])
_LU = Factorized(lu_solve, transpose_solve=lambda lu, b: lu_solve(lu, b, trans=1))


def _linear_optimality(x, theta):
    return _A @ x - _B @ theta


@custom_root(_linear_optimality, solve=_LU, has_aux=True)
def _lu_solver(init, theta):
    del init
    lu = lu_factor(_A)
    return lu_solve(lu, _B @ theta), lu


def _fixed_point(x, theta):  # x = T(x): T - I = -(A x - B theta), so its Jacobian is -A
    return x - 0.1 * _linear_optimality(x, theta)


@custom_fixed_point(
    _fixed_point,
    solve=Factorized(
        lambda lu, b: -10.0 * lu_solve(lu, b),
        transpose_solve=lambda lu, b: -10.0 * lu_solve(lu, b, trans=1),
    ),
    has_aux=True,
)
def _fixed_point_solver(init, theta):
    del init
    lu = lu_factor(_A)
    return lu_solve(lu, _B @ theta), lu


@pytest.mark.parametrize("solver", [_lu_solver, _fixed_point_solver], ids=["root", "fixed_point"])
def test_non_symmetric_lu_forward_and_reverse(solver):
    expected = jnp.linalg.solve(_A, _B)  # dx/dtheta
    for jacobian in (jax.jacfwd, jax.jacrev):
        actual = jax.jit(jacobian(lambda t: solver(None, t)[0]))(_THETA)
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- the check
def test_a_stale_factor_is_caught_by_the_check():
    grad = jax.grad(_outer(lambda p: _reused(p, stale=1.5)))
    closed = jax.grad(_outer(_closed_form))(LOG_PENALTY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unchecked: nothing is reported...
        wrong = grad(LOG_PENALTY)
    assert np.linalg.norm(wrong - closed) > 1e-3 * np.linalg.norm(closed)  # ...and it is wrong

    checked = Factorized(cho_solve, symmetric=True, check=True, tol=1e-8)

    def loss(p, on_failure):
        return _outer(lambda q: _reused(q, stale=1.5, solve=checked, on_failure=on_failure))(p)

    with pytest.warns(ImplicitDifferentiationWarning, match="relative_residual"):
        jax.grad(loss)(LOG_PENALTY, "warn")
    with pytest.raises(RuntimeError, match="linear solve of an implicit derivative failed"):
        jax.grad(loss)(LOG_PENALTY, "raise")
    assert np.isnan(jax.jit(jax.grad(loss), static_argnums=1)(LOG_PENALTY, "nan")).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh factor passes the check, in both modes
        fresh = _outer(lambda q: _reused(q, solve=checked))
        np.testing.assert_allclose(jax.grad(fresh)(LOG_PENALTY), closed, rtol=1e-10, atol=1e-14)
        jax.jvp(lambda q: _reused(q, solve=checked), (LOG_PENALTY,), (LOG_PENALTY,))


def test_a_failed_factorization_is_reported_not_returned_as_a_number():
    # Cholesky of a matrix that is not positive definite gives a NaN factor: the adjoint
    # solution is then non-finite, which every policy treats as a failure (no check needed).
    @custom_root(optimality, solve=Factorized(cho_solve, symmetric=True), has_aux=True)
    def solver(init, log_penalty):
        del init
        w = jnp.linalg.solve(_hessian(log_penalty), MOMENT)
        return w, cho_factor(-_hessian(log_penalty))  # the factorization failed

    loss = _outer(lambda p: solver(None, p)[0])
    with pytest.warns(ImplicitDifferentiationWarning):
        grad = jax.grad(loss)(LOG_PENALTY)
    assert not np.isfinite(grad).all()


def test_huge_and_zero_penalties_stay_exact():
    # Penalties of 1e13 (the solution near zero) and of exp(-30) (near the unpenalized fit).
    for log_penalty in (jnp.full(_FEATURES, 30.0), jnp.full(_FEATURES, -30.0)):
        reused = jax.grad(_outer(_reused))(log_penalty)
        closed = jax.grad(_outer(_closed_form))(log_penalty)
        assert np.isfinite(reused).all()
        np.testing.assert_allclose(reused, closed, rtol=1e-8, atol=1e-30)


def test_a_nan_cotangent_gives_nan():
    def loss(p):
        return jnp.sum(_reused(p, on_failure="ignore")) * jnp.nan

    assert np.isnan(jax.grad(loss)(LOG_PENALTY)).all()


# ----------------------------------------------------------------------------- bad configuration
@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: Factorized(None), TypeError, "solve must be a function solve"),
        (lambda: Factorized(cho_solve), ValueError, "needs transpose_solve"),
        (
            lambda: Factorized(cho_solve, transpose_solve=cho_solve, symmetric=True),
            ValueError,
            "transpose_solve is not used when symmetric=True",
        ),
        (lambda: Factorized(cho_solve, transpose_solve=1), TypeError, "transpose_solve=1"),
        (lambda: Factorized(cho_solve, symmetric=1), TypeError, "symmetric=1"),
        (lambda: Factorized(cho_solve, symmetric=True, check="yes"), TypeError, "check='yes'"),
        (lambda: Factorized(cho_solve, symmetric=True, tol=-1.0), ValueError, "tol=-1.0"),
        (
            lambda: custom_root(optimality, solve=Factorized(cho_solve, symmetric=True)),
            ValueError,
            "has_aux=False",
        ),
        (
            lambda: bilevel.Implicit(Factorized(cho_solve, symmetric=True)),
            ValueError,
            "computes none",
        ),
        (
            lambda: Factorized(cho_solve, symmetric=True)(lambda v: v, jnp.ones(2)),
            TypeError,
            "cannot be called on a matrix-vector product",
        ),
        (
            lambda: root_vjp(
                optimality,
                _closed_form(LOG_PENALTY),
                (LOG_PENALTY,),
                jnp.ones(_FEATURES),
                Factorized(cho_solve, symmetric=True),
            ),
            TypeError,
            "root_vjp and root_jvp take a matrix-free",
        ),
    ],
)
def test_bad_configuration_raises(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_a_solve_of_the_wrong_shape_raises():
    wrong = Factorized(lambda factor, b: b[:2], symmetric=True)
    with pytest.raises(ValueError, match="shaped like b"):
        jax.grad(_outer(lambda p: _reused(p, solve=wrong)))(LOG_PENALTY)
