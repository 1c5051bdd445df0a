"""Inverse p-th roots against NumPy eigh for every p from 1 to 8, and on hard inputs."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.optimizers import eigenbasis, matrix_inverse_pth_root, refresh_eigenbasis


def _spd(n, seed, condition):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, 1.0 / condition, n)) @ q.T


def _numpy_root(matrix, p, damping=0.0):
    values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    values = np.maximum(values, 0.0)
    values = values + damping * values.max()
    return (vectors * values ** (-1.0 / p)) @ vectors.T


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", range(1, 9))
def test_matches_numpy_for_every_p(p, method):
    matrix = _spd(12, seed=p, condition=100.0)
    root, info = matrix_inverse_pth_root(
        jnp.asarray(matrix), p, damping=1e-4, method=method, newton_tol=1e-12
    )
    expected = _numpy_root(matrix, p, damping=1e-4)
    np.testing.assert_allclose(root, expected, rtol=1e-8, atol=1e-10)
    assert float(info.relative_error) < 1e-8 and bool(info.finite)
    if method == "newton":
        assert 0 < int(info.iterations) < 100


def test_float32_ill_conditioned_is_retried_in_float64():
    matrix = jnp.asarray(_spd(32, seed=10, condition=1e8), jnp.float32)
    root, info = matrix_inverse_pth_root(matrix, 4, damping=0.0)
    # The reference is the exact root of the float32 matrix as given (rounding the input to
    # float32 already moves its small eigenvalues).
    expected = _numpy_root(np.asarray(matrix, np.float64), 4)
    assert bool(info.finite) and bool(info.used_float64) and root.dtype == jnp.float32
    np.testing.assert_allclose(root, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    # Without the retry float32 reports its own, larger, error instead of hiding it.
    _, plain = matrix_inverse_pth_root(
        jnp.asarray(matrix, jnp.float32), 4, damping=0.0, retry_tol=None
    )
    assert not bool(plain.used_float64) and float(plain.relative_error) > float(info.relative_error)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_rank_deficient_and_zero_matrices_give_no_nan(method):
    rng = np.random.default_rng(11)
    low_rank = rng.normal(size=(10, 3))
    matrix = jnp.asarray(low_rank @ low_rank.T)
    root, info = matrix_inverse_pth_root(matrix, 2, damping=1e-6, method=method)
    assert bool(info.finite) and np.all(np.isfinite(root))
    np.testing.assert_allclose(root, _numpy_root(np.asarray(matrix), 2, 1e-6), rtol=1e-6)
    zero_root, zero_info = matrix_inverse_pth_root(jnp.zeros((5, 5)), 3, method=method)
    np.testing.assert_array_equal(zero_root, np.zeros((5, 5)))
    assert bool(zero_info.finite) and float(zero_info.relative_error) == 0.0


def test_p_equal_three_is_correct_where_optax_is_not_required():
    # A regression guard for the failure mode reported for optax's root at p = 3.
    matrix = _spd(16, seed=12, condition=1e3)
    root, _ = matrix_inverse_pth_root(jnp.asarray(matrix), 3, damping=0.0)
    np.testing.assert_allclose(
        np.linalg.matrix_power(np.asarray(root), 3) @ matrix, np.eye(16), atol=1e-8
    )


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_batched_blocks_equal_a_loop(method):
    blocks = np.stack([_spd(6, seed=s, condition=50.0) for s in range(6)]).reshape(2, 3, 6, 6)
    roots, info = jax.jit(lambda m: matrix_inverse_pth_root(m, 4, method=method))(
        jnp.asarray(blocks)
    )
    assert roots.shape == (2, 3, 6, 6) and info.relative_error.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            single, _ = matrix_inverse_pth_root(jnp.asarray(blocks[i, j]), 4, method=method)
            np.testing.assert_allclose(roots[i, j], single, rtol=1e-10, atol=1e-12)


def test_damping_is_relative_to_the_largest_eigenvalue():
    matrix = jnp.diag(jnp.array([100.0, 1.0, 0.0]))
    root, _ = matrix_inverse_pth_root(matrix, 2, damping=0.01)
    np.testing.assert_allclose(jnp.diag(root), [101.0**-0.5, 2.0**-0.5, 1.0**-0.5], rtol=1e-10)
    root, _ = matrix_inverse_pth_root(matrix, 2, damping=0.0, epsilon=1.0)
    np.testing.assert_allclose(jnp.diag(root), [101.0**-0.5, 2.0**-0.5, 1.0], rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(p=0), "p"),
        (dict(p=2, damping=-1.0), "damping"),
        (dict(p=2, epsilon=-1.0), "epsilon"),
        (dict(p=2, method="svd"), "method"),
    ],
)
def test_bad_configuration_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        matrix_inverse_pth_root(jnp.eye(3), **kwargs)
    with pytest.raises(ValueError, match="shape"):
        matrix_inverse_pth_root(jnp.ones((3, 4)), 2)


def _psd_direction(n, seed):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, 3))
    return h @ h.T


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_derivative_matches_finite_differences(p, method):
    # Full rank: central differences in a symmetric direction and in the damping.
    matrix = jnp.asarray(_spd(6, seed=p, condition=50.0))
    rng = np.random.default_rng(p)
    direction = rng.normal(size=(6, 6))
    direction = jnp.asarray(direction + direction.T)

    def root(t, damping):
        return matrix_inverse_pth_root(
            matrix + t * direction,
            p,
            damping=damping,
            epsilon=1e-3,
            method=method,
            newton_tol=1e-13,
        )[0]

    h = 1e-6
    tangent = jax.jvp(lambda t: root(t, 1e-2), (0.0,), (1.0,))[1]
    numeric = (root(h, 1e-2) - root(-h, 1e-2)) / (2 * h)
    np.testing.assert_allclose(tangent, numeric, rtol=1e-6, atol=1e-8)
    tangent = jax.jvp(lambda d: root(0.0, d), (1e-2,), (1.0,))[1]
    numeric = (root(0.0, 1e-2 + h) - root(0.0, 1e-2 - h)) / (2 * h)
    np.testing.assert_allclose(tangent, numeric, rtol=1e-6, atol=1e-8)
    # Reverse mode is the transpose of the same linear map.
    cotangent = jnp.asarray(rng.normal(size=(6, 6)))
    gradient = jax.grad(lambda t: jnp.sum(cotangent * root(t, 1e-2)))(0.0)
    np.testing.assert_allclose(gradient, jnp.sum(cotangent * tangent_at_zero(root)), rtol=1e-9)


def tangent_at_zero(root):
    return jax.jvp(lambda t: root(t, 1e-2), (0.0,), (1.0,))[1]


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_derivative_is_finite_and_right_at_repeated_eigenvalues(method):
    # Rank 2 of 6: four zero eigenvalues, where differentiating through eigh gives NaN. The
    # matrix function is smooth there; compare with one-sided differences in a PSD direction.
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 2))
    matrix = jnp.asarray(g @ g.T)
    direction = jnp.asarray(_psd_direction(6, 1))

    def root(t):
        return matrix_inverse_pth_root(
            matrix + t * direction, 4, damping=1e-2, epsilon=1e-3, method=method, newton_tol=1e-13
        )[0]

    tangent = jax.jvp(root, (0.0,), (1.0,))[1]
    h = 1e-7
    numeric = (-3 * root(0.0) + 4 * root(h) - root(2 * h)) / (2 * h)  # second-order one-sided
    assert bool(jnp.all(jnp.isfinite(tangent)))
    np.testing.assert_allclose(tangent, numeric, rtol=1e-5, atol=1e-6)
    naive = jax.jvp(
        lambda t: _eigh_root_without_custom_derivative(matrix + t * direction), (0.0,), (1.0,)
    )[1]
    # Through eigh the zero eigenvalues' round-off gaps (1e-16) enter as 1/gap: garbage or NaN.
    error = np.max(np.abs(np.asarray(naive) - np.asarray(numeric))) / np.max(np.abs(numeric))
    assert not error < 0.1, "differentiating through eigh was expected to fail here"


def _eigh_root_without_custom_derivative(matrix):
    values, vectors = jnp.linalg.eigh(matrix)
    shift = 1e-2 * values[-1] + 1e-3
    return (vectors * (jnp.maximum(values, 0.0) + shift) ** -0.25) @ vectors.T


def test_eigenbasis_sorts_by_decreasing_eigenvalue():
    matrix = _spd(7, seed=3, condition=30.0)
    basis = eigenbasis(jnp.asarray(matrix))
    values = np.diag(np.asarray(basis).T @ matrix @ np.asarray(basis))
    np.testing.assert_allclose(values, np.sort(np.linalg.eigvalsh(matrix))[::-1], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(basis).T @ np.asarray(basis), np.eye(7), atol=1e-12)


def test_refresh_eigenbasis_converges_and_reports_its_permutation():
    matrix = jnp.asarray(_spd(6, seed=4, condition=1e3))
    rng = np.random.default_rng(5)
    start, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    basis = jnp.asarray(start)
    estimates = np.diag(start.T @ np.asarray(matrix) @ start)
    refreshed, order = refresh_eigenbasis(matrix, basis)
    np.testing.assert_array_equal(order, np.argsort(-estimates, kind="stable"))
    for _ in range(300):
        basis, _ = refresh_eigenbasis(matrix, basis)
    exact = np.asarray(eigenbasis(matrix))
    # Same columns up to sign: |Q^T Q_exact| is the identity.
    np.testing.assert_allclose(np.abs(np.asarray(basis).T @ exact), np.eye(6), atol=1e-8)
    assert refreshed.shape == basis.shape


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_sequential_equals_vectorized_in_value_and_derivative(method):
    blocks = jnp.asarray(np.stack([_spd(10, seed=s, condition=30.0) for s in range(6)]))
    blocks = blocks.reshape(2, 3, 10, 10)

    def total(m, damping, sequential):
        root, _ = matrix_inverse_pth_root(
            m, 4, damping=damping, method=method, newton_tol=1e-12, sequential=sequential
        )
        return jnp.sum(jnp.sin(root))

    for argnums in (0, 1):
        grads = [
            jax.jit(jax.grad(total, argnums), static_argnums=2)(blocks, 1e-3, sequential)
            for sequential in (False, True)
        ]
        np.testing.assert_allclose(grads[1], grads[0], rtol=1e-10, atol=1e-14)
    roots = [
        matrix_inverse_pth_root(blocks, 4, method=method, sequential=sequential)[0]
        for sequential in (False, True)
    ]
    np.testing.assert_allclose(roots[1], roots[0], rtol=1e-10, atol=1e-14)


def test_sequential_eigenbases_equal_vectorized():
    blocks = jnp.asarray(np.stack([_spd(7, seed=s, condition=10.0) for s in range(4)]))
    basis = jnp.asarray(
        np.stack([np.linalg.qr(_spd(7, seed=9 + s, condition=2.0))[0] for s in range(4)])
    )
    for sequential in (False, True):
        got = eigenbasis(blocks, sequential=sequential)
        np.testing.assert_allclose(
            jnp.abs(got), jnp.abs(eigenbasis(blocks, sequential=False)), rtol=1e-10, atol=1e-12
        )
    vectorized = refresh_eigenbasis(blocks, basis, sequential=False)
    sequential = refresh_eigenbasis(blocks, basis, sequential=True)
    np.testing.assert_array_equal(sequential[1], vectorized[1])
    np.testing.assert_allclose(sequential[0], vectorized[0], rtol=1e-10, atol=1e-12)


def test_error_estimate_matches_the_exact_norm():
    # The estimate on 8 sign vectors against the exact RMS norm of X^p A - I, for roots that are
    # wrong by known amounts: Newton stopped after k iterations (no damping, so the damped matrix
    # is A itself).
    matrix = jnp.asarray(_spd(64, seed=3, condition=1e3))
    for iterations in (2, 4, 6, 8):
        root, info = matrix_inverse_pth_root(
            matrix, 4, damping=0.0, method="newton", newton_max_iterations=iterations
        )
        deviation = np.linalg.matrix_power(np.asarray(root), 4) @ np.asarray(matrix) - np.eye(64)
        exact = np.linalg.norm(deviation) / 8.0
        assert exact > 1e-3, exact  # each case needs a visible error
        assert 0.5 * exact < float(info.relative_error) < 2.0 * exact, (iterations, exact)


def test_single_cpu_device_computes_roots_one_at_a_time_without_deadlock():
    # jaxlib 0.10.2: this program, vectorized, hung 3 runs of 3 (asleep, 1 s of CPU in 30 s) on
    # one CPU device; one matrix at a time, the default there, ran its 300 calls in 5 s. It must not
    # hang even without prepare_cpu_environment's scheduler flag.
    script = textwrap.dedent(
        """
        import faulthandler
        import jax, jax.numpy as jnp, numpy as np
        from metaopt.optimizers import matrix_inverse_pth_root
        from metaopt.optimizers._matrix_root import sequential_by_default
        assert sequential_by_default(), (jax.default_backend(), jax.device_count())
        a = np.random.default_rng(0).standard_normal((8, 128, 128)).astype(np.float32)
        a = jnp.asarray(a @ np.swapaxes(a, -1, -2))
        f = jax.jit(lambda a: (matrix_inverse_pth_root(a, 4)[0],
                               matrix_inverse_pth_root(2 * a, 2)[0]))
        faulthandler.dump_traceback_later(60, exit=True)
        for _ in range(300):
            jax.block_until_ready(f(a))
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_indefinite_input_is_reported(method, dtype):
    # eigh roots the PSD part (eigenvalues clipped at 0); before, it reported that root's own
    # error, 3e-8, as if diag(-5, 1, 2) had been rooted.
    _, info = matrix_inverse_pth_root(
        jnp.diag(jnp.array([-5.0, 1.0, 2.0], dtype)), 2, method=method
    )
    assert float(info.relative_error) > 1e3, info
    # Shampoo's acceptance test (finite and error <= root_error_threshold) rejects it.
    assert not (bool(info.finite) and float(info.relative_error) <= 0.5)
    negative_definite = jnp.diag(jnp.array([-1.0, -2.0], dtype))
    _, info = matrix_inverse_pth_root(negative_definite, 2, method=method)
    assert float(info.relative_error) >= 1.0


