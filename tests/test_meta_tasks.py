"""Meta-learning task samplers: shapes, the distributions they promise, episodes, jit, errors.

The ground truth is checked against independent computations: NumPy float64 for the
sinusoids and linear tasks, and the raw scikit-learn images (rotated with ``np.rot90`` and
standardized here) for the few-shot pools.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt.tasks import (
    FewShotPool,
    Task,
    digits_fewshot_pools,
    fewshot_tasks,
    linear_regression_tasks,
    sinusoid,
    sinusoid_tasks,
)

KEY = jax.random.key(0)


def _leaves_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


@pytest.fixture(scope="module")
def pools():
    return digits_fewshot_pools()


@pytest.fixture(scope="module")
def raw_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, np.float64), np.asarray(bunch.target)


# --- sinusoids ----------------------------------------------------------------------------------

# Most tests share one configuration of each sampler: its sizes are static, so every other
# configuration is one more compilation. Ranges, noise, spread and condition are traced.
SINUSOID = {"num_tasks": 2000, "shots": 5, "query_shots": 9}
LINEAR = {"num_tasks": 20_000, "dim": 3, "shots": 2, "query_shots": 4}
EPISODES = {"num_tasks": 2000, "ways": 5, "shots": 1, "query_shots": 15}


def test_sinusoid_shapes_and_dtypes():
    tasks = sinusoid_tasks(KEY, **SINUSOID)
    assert isinstance(tasks, Task)
    (x, y), (xq, yq) = tasks.support, tasks.query
    assert x.shape == y.shape == (2000, 5, 1) and xq.shape == yq.shape == (2000, 9, 1)
    assert tasks.info["amplitude"].shape == tasks.info["phase"].shape == (2000,)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(tasks))
    float64 = sinusoid_tasks(KEY, 3, shots=4, dtype=jnp.float64)
    assert float64.query[0].shape == (3, 4, 1)  # query_shots=None means shots
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(float64))


def test_sinusoid_targets_are_the_sine_of_the_ground_truth():
    tasks = sinusoid_tasks(KEY, **SINUSOID)
    a = tasks.info["amplitude"][:, None, None]
    phi = tasks.info["phase"][:, None, None]
    for x, y in (tasks.support, tasks.query):
        np.testing.assert_array_equal(y, a * jnp.sin(x - phi))  # the same float32 operations
        np.testing.assert_array_equal(y, sinusoid(x, a, phi))
        reference = np.float64(a) * np.sin(np.float64(x) - np.float64(phi))
        # float32 rounding of x - phase (|x - phase| <= 8), of the sine and of the product by
        # A <= 5: a few units of 2**-24 relative, times 5 * 8 at most.
        np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5)
    # Support and query inputs are drawn independently.
    assert not np.array_equal(tasks.support[0], tasks.query[0][:, :5])


def test_sinusoid_parameters_fill_their_ranges():
    ranges = {"amplitude": (1.0, 2.0), "phase": (-1.0, 0.5), "x_range": (3.0, 4.0)}
    tasks = sinusoid_tasks(KEY, **SINUSOID, **ranges)
    for values, (low, high) in (
        (tasks.info["amplitude"], ranges["amplitude"]),
        (tasks.info["phase"], ranges["phase"]),
        (tasks.support[0], ranges["x_range"]),
        (tasks.query[0], ranges["x_range"]),
    ):
        values = np.asarray(values)
        assert values.min() >= low and values.max() <= high
        # At least 2000 uniform draws come within 1% of both ends (failure probability
        # 0.99**2000 < 1e-8) and have a mean within 3% of the width of the centre (the
        # standard error is 0.65%).
        width = high - low
        assert values.min() < low + 0.01 * width and values.max() > high - 0.01 * width
        assert abs(values.mean() - (low + high) / 2) < 0.03 * width


def test_sinusoid_default_ranges_are_the_papers():
    tasks = sinusoid_tasks(KEY, **SINUSOID)
    a, phi, x = (np.asarray(v) for v in (*tasks.info.values(), tasks.support[0]))
    assert 0.1 <= a.min() < 0.2 and 4.9 < a.max() <= 5.0
    assert 0.0 <= phi.min() < 0.05 and np.pi - 0.05 < phi.max() <= np.pi
    assert -5.0 <= x.min() < -4.98 and 4.98 < x.max() <= 5.0


def test_sinusoid_is_deterministic_given_the_key():
    first = sinusoid_tasks(KEY, **SINUSOID)
    assert _leaves_equal(first, sinusoid_tasks(jax.random.key(0), **SINUSOID))
    other = sinusoid_tasks(jax.random.key(1), **SINUSOID)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other), strict=True):
        assert not np.array_equal(a, b)


# --- linear regression --------------------------------------------------------------------------


def test_linear_shapes_dtypes_and_noiseless_targets():
    tasks = linear_regression_tasks(KEY, **LINEAR, condition=30.0)
    (x, y), (xq, yq) = tasks.support, tasks.query
    w = np.float64(tasks.info["weights"])
    assert x.shape == (20_000, 2, 3) and y.shape == (20_000, 2)
    assert xq.shape == (20_000, 4, 3) and yq.shape == (20_000, 4) and w.shape == (20_000, 3)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(tasks))
    for inputs, targets in (tasks.support, tasks.query):
        reference = np.einsum("tnd,td->tn", np.float64(inputs), w)
        np.testing.assert_allclose(targets, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("condition", [1.0, 100.0])
def test_linear_input_covariance_is_diag_of_geometric_variances(condition):
    dim, n = 4, 40_000
    tasks = linear_regression_tasks(
        KEY, 1, dim=dim, shots=n, condition=condition, dtype=jnp.float64
    )
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(tasks))
    assert tasks.query[0].shape == (1, n, dim)  # query_shots=None means shots
    x = np.asarray(tasks.support[0][0])
    variances = condition ** (-np.arange(dim) / (dim - 1))  # 1 down to 1/condition
    covariance = x.T @ x / n
    # A variance estimate from n Gaussian samples has a relative standard error sqrt(2/n) =
    # 0.7%; 4% is more than 5 of them, and an off-by-one in the exponent, s_i = kappa**(-i/d)
    # (smallest variance 0.032 instead of 0.01), fails, as do standard deviations taken for
    # variances.
    np.testing.assert_allclose(np.diag(covariance), variances, rtol=0.04)
    correlation = covariance / np.sqrt(np.outer(variances, variances))
    off_diagonal = correlation[~np.eye(dim, dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.03  # standard error 1/sqrt(n) = 0.005
    if condition == 1.0:
        np.testing.assert_allclose(np.diag(covariance), 1.0, rtol=0.04)


def test_linear_weights_spread_around_the_center_and_noise_has_its_scale():
    center = jnp.array([1.0, -2.0, 0.5])
    tasks = linear_regression_tasks(KEY, **LINEAR, spread=0.5, noise=0.3, center=center)
    w = np.float64(tasks.info["weights"])
    np.testing.assert_allclose(w.mean(axis=0), center, atol=0.02)  # 5 standard errors
    np.testing.assert_allclose(w.std(axis=0), 0.5, rtol=0.03)
    x, y = (np.float64(v) for v in tasks.query)
    residual = y - np.einsum("tnd,td->tn", x, w)
    np.testing.assert_allclose(residual.std(), 0.3, rtol=0.02)
    # The centre shifts the same draw: the rest of the sampler does not depend on it.
    uncentred = linear_regression_tasks(KEY, **LINEAR, spread=0.5, noise=0.3)
    np.testing.assert_allclose(w - np.float64(center), uncentred.info["weights"], atol=1e-6)


def test_linear_is_deterministic_given_the_key():
    first = linear_regression_tasks(KEY, **LINEAR, noise=0.1)
    assert _leaves_equal(first, linear_regression_tasks(jax.random.key(0), **LINEAR, noise=0.1))
    other = linear_regression_tasks(jax.random.key(1), **LINEAR, noise=0.1)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other), strict=True):
        assert not np.array_equal(a, b)


# --- few-shot digits ----------------------------------------------------------------------------


def _digits_of(pool):
    return {int(name.split("@")[0]) for name in pool.names}


def test_pools_split_the_digits_and_count_their_images(pools, raw_digits):
    train, test = pools
    assert isinstance(train, FewShotPool)
    assert _digits_of(train) == set(range(7)) and _digits_of(test) == {7, 8, 9}
    assert not set(train.names) & set(test.names)
    assert len(train.names) == 28 and len(test.names) == 12
    assert train.images.dtype == jnp.float32 and train.counts.dtype == jnp.int32
    assert train.images.shape == (28, int(train.counts.max()), 64)
    _, labels = raw_digits
    for pool in pools:
        for name, count in zip(pool.names, pool.counts.tolist(), strict=True):
            assert count == np.sum(labels == int(name.split("@")[0]))
            assert not np.any(pool.images[pool.names.index(name), count:])  # zero padding
    custom_train, custom_test = digits_fewshot_pools(test_digits=(0, 5), rotations=(0, 180))
    assert custom_test.names == ("0@0", "0@180", "5@0", "5@180")
    assert _digits_of(custom_train) == {1, 2, 3, 4, 6, 7, 8, 9}
    assert len(custom_train.names) == 16


def test_pool_classes_are_standardized_rotations_of_the_raw_digits(pools, raw_digits):
    images, labels = raw_digits
    train_pixels = images[labels < 7]
    mean, std = train_pixels.mean(), train_pixels.std()
    for pool in pools:
        for index, name in enumerate(pool.names):
            digit, degrees = (int(part) for part in name.split("@"))
            count = int(pool.counts[index])
            rotated = np.rot90(images[labels == digit], k=degrees // 90, axes=(1, 2))
            expected = ((rotated - mean) / std).reshape(count, 64)
            np.testing.assert_allclose(pool.images[index, :count], expected, rtol=1e-6, atol=1e-6)
    # The meta-training pool is standardized: scalar mean 0 and standard deviation 1.
    train = pools[0]
    valid = np.concatenate(
        [np.asarray(train.images[c, :n]) for c, n in enumerate(train.counts.tolist())]
    ).astype(np.float64)
    np.testing.assert_allclose([valid.mean(), valid.std()], [0.0, 1.0], atol=1e-6)


def test_pools_are_deterministic(pools):
    assert _leaves_equal(pools, digits_fewshot_pools())


@pytest.mark.parametrize("which", ["train, 5-way 1-shot", "test, 3-way 4-shot"])
def test_episodes_draw_distinct_valid_images_of_the_labelled_classes(pools, which):
    if which.startswith("train"):  # the shared configuration, one compilation fewer
        pool, sizes = pools[0], EPISODES
    else:
        pool, sizes = pools[1], {"num_tasks": 6, "ways": 3, "shots": 4, "query_shots": 2}
    num_tasks, ways, shots, query_shots = sizes.values()
    tasks = fewshot_tasks(KEY, pool, **sizes)
    (x, y), (xq, yq) = (tuple(np.asarray(a) for a in pair) for pair in (tasks.support, tasks.query))
    classes = np.asarray(tasks.info["classes"])
    assert x.shape == (num_tasks, ways * shots, 64) and x.dtype == np.float32
    assert xq.shape == (num_tasks, ways * query_shots, 64)
    assert y.shape == (num_tasks, ways * shots) and yq.shape == (num_tasks, ways * query_shots)
    assert y.dtype == yq.dtype == classes.dtype == np.int32
    assert classes.shape == (num_tasks, ways)
    images, counts = np.asarray(pool.images), np.asarray(pool.counts)
    for t in range(6):  # the first few episodes, image by image
        assert len(set(classes[t].tolist())) == ways
        np.testing.assert_array_equal(np.sort(y[t]), np.repeat(np.arange(ways), shots))
        np.testing.assert_array_equal(np.sort(yq[t]), np.repeat(np.arange(ways), query_shots))
        drawn = {label: [] for label in range(ways)}
        for inputs, labels in ((x[t], y[t]), (xq[t], yq[t])):
            for row, label in zip(inputs, labels, strict=True):
                c = classes[t, label]
                matches = np.flatnonzero((images[c, : counts[c]] == row).all(axis=1))
                assert len(matches) == 1, "an image is not one of its class's valid images"
                drawn[label].append(int(matches[0]))
        for indices in drawn.values():
            assert len(set(indices)) == shots + query_shots  # no image drawn twice


def test_rows_of_each_class_are_unique(pools):
    # The precondition of the matching above: a row identifies one image of its class.
    for pool in pools:
        for c, n in enumerate(pool.counts.tolist()):
            assert len(np.unique(np.asarray(pool.images[c, :n]), axis=0)) == n


def test_episodes_choose_classes_and_labels_uniformly(pools):
    num_tasks, ways = EPISODES["num_tasks"], EPISODES["ways"]
    classes = np.asarray(fewshot_tasks(KEY, pools[0], **EPISODES).info["classes"])
    # Each class is in an episode with probability 5/28: 357 expected, standard deviation 17.
    frequency = np.bincount(classes.ravel(), minlength=28)
    assert np.abs(frequency - num_tasks * ways / 28).max() < 90
    # Label 0 goes to any class equally often: 71 expected, standard deviation 8.2.
    assert np.abs(np.bincount(classes[:, 0], minlength=28) - num_tasks / 28).max() < 42


def test_episodes_are_deterministic_given_the_key(pools):
    first = fewshot_tasks(KEY, pools[0], **EPISODES)
    assert _leaves_equal(first, fewshot_tasks(jax.random.key(0), pools[0], **EPISODES))
    other = fewshot_tasks(jax.random.key(1), pools[0], **EPISODES)
    assert not np.array_equal(first.support[0], other.support[0])


# --- jit, vmap, batching ------------------------------------------------------------------------


def test_samplers_under_jit_equal_eager(pools):
    # The eager calls compile the same XLA program (see _regression.py), so the bits agree.
    samplers = [
        lambda key: sinusoid_tasks(key, **SINUSOID, amplitude=(0.5, 1.0)),
        lambda key: fewshot_tasks(key, pools[0], **EPISODES),
    ]
    for sample in samplers:
        compiled = jax.jit(sample)
        assert _leaves_equal(compiled(KEY), sample(KEY))
        assert _leaves_equal(compiled(jax.random.key(7)), sample(jax.random.key(7)))
    # The linear sampler, with its centre traced as well.
    linear = lambda key, c: linear_regression_tasks(
        key, **LINEAR, noise=0.1, condition=10.0, center=c
    )
    center = jnp.array([1.0, 2.0, 3.0], jnp.float32)
    assert _leaves_equal(jax.jit(linear)(KEY, center), linear(KEY, center))


def test_a_batch_of_tasks_vmaps_and_indexes_task_by_task():
    tasks = linear_regression_tasks(KEY, **LINEAR, noise=0.5)

    def loss(task):  # one task, no task axis
        (x, y), _, info = task
        return jnp.mean((x @ info["weights"] - y) ** 2)

    per_task = jax.vmap(loss)(tasks)
    assert per_task.shape == (20_000,)
    third = jax.tree.map(lambda leaf: leaf[2], tasks)
    assert isinstance(third, Task) and third.support[0].shape == (2, 3)
    assert loss(third) == pytest.approx(float(per_task[2]), abs=1e-6)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_tasks": 0}, "num_tasks"),
        ({"num_tasks": 2.0}, "num_tasks"),
        ({"shots": 0}, "shots"),
        ({"query_shots": -1}, "query_shots"),
        ({"amplitude": (-1.0, 2.0)}, "amplitude"),
        ({"amplitude": (3.0, 2.0)}, "amplitude"),
        ({"amplitude": 5.0}, "amplitude"),
        ({"phase": (1.0, 0.0)}, "phase"),
        ({"x_range": (0.0, float("nan"))}, "x_range"),
        ({"dtype": jnp.int32}, "dtype"),
    ],
)
def test_sinusoid_rejects_bad_arguments(kwargs, name):
    arguments = {"num_tasks": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name} must .*got {name}="):
        sinusoid_tasks(KEY, **arguments)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_tasks": -3}, "num_tasks"),
        ({"dim": 0}, "dim"),
        ({"shots": True}, "shots"),
        ({"query_shots": 0}, "query_shots"),
        ({"noise": -0.1}, "noise"),
        ({"spread": -1.0}, "spread"),
        ({"condition": 0.5}, "condition"),
        ({"condition": float("inf")}, "condition"),
        ({"dim": 1, "condition": 2.0}, "condition"),
        ({"dim": 3, "center": jnp.zeros(4)}, "center"),
        ({"dtype": jnp.int32}, "dtype"),
    ],
)
def test_linear_rejects_bad_arguments(kwargs, name):
    arguments = {"num_tasks": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name} must .*got "):
        linear_regression_tasks(KEY, **arguments)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"test_digits": ()}, "test_digits"),
        ({"test_digits": (7, 7)}, "test_digits"),
        ({"test_digits": (10,)}, "test_digits"),
        ({"test_digits": tuple(range(10))}, "test_digits"),
        ({"rotations": (45,)}, "rotations"),
        ({"rotations": (0, 0)}, "rotations"),
    ],
)
def test_pools_reject_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must .*got {name}="):
        digits_fewshot_pools(**kwargs)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"num_tasks": 0}, r"^num_tasks must .*got num_tasks=0"),
        ({"ways": 0}, r"^ways must .*got ways=0"),
        ({"ways": 13}, r"^ways must be at most .* 12, got ways=13"),
        ({"shots": 0}, r"^shots must .*got shots=0"),
        ({"query_shots": 0}, r"^query_shots must .*got query_shots=0"),
        ({"shots": 100, "query_shots": 75}, r"^shots \+ query_shots must be at most 174"),
    ],
)
def test_episodes_reject_bad_arguments(pools, kwargs, pattern):
    arguments = {"num_tasks": 2, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        fewshot_tasks(KEY, pools[1], **arguments)


def test_episodes_reject_a_traced_pool(pools):
    with pytest.raises(TypeError, match=r"^pool must hold concrete arrays"):
        jax.jit(lambda counts: fewshot_tasks(KEY, pools[0]._replace(counts=counts), 2))(
            pools[0].counts
        )


def test_pools_without_scikit_learn_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
    with pytest.raises(ImportError, match=r'pip install "metaopt-jax\[examples\]"'):
        digits_fewshot_pools()
