"""The digits task: the split, and the MLP against a NumPy transcription of its equations."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt.tasks import accuracy, cross_entropy_loss, init_mlp, load_digits, mlp_apply

NUM_EXAMPLES, NUM_FEATURES, NUM_CLASSES = 1797, 64, 10


def _numpy_logits(params, x):
    h = np.asarray(x, np.float64)
    for layer in params[:-1]:
        h = np.maximum(h @ np.asarray(layer["w"]) + np.asarray(layer["b"]), 0.0)
    return h @ np.asarray(params[-1]["w"]) + np.asarray(params[-1]["b"])


def _numpy_cross_entropy(logits, y):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(len(y)), y].mean()


def test_load_digits_shapes_dtypes_and_labels():
    data = load_digits(seed=0, test_fraction=0.25)
    assert data.x_test.shape == (449, NUM_FEATURES)  # round(0.25 * 1797)
    assert data.x_train.shape == (NUM_EXAMPLES - 449, NUM_FEATURES)
    assert data.y_train.shape == (NUM_EXAMPLES - 449,) and data.y_test.shape == (449,)
    assert data.x_train.dtype == data.x_test.dtype == np.float32
    assert data.y_train.dtype == data.y_test.dtype == np.int32
    for labels in (data.y_train, data.y_test):
        assert set(np.unique(labels).tolist()) == set(range(NUM_CLASSES))


def test_load_digits_is_deterministic_given_the_seed():
    first, again, other = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.y_test, other.y_test)


def test_split_is_disjoint_and_covers_the_data_set():
    # The raw digits contain no two identical images, and standardization maps each column by
    # the same increasing affine map in both sets, so an example placed in both sets, or
    # twice in one, would show up as a repeated row.
    data = load_digits(seed=1)
    rows = np.concatenate([data.x_train, data.x_test])
    assert len(rows) == NUM_EXAMPLES
    assert len(np.unique(rows, axis=0)) == NUM_EXAMPLES
    labels = np.concatenate([data.y_train, data.y_test])
    from sklearn.datasets import load_digits as sklearn_load_digits

    np.testing.assert_array_equal(
        np.bincount(labels), np.bincount(sklearn_load_digits().target.astype(np.int64))
    )


def test_standardization_uses_training_statistics_only():
    data = load_digits(seed=0)
    train = data.x_train.astype(np.float64)
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-5)
    std = train.std(axis=0)
    constant = std < 1e-6  # pixels that are always blank in the training set
    assert 0 < constant.sum() < 10
    np.testing.assert_allclose(std[~constant], 1.0, rtol=1e-5)
    # Test statistics were not used: the test set is not centred exactly.
    assert np.abs(data.x_test.astype(np.float64).mean(axis=0)).max() > 0.05


@pytest.mark.parametrize("test_fraction", [0.0, 1.0, 1e-5, -0.1])
def test_load_digits_rejects_an_empty_split(test_fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=test_fraction)


def test_load_digits_without_scikit_learn_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
    with pytest.raises(ImportError, match=r'pip install "metaopt-jax\[examples\]"'):
        load_digits()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_init_mlp_shapes_dtypes_and_scale(dtype):
    sizes = [64, 512, 256, 10]
    params = init_mlp(jax.random.key(0), sizes, dtype=dtype)
    assert len(params) == 3
    for layer, fan_in, fan_out in zip(params, sizes[:-1], sizes[1:], strict=True):
        assert layer["w"].shape == (fan_in, fan_out) and layer["b"].shape == (fan_out,)
        assert layer["w"].dtype == layer["b"].dtype == dtype
        np.testing.assert_array_equal(layer["b"], 0.0)
    # He initialization; 32768 and 131072 samples estimate the std to well within 3%.
    for layer, fan_in in zip(params[:2], sizes[:2], strict=True):
        np.testing.assert_allclose(np.std(layer["w"]), np.sqrt(2.0 / fan_in), rtol=0.03)
    again = init_mlp(jax.random.key(0), sizes, dtype=dtype)
    jax.tree.map(np.testing.assert_array_equal, params, again)


@pytest.mark.parametrize("sizes", [[64], [], [64, 0, 10], [64, 32.0, 10]])
def test_init_mlp_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="sizes"):
        init_mlp(jax.random.key(0), sizes)


def test_mlp_loss_and_accuracy_match_numpy():
    data = load_digits(seed=0)
    params = init_mlp(jax.random.key(1), [64, 48, 32, 10], dtype=jnp.float64)
    x, y = data.x_test, data.y_test
    logits = _numpy_logits(params, x)
    np.testing.assert_allclose(mlp_apply(params, jnp.asarray(x, jnp.float64)), logits, rtol=1e-12)
    np.testing.assert_allclose(
        cross_entropy_loss(params, jnp.asarray(x, jnp.float64), y),
        _numpy_cross_entropy(logits, y),
        rtol=1e-12,
    )
    got = accuracy(params, jnp.asarray(x, jnp.float64), y)
    assert got.dtype == jnp.float32
    assert float(got) == pytest.approx(np.mean(logits.argmax(axis=1) == y), abs=1e-7)


def test_float32_data_and_params_stay_float32():
    data = load_digits(seed=0)
    params = init_mlp(jax.random.key(0), [64, 16, 10])
    assert mlp_apply(params, data.x_test).dtype == jnp.float32
    assert cross_entropy_loss(params, data.x_test, data.y_test).dtype == jnp.float32


def test_a_few_sgd_steps_decrease_the_loss():
    data = load_digits(seed=0)
    params = init_mlp(jax.random.key(0), [64, 64, 10])
    optimizer = optax.sgd(0.1)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(cross_entropy_loss)(params, data.x_train, data.y_train)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(20):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    final = float(cross_entropy_loss(params, data.x_train, data.y_train))
    assert np.all(np.diff(losses) < 0), losses
    assert final < 0.5 * losses[0]
    assert float(accuracy(params, data.x_test, data.y_test)) > 0.5  # chance is 0.1


def test_random_initialization_is_at_chance_accuracy():
    # One network's accuracy varies by about 4 points between seeds (ten balanced classes);
    # the mean over 20 seeds has a standard error under 1 point.
    data = load_digits(seed=0)
    accuracies = [
        float(accuracy(init_mlp(jax.random.key(seed), [64, 128, 10]), data.x_test, data.y_test))
        for seed in range(20)
    ]
    assert abs(np.mean(accuracies) - 1 / NUM_CLASSES) < 0.03, accuracies