def test_round_off_negative_eigenvalues_of_bfloat16_statistics_are_accepted():
    # A rank-4 Gram matrix rounded to bfloat16 has negative eigenvalues near -1e-3 of the
    # largest: round-off, clipped, and the root of the clipped matrix is accepted.
    rng = np.random.default_rng(20)
    g = rng.normal(size=(64, 4))
    rounded = jnp.asarray(g @ g.T, jnp.bfloat16).astype(jnp.float32)
    values = np.linalg.eigvalsh(np.asarray(rounded, np.float64))
    assert -1e-2 < values[0] / values[-1] < -1e-4
    root, info = matrix_inverse_pth_root(rounded, 4, damping=1e-3)
    assert bool(info.finite) and float(info.relative_error) < 1e-3
    expected = _numpy_root(np.asarray(rounded, np.float64), 4, damping=1e-3)
    difference = np.linalg.norm(np.asarray(root, np.float64) - expected)
    assert difference <= 2e-4 * np.linalg.norm(expected), difference / np.linalg.norm(expected)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize(
    "entry", [(0, 0, np.inf), (0, 0, -np.inf), (1, 1, np.nan), (0, 1, np.inf)], ids=str
)
def test_non_finite_input_is_reported(method, dtype, entry):
    # Before, eigh returned a zero root with error 0 and finite=True for an Inf or NaN on the
    # diagonal.
    i, j, value = entry
    matrix = jnp.asarray(_spd(4, seed=21, condition=10.0), dtype).at[i, j].set(value)
    _, info = matrix_inverse_pth_root(matrix, 2, method=method)
    assert not bool(info.finite) and float(info.relative_error) == np.inf
    assert not bool(info.used_float64)  # no float64 retry for an input that cannot be rooted


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_float32_extreme_scales_match_numpy(method, scale):
    # Before, Newton's float32 Frobenius norm overflowed (underflowed) and it returned a zero
    # root with error 0.
    matrix = jnp.asarray(_spd(12, seed=22, condition=100.0) * scale, jnp.float32)
    root, info = matrix_inverse_pth_root(matrix, 2, damping=1e-6, method=method, retry_tol=None)
    expected = _numpy_root(np.asarray(matrix, np.float64), 2, damping=1e-6)
    assert bool(info.finite) and float(info.relative_error) < 1e-4
    np.testing.assert_allclose(root, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
