"""Programs written against jaxopt.implicit_diff run unchanged on metaopt.implicit.

Each program is written once against a module ``impl`` (``jaxopt.implicit_diff`` or
``metaopt.implicit``, the only line a user changes), run with both, and compared with each
other and with an independent reference: a closed form or central finite differences in float64.
The cases follow jaxopt's documented conventions (``init_params=None``, keyword arguments bound
to the solver's signature, solver defaults, ``has_aux``, ``root_vjp``/``root_jvp``, jaxopt's
linear ``solve`` functions).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaopt.implicit
from tests.regression_data import regression_data

with warnings.catch_warnings():
    # jaxopt announces on import that it is unmaintained; it is only the reference here.
    warnings.filterwarnings("ignore", "JAXopt is no longer maintained", DeprecationWarning)
    import jaxopt

IMPLEMENTATIONS = {"jaxopt": jaxopt.implicit_diff, "metaopt": metaopt.implicit}
TIGHT_CG = functools.partial(jaxopt.linear_solve.solve_cg, tol=1e-12, maxiter=500)


def run_both(program):
    """``program(impl)`` with jaxopt's and metaopt's module; returns (jaxopt's, metaopt's)."""
    return tuple(program(IMPLEMENTATIONS[name]) for name in ("jaxopt", "metaopt"))


def _data(seed=0):
    x, y, _, _ = regression_data(n=30, d=5, seed=seed)
    return x, y


# jaxopt's ridge regression example: the objective is a mean, so the solver scales the penalty.
def ridge_objective(params, l2reg, data):
    x, y = data
    residuals = x @ params - y
    return 0.5 * jnp.mean(residuals**2) + 0.5 * l2reg * jnp.sum(params**2)


def closed_form_ridge(l2reg, data):
    x, y = data
    return jnp.linalg.solve(x.T @ x + l2reg * len(y) * jnp.eye(x.shape[1]), x.T @ y)


def central_difference(f, theta, h=1e-5):
    return (f(theta + h) - f(theta - h)) / (2 * h)


# ----------------------------------------------------------------------------- custom_root
@pytest.mark.parametrize("solve", ["default", "solve_cg", "metaopt_cg"])
def test_ridge_jacobian_with_init_params_none(solve):
    data = _data()

    def program(impl):
        kwargs = {}
        if solve == "solve_cg":
            kwargs["solve"] = TIGHT_CG
        elif solve == "metaopt_cg" and impl is metaopt.implicit:
            kwargs["solve"] = metaopt.implicit.CG(tol=1e-12)
        elif solve == "metaopt_cg":
            kwargs["solve"] = TIGHT_CG

        @impl.custom_root(jax.grad(ridge_objective), **kwargs)
        def ridge_solver(init_params, l2reg, data):
            del init_params  # a direct solver ignores its initial point
            return closed_form_ridge(l2reg, data)

        return jax.jacrev(ridge_solver, argnums=1)(None, 10.0, data)

    reference, ours = run_both(program)
    expected = central_difference(lambda lam: closed_form_ridge(lam, data), 10.0)
    # jaxopt's default solve_normal_cg stops at tol 1e-5, metaopt's CG at 1e-6.
    rtol = 1e-4 if solve == "default" else 1e-8
    np.testing.assert_allclose(ours, expected, rtol=rtol)
    np.testing.assert_allclose(reference, expected, rtol=rtol)
    np.testing.assert_allclose(ours, reference, rtol=rtol)


def test_keyword_arguments_are_bound_to_the_solver_signature():
    # The optimality function names its parameters differently: jaxopt matches them by position
    # after binding the call (all keywords here) to the solver's signature.
    data = _data(seed=1)

    def optimality(params, lam, dataset):
        return jax.grad(ridge_objective)(params, lam, dataset)

    def program(impl):
        @impl.custom_root(optimality, solve=TIGHT_CG)
        def ridge_solver(init_params, l2reg, data):
            return closed_form_ridge(l2reg, data) + 0.0 * init_params

        def loss(lam, x):
            sol = ridge_solver(init_params=jnp.zeros(5), l2reg=lam, data=(x, data[1]))
            return jnp.sum(sol**2)

        return jax.grad(loss, argnums=(0, 1))(3.0, data[0])

    reference, ours = run_both(program)

    def exact(lam, x):
        return jnp.sum(closed_form_ridge(lam, (x, data[1])) ** 2)

    expected_lam = central_difference(lambda lam: exact(lam, data[0]), 3.0)
    np.testing.assert_allclose(ours[0], expected_lam, rtol=1e-7)
    np.testing.assert_allclose(ours[1], jax.grad(exact, argnums=1)(3.0, data[0]), rtol=1e-8)
    for r, o in zip(reference, ours, strict=True):
        np.testing.assert_allclose(o, r, rtol=1e-8)


def test_solver_defaults_reach_the_optimality_function():
    # jaxopt applies the solver's defaults and passes them on, so the optimality function
    # receives the data the solver was given by default.
    data = _data(seed=2)

    def program(impl):
        @impl.custom_root(jax.grad(ridge_objective), solve=TIGHT_CG)
        def ridge_solver(init_params, l2reg, data=data):
            del init_params
            return closed_form_ridge(l2reg, data)

        return jax.grad(lambda lam: jnp.sum(ridge_solver(None, lam)))(2.0)

    reference, ours = run_both(program)
    expected = central_difference(lambda lam: jnp.sum(closed_form_ridge(lam, data)), 2.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-7)
    np.testing.assert_allclose(ours, reference, rtol=1e-8)


def test_has_aux_and_reference_signature():
    data = _data(seed=3)

    def optimality(params, l2reg, data):
        return jax.grad(ridge_objective)(params, l2reg, data)

    def program(impl):
        @impl.custom_root(optimality, has_aux=True, solve=TIGHT_CG, reference_signature=optimality)
        def ridge_solver(init_params, **kwargs):
            sol = closed_form_ridge(kwargs["l2reg"], kwargs["data"])
            return sol, {"norm": jnp.linalg.norm(sol)}

        def loss(lam):
            sol, aux = ridge_solver(None, l2reg=lam, data=data)
            return jnp.sum(sol), aux["norm"]

        return jax.grad(loss, has_aux=True)(0.5)

    (reference, reference_aux), (ours, aux) = run_both(program)
    expected = central_difference(lambda lam: jnp.sum(closed_form_ridge(lam, data)), 0.5)
    np.testing.assert_allclose(ours, expected, rtol=1e-7)
    np.testing.assert_allclose(ours, reference, rtol=1e-8)
    np.testing.assert_allclose(aux, reference_aux, rtol=1e-12)


@pytest.mark.parametrize(
    "solve_name", ["solve_cg", "solve_normal_cg", "solve_gmres", "solve_bicgstab", "solve_lu"]
)
def test_custom_fixed_point_with_each_jaxopt_linear_solve(solve_name):
    # A non-symmetric contraction T(x) = A x + b: x* = (I - A)^{-1} b, so
    # d x*/d b = (I - A)^{-1}. solve_cg assumes symmetry and is given the symmetric case.
    rng = np.random.default_rng(4)
    a = rng.normal(size=(5, 5))
    a = 0.5 * a / np.linalg.norm(a, 2)
    if solve_name == "solve_cg":
        a = 0.5 * (a + a.T)
    a, b = jnp.asarray(a), jnp.asarray(rng.normal(size=5))
    solve = getattr(jaxopt.linear_solve, solve_name)
    if solve_name != "solve_lu":
        solve = functools.partial(solve, tol=1e-12)

    def program(impl):
        def contraction(x, a, b):
            return a @ x + b

        @impl.custom_fixed_point(contraction, solve=solve)
        def fixed_point(init, a, b):
            return jax.lax.fori_loop(0, 200, lambda _, x: contraction(x, a, b), init)

        return jax.jacrev(fixed_point, argnums=(1, 2))(jnp.zeros(5), a, b)

    reference, ours = run_both(program)
    inverse = np.linalg.inv(np.eye(5) - np.asarray(a))
    np.testing.assert_allclose(ours[1], inverse, rtol=1e-8, atol=1e-12)
    x_star = inverse @ np.asarray(b)
    np.testing.assert_allclose(ours[0], np.einsum("ij,k->ijk", inverse, x_star), atol=1e-10)
    for r, o in zip(reference, ours, strict=True):
        np.testing.assert_allclose(o, r, rtol=1e-8, atol=1e-12)


def test_forward_mode_where_jaxopt_has_none():
    # jaxopt's custom_vjp cannot run jax.jacfwd; metaopt's rule can, and agrees with reverse.
    data = _data(seed=5)

    @metaopt.implicit.custom_root(jax.grad(ridge_objective), solve=TIGHT_CG)
    def ridge_solver(init_params, l2reg, data):
        del init_params
        return closed_form_ridge(l2reg, data)

    forward = jax.jacfwd(ridge_solver, argnums=1)(None, 4.0, data)
    reverse = jax.jacrev(ridge_solver, argnums=1)(None, 4.0, data)
    np.testing.assert_allclose(forward, reverse, rtol=1e-10)


# ----------------------------------------------------------------------------- root_vjp/jvp
@pytest.mark.parametrize("solve", ["default", "solve_cg"])
def test_root_vjp_and_root_jvp(solve):
    data = _data(seed=6)
    optimality = jax.grad(ridge_objective)
    sol = closed_form_ridge(1.5, data)
    cotangent = jnp.asarray(np.random.default_rng(7).normal(size=5))
    kwargs = {} if solve == "default" else {"solve": TIGHT_CG}

    def program(impl):
        vjp = impl.root_vjp(optimality, sol, (1.5, data), cotangent, **kwargs)
        jvp = impl.root_jvp(
            optimality, sol, (1.5, data), (1.0, jax.tree.map(jnp.zeros_like, data)), **kwargs
        )
        return vjp, jvp

    (reference_vjp, reference_jvp), (vjp, jvp) = run_both(program)
    # Independent reference: the closed form's derivative in l2reg, by finite differences.
    d_sol = central_difference(lambda lam: closed_form_ridge(lam, data), 1.5)
    rtol = 1e-4 if solve == "default" else 1e-7
    np.testing.assert_allclose(jvp, d_sol, rtol=rtol)
    np.testing.assert_allclose(vjp[0], cotangent @ d_sol, rtol=rtol)
    # The cotangent of the data, checked against reverse mode through the closed form.
    expected_data = jax.vjp(lambda d: closed_form_ridge(1.5, d), data)[1](cotangent)[0]
    for got, want in zip(jax.tree.leaves(vjp[1]), jax.tree.leaves(expected_data), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(jvp, reference_jvp, rtol=rtol)
    for got, want in zip(jax.tree.leaves(vjp), jax.tree.leaves(reference_vjp), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-10)


def test_misuse_names_the_argument_and_the_fix():
    optimality = jax.grad(ridge_objective)
    # jaxopt's second positional argument was has_aux; metaopt's is solve.
    with pytest.raises(TypeError, match="has_aux=True"):
        metaopt.implicit.custom_root(optimality, True)
    with pytest.raises(TypeError, match="reference_signature=3"):
        metaopt.implicit.custom_root(optimality, reference_signature=3)

    @metaopt.implicit.custom_root(optimality, reference_signature=optimality)
    def too_few_arguments(init_params, l2reg):
        return closed_form_ridge(l2reg, _data()) + 0.0 * init_params

    with pytest.raises(TypeError, match="missing a required argument: 'data'"):
        too_few_arguments(jnp.zeros(5), 1.0)
