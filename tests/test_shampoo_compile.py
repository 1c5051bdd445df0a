"""Shampoo's compiled program: the root step stacks same-shaped blocks across tensors.

On a single CPU device (the default outside these tests, which simulate 8 devices) roots are
computed one matrix at a time in a loop; the loops must not multiply with the number of
parameter tensors, and stacking must not change the numbers. ``sequential_by_default`` is
patched to say True, as it does on one CPU device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaopt
from metaopt.optimizers import _shampoo_roots
from tests import shampoo_references as ref
from tests.test_shampoo import _assert_close, _directions, _problem, _shampoo


@pytest.fixture
def one_cpu_device(monkeypatch):
    monkeypatch.setattr(_shampoo_roots, "sequential_by_default", lambda: True)


def _layers(count):
    """``count`` [16, 8] weights and [16] biases, float32."""
    return {
        f"layer{i}": {"w": jnp.zeros((16, 8), jnp.float32), "b": jnp.zeros(16, jnp.float32)}
        for i in range(count)
    }


def _while_loops(optimizer, params):
    state = optimizer.init(params)
    lowered = jax.jit(optimizer.update).lower(params, state, params)
    return lowered.as_text().count("stablehlo.while")


@pytest.mark.parametrize("root_method", ["eigh", "newton"])
def test_root_loops_do_not_grow_with_the_number_of_tensors(one_cpu_device, root_method):
    # Blocks of 8: each weight is 2 x 1 blocks of 8 x 8 (left and right factor, p = 4), each
    # bias 2 blocks of 8 (p = 2). Before stacking, 2 layers lowered to 6 root loops and 8 to
    # 24 (one per tensor and axis).
    optimizer = metaopt.scale_by_shampoo(
        blocking=metaopt.Blocking(block_size=8), root_method=root_method
    )
    few, many = (_while_loops(optimizer, _layers(n)) for n in (2, 8))
    assert few == many, (few, many)
    assert few >= 1  # the roots are in the program


SAME_SHAPES = {
    # Several tensors whose blocks share a shape (stacked together) next to ones that do not
    # (a 3 x 3 left block, a padded 5-long vector), with p = 4 and p = 2 in separate stacks.
    "stacked": ({"a": (8, 4), "b": (4, 8), "c": (4, 4), "v": (5,), "u": (4,), "d": (3, 4)}, {}),
    "stacked_newton": (
        {"a": (8, 4), "b": (4, 8), "v": (5,), "u": (4,)},
        dict(root_method="newton"),
    ),
}


@pytest.mark.parametrize("case", sorted(SAME_SHAPES))
def test_stacked_roots_match_the_reference(one_cpu_device, case):
    shapes, extra = SAME_SHAPES[case]
    config = dict(block_size=4, preconditioning_frequency=2, merge_small_dimensions=False)
    params, grads = _problem(shapes, steps=5, seed=7)
    expected, failures = ref.shampoo_reference(params, grads, **config)
    got, state = _directions(_shampoo({**config, **extra}), params, grads)
    # Newton stops at a relative residual of 1e-6, so its roots are that far from exact.
    _assert_close(got, expected, rtol=1e-9 if not extra else 2e-5)
    assert failures == 0 and int(state.root_failures) == 0


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_stacked_roots_equal_the_roots_of_each_stack(one_cpu_device, method):
    rng = np.random.default_rng(0)

    def gram(*shape):
        g = rng.normal(size=(*shape, 2 * shape[-1])).astype(np.float32)
        return jnp.asarray(np.einsum("...ij,...kj->...ik", g, g))

    matrices = [gram(2, 3, 6), gram(6), gram(4, 6), gram(1, 3), gram(2, 6), gram(5, 3)]
    exponents = [4, 4, 2, 4, 4, 2]
    stacked = jax.jit(
        lambda ms: _shampoo_roots.stacked_inverse_roots(
            ms, exponents, damping=1e-6, epsilon=0.0, method=method
        )
    )(matrices)
    for m, p, (root, info) in zip(matrices, exponents, stacked, strict=True):
        alone, alone_info = jax.jit(
            lambda m, p=p: metaopt.matrix_inverse_pth_root(
                m, p, damping=1e-6, method=method, sequential=True
            )
        )(m)
        assert root.shape == m.shape and info.finite.shape == m.shape[:-2]
        if method == "eigh":
            np.testing.assert_array_equal(root, alone)
            np.testing.assert_array_equal(info.relative_error, alone_info.relative_error)
        else:
            # A stack of one is vectorized, not looped, and XLA multiplies a batch of one
            # with another kernel: Newton's float32 products then differ in the last bits.
            np.testing.assert_allclose(root, alone, rtol=2e-6, atol=2e-6 * np.abs(alone).max())


def test_the_step_has_one_conditional_and_a_skipped_step_keeps_the_state_bit_for_bit():
    # A non-finite step is skipped by selects, not by a conditional around the whole step (it
    # copied every state buffer and cost half an Adam step on a 4M-parameter MLP): the root
    # computation is the program's only conditional.
    optimizer = metaopt.scale_by_shampoo(
        blocking=metaopt.Blocking(block_size=8), preconditioning_frequency=2
    )
    params = _layers(2)
    compiled = jax.jit(optimizer.update).lower(params, optimizer.init(params), params).compile()
    assert compiled.as_text().count(" conditional(") == 1
    rng = np.random.default_rng(3)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        _, state = update(grads, state, params)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    updates, after = update(bad, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    unchanged = after._replace(skipped_steps=state.skipped_steps)
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(unchanged), strict=True):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    assert int(after.skipped_steps) == int(state.skipped_steps) + 1


def test_hypergradient_through_a_skipped_step_is_that_of_the_run_without_it():
    # The skipped step runs on a zeroed gradient, so no NaN reaches the arithmetic or its
    # derivative: d(loss)/d(learning rate) equals the clean run's, and is finite.
    target = jnp.asarray(np.random.default_rng(4).normal(size=(6, 5)))

    def loss(w):
        return 0.5 * jnp.sum((w - target) ** 2) + 0.1 * jnp.sum(w**4)

    def final_loss(learning_rate, nan_steps, steps):
        optimizer = metaopt.shampoo(
            learning_rate, blocking=metaopt.Blocking(block_size=4), preconditioning_frequency=2
        )
        w = jnp.zeros((6, 5))
        state = optimizer.init(w)
        for step in range(steps):
            g = jax.grad(loss)(w)
            if step in nan_steps:
                g = g.at[1, 1].set(jnp.nan)
            updates, state = optimizer.update(g, state, w)
            w = w + updates
        return loss(w)

    hypergradient = jax.jit(jax.grad(final_loss), static_argnums=(1, 2))
    with_nan = hypergradient(0.05, (2,), 5)
    clean = hypergradient(0.05, (), 4)  # one step fewer: the skipped one does not count
    assert np.isfinite(float(with_nan))
    np.testing.assert_allclose(float(with_nan), float(clean), rtol=1e-12)
