"""Inverse p-th roots against NumPy eigh for every p from 1 to 8, and on hard inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.optimizers import matrix_inverse_pth_root


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
