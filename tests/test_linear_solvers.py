"""The adjoint linear solvers against numpy.linalg.solve, with their diagnostics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.implicit import CG, GMRES, MINRES, BiCGSTAB, Dense, Neumann, NormalCG


def _spd(n, seed, condition=50.0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, condition, n)) @ q.T


def _nonsymmetric(n, seed):
    rng = np.random.default_rng(seed)
    return np.eye(n) * 3.0 + rng.normal(size=(n, n)) / np.sqrt(n)


def _pytree_system(matrix, seed):
    """A as a map on the pytree {'a': (n//2,), 'b': (n - n//2,)} and a right-hand side."""
    n = matrix.shape[0]
    k = n // 2
    a = jnp.asarray(matrix)

    def matvec(tree):
        v = jnp.concatenate([tree["a"], tree["b"]])
        w = a @ v
        return {"a": w[:k], "b": w[k:]}

    rhs = np.random.default_rng(seed).normal(size=n)
    return matvec, {"a": jnp.asarray(rhs[:k]), "b": jnp.asarray(rhs[k:])}, rhs


SPD_SOLVERS = {
    "cg": CG(tol=1e-12),
    "minres": MINRES(tol=1e-12),
    "gmres": GMRES(tol=1e-12, restart=10),
    "bicgstab": BiCGSTAB(tol=1e-12),
    "normal_cg": NormalCG(tol=1e-10),
    "dense": Dense(tol=1e-12),
}
GENERAL_SOLVERS = {k: SPD_SOLVERS[k] for k in ("gmres", "bicgstab", "normal_cg", "dense")}


@pytest.mark.parametrize("name", sorted(SPD_SOLVERS))
def test_solves_symmetric_positive_definite_system(name):
    matrix = _spd(12, seed=0)
    matvec, b, rhs = _pytree_system(matrix, seed=1)
    x, info = jax.jit(lambda b: SPD_SOLVERS[name](matvec, b))(b)
    expected = np.linalg.solve(matrix, rhs)
    got = np.concatenate([x["a"], x["b"]])
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
    assert bool(info.converged) and float(info.relative_residual) <= SPD_SOLVERS[name].tol
    assert int(info.iterations) >= 1 and not bool(info.negative_curvature)


@pytest.mark.parametrize("name", sorted(GENERAL_SOLVERS))
def test_solves_nonsymmetric_system(name):
    matrix = _nonsymmetric(15, seed=2)
    matvec, b, rhs = _pytree_system(matrix, seed=3)
    x, info = GENERAL_SOLVERS[name](matvec, b)
    np.testing.assert_allclose(
        np.concatenate([x["a"], x["b"]]), np.linalg.solve(matrix, rhs), rtol=1e-8, atol=1e-10
    )
    assert bool(info.converged)


def test_cg_ridge_solves_the_damped_system():
    matrix = _spd(8, seed=4)
    rhs = jnp.asarray(np.random.default_rng(5).normal(size=8))
    x, info = CG(tol=1e-12, ridge=0.3)(lambda v: jnp.asarray(matrix) @ v, rhs)
    np.testing.assert_allclose(x, np.linalg.solve(matrix + 0.3 * np.eye(8), rhs), rtol=1e-9)
    assert bool(info.converged)


def test_jacobi_preconditioner_cuts_iterations():
    rng = np.random.default_rng(6)
    diagonal = np.geomspace(1.0, 1e4, 40)
    matrix = np.diag(diagonal) + 0.01 * (lambda m: m + m.T)(rng.normal(size=(40, 40)))
    a, rhs = jnp.asarray(matrix), jnp.asarray(rng.normal(size=40))
    _, plain = CG(tol=1e-10)(lambda v: a @ v, rhs)
    x, preconditioned = CG(tol=1e-10, preconditioner=lambda r: r / jnp.asarray(diagonal))(
        lambda v: a @ v, rhs
    )
    np.testing.assert_allclose(x, np.linalg.solve(matrix, rhs), rtol=1e-8)
    assert int(preconditioned.iterations) < int(plain.iterations) / 2


def test_cg_flags_negative_curvature_and_minres_solves_the_indefinite_system():
    matrix = np.diag([3.0, 2.0, -1.0, 0.5])
    rhs = jnp.ones(4)
    _, info = CG(tol=1e-10)(lambda v: jnp.asarray(matrix) @ v, rhs)
    assert bool(info.negative_curvature) and not bool(info.converged)
    x, info = MINRES(tol=1e-12)(lambda v: jnp.asarray(matrix) @ v, rhs)
    np.testing.assert_allclose(x, np.linalg.solve(matrix, rhs), rtol=1e-10)
    assert bool(info.converged) and not bool(info.negative_curvature)


def test_fixed_iterations_runs_exactly_that_many_and_reports_the_residual():
    matrix = _spd(50, seed=7, condition=1e4)
    rhs = jnp.asarray(np.random.default_rng(8).normal(size=50))
    solver = CG(maxiter=3, fixed_iterations=True, tol=1e-8)
    x, info = solver(lambda v: jnp.asarray(matrix) @ v, rhs)
    assert int(info.iterations) == 3 and not bool(info.converged)
    true_residual = np.linalg.norm(rhs - matrix @ x) / np.linalg.norm(rhs)
    np.testing.assert_allclose(float(info.relative_residual), true_residual, rtol=1e-10)

    # Differentiable by unrolling: the derivative with respect to b matches finite differences.
    def f(b):
        return jnp.sum(solver(lambda v: jnp.asarray(matrix) @ v, b)[0] ** 2)

    direction = jnp.asarray(np.random.default_rng(9).normal(size=50))
    h = 1e-6
    numeric = (f(rhs + h * direction) - f(rhs - h * direction)) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(jax.grad(f)(rhs), direction), numeric, rtol=1e-6)


def test_capped_solve_reports_not_converged():
    matrix = _spd(60, seed=10, condition=1e6)
    rhs = jnp.asarray(np.random.default_rng(11).normal(size=60))
    for solver in (CG(maxiter=4), MINRES(maxiter=4), GMRES(restart=2, maxiter=2)):
        _, info = solver(lambda v: jnp.asarray(matrix) @ v, rhs)
        assert not bool(info.converged) and float(info.relative_residual) > 1e-6


def test_neumann_equals_the_truncated_series():
    matrix = _spd(6, seed=12, condition=5.0) / 5.0
    rhs = np.random.default_rng(13).normal(size=6)
    expected, term = rhs.copy(), rhs.copy()
    for _ in range(7):
        term = term - 0.8 * matrix @ term
        expected += term
    x, info = Neumann(steps=7, scale=0.8)(lambda v: jnp.asarray(matrix) @ v, jnp.asarray(rhs))
    np.testing.assert_allclose(x, 0.8 * expected, rtol=1e-12)
    assert int(info.iterations) == 7


def test_zero_right_hand_side_gives_zero_solution():
    matrix = jnp.asarray(_spd(5, seed=14))
    for solver in SPD_SOLVERS.values():
        x, info = solver(lambda v: matrix @ v, jnp.zeros(5))
        np.testing.assert_array_equal(x, np.zeros(5))
        assert bool(info.converged) and np.isfinite(float(info.relative_residual))


def test_solvers_vmap_over_right_hand_sides():
    matrix = jnp.asarray(_spd(6, seed=15))
    rhs = jnp.asarray(np.random.default_rng(16).normal(size=(4, 6)))
    for solver in (CG(tol=1e-12), MINRES(tol=1e-12), BiCGSTAB(tol=1e-12), GMRES(tol=1e-12)):
        xs, infos = jax.vmap(lambda b: solver(lambda v: matrix @ v, b))(rhs)
        np.testing.assert_allclose(xs, np.linalg.solve(matrix, rhs.T).T, rtol=1e-8)
        assert infos.converged.shape == (4,) and bool(np.all(infos.converged))


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: CG(tol=-1.0), "tol"),
        (lambda: CG(maxiter=0), "maxiter"),
        (lambda: CG(ridge=-1.0), "ridge"),
        (lambda: CG(fixed_iterations=True), "maxiter"),
        (lambda: GMRES(restart=0), "restart"),
        (lambda: Neumann(steps=0), "steps"),
        (lambda: Neumann(scale=0.0), "scale"),
    ],
)
def test_bad_configuration_names_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


ALL_SOLVERS = {
    **SPD_SOLVERS,
    "cg_fixed": CG(maxiter=8, fixed_iterations=True),
    "neumann": Neumann(steps=8, scale=0.01),
}


@pytest.mark.parametrize("name", sorted(ALL_SOLVERS))
@pytest.mark.parametrize("where", ["rhs", "operator"])
def test_non_finite_input_gives_nan_not_a_plausible_solution(name, where):
    # A NaN right-hand side (a NaN outer loss) used to stop the Krylov loops at once and return
    # their zero starting point, which reads as a valid derivative.
    matrix = jnp.asarray(_spd(6, seed=17))
    rhs = jnp.asarray(np.random.default_rng(18).normal(size=6))
    if where == "rhs":
        rhs = rhs.at[2].set(jnp.nan)
        matvec = lambda v: matrix @ v
    else:
        matvec = lambda v: (matrix @ v).at[4].multiply(jnp.inf)
    x, info = jax.jit(lambda b: ALL_SOLVERS[name](matvec, b))(rhs)
    assert np.all(np.isnan(x)), x
    assert not bool(info.converged) and not np.isfinite(float(info.relative_residual))
