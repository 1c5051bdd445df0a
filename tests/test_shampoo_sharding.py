"""Shampoo and SOAP on a device mesh, and their configuration errors.

The root conftest simulates 8 CPU devices. With a parameter sharded along an axis whose blocks
divide evenly over the devices, the statistics are created sharded the same way, the compiled
update moves no parameter or statistic between devices (no all-gather, no all-to-all), each
device computes the roots of its own blocks only, and the numbers equal the unsharded run.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import metaopt

BLOCKING = metaopt.Blocking(block_size=32)


def _problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(256, 64))), "b": jnp.asarray(rng.normal(size=256))}
    grads = [
        jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params) for _ in range(5)
    ]
    mesh = Mesh(np.array(jax.devices()[:8]), ("devices",))
    shardings = {
        "w": NamedSharding(mesh, PartitionSpec("devices", None)),
        "b": NamedSharding(mesh, PartitionSpec("devices")),
    }
    return params, grads, shardings


TRANSFORMS = {
    "shampoo": lambda: metaopt.scale_by_shampoo(
        blocking=BLOCKING, preconditioning_frequency=2, start_preconditioning_step=1
    ),
    "soap": lambda: metaopt.scale_by_soap(
        preconditioning_frequency=2, blocking=metaopt.Blocking(block_size=32)
    ),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_state_is_sharded_like_the_parameters_and_results_match(name):
    params, grads, shardings = _problem()
    tx = TRANSFORMS[name]()
    sharded_params = jax.device_put(params, shardings)
    state = tx.init(sharded_params)
    # w is [256, 64] in 32-blocks: a grid of 8 x 2 blocks, the 8 along the sharded axis.
    stats_w = state.statistics["w"]
    assert [s.shape for s in stats_w] == [(8, 2, 32, 32)] * 2
    for s in stats_w:
        assert s.sharding.spec == PartitionSpec("devices", None, None, None)

    step = jax.jit(tx.update)
    expected_state = tx.init(params)
    # SOAP's first step divides by the rotated gradient, which is diagonal up to round-off in
    # bases built from that same gradient: entries of size 1e-16 / eps = 1e-8 relative, which
    # differ with the batch size of the eigendecomposition. Shampoo has no such division.
    atol = 1e-10 if name == "soap" else 1e-13
    for g in grads:
        expected, expected_state = step(g, expected_state)
        got, state = step(jax.device_put(g, shardings), state)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=atol), got, expected
        )
    assert got["w"].sharding.is_equivalent_to(shardings["w"], 2)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_update_moves_nothing_between_devices_and_spreads_the_matrix_work(name):
    params, grads, shardings = _problem()
    tx = TRANSFORMS[name]()
    state = tx.init(jax.device_put(params, shardings))
    hlo = jax.jit(tx.update).lower(jax.device_put(grads[0], shardings), state).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    # Every eigendecomposition works on this device's blocks: 16 blocks of w over 8 devices
    # give batches of 2, the 8 blocks of b batches of 1.
    batches = [
        int(shape.split(",")[0])
        for shape in re.findall(r"\(f64\[(\d+,32,32)\][^=]*custom_call_target=\"lapack_dsyevd", hlo)
    ]
    assert batches and max(batches) <= 2, batches


def test_blocks_that_do_not_divide_over_the_mesh_stay_replicated():
    mesh = Mesh(np.array(jax.devices()[:8]), ("devices",))
    w = jax.device_put(jnp.zeros((96, 8)), NamedSharding(mesh, PartitionSpec("devices", None)))
    state = metaopt.scale_by_shampoo(blocking=BLOCKING).init(w)  # 3 row blocks on 8 devices
    assert state.statistics[0].sharding.spec == PartitionSpec(None, None, None, None)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: metaopt.Blocking(block_size=0), "block_size=0"),
        (
            lambda: metaopt.Blocking(max_preconditioned_dimension=-3),
            "max_preconditioned_dimension=-3",
        ),
        (lambda: metaopt.Grafting("adamw"), "kind='adamw'"),
        (lambda: metaopt.Grafting("adam", b2=1.5), "b2=1.5"),
        (lambda: metaopt.shampoo(1e-3, b1=1.0), "b1=1.0"),
        (lambda: metaopt.shampoo(1e-3, b2=1.2), "b2=1.2"),
        (lambda: metaopt.shampoo(1e-3, damping=-1.0), "damping=-1.0"),
        (lambda: metaopt.shampoo(1e-3, preconditioning_frequency=0), "preconditioning_frequency=0"),
        (
            lambda: metaopt.shampoo(1e-3, start_preconditioning_step=2.5),
            "start_preconditioning_step=2.5",
        ),
        (lambda: metaopt.shampoo(1e-3, exponent_override=-2), "exponent_override=-2"),
        (lambda: metaopt.shampoo(1e-3, exponent_override=[2, -1]), "[2, -1]"),
        (lambda: metaopt.shampoo(1e-3, root_method="svd"), "root_method='svd'"),
        (lambda: metaopt.shampoo(1e-3, root_error_threshold=0.0), "root_error_threshold=0.0"),
        (lambda: metaopt.shampoo(1e-3, blocking=128), "blocking=128"),
        (lambda: metaopt.shampoo(1e-3, grafting="adam"), "Grafting('adam'"),
        (lambda: metaopt.soap(1e-3, b2=1.0), "b2=1.0"),
        (lambda: metaopt.soap(1e-3, preconditioning_frequency=0), "preconditioning_frequency=0"),
    ],
)
def test_bad_configuration_raises_naming_the_argument(make, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        make()


def test_inject_hyperparams_needs_no_static_args():
    # Integer frequencies become arrays under inject_hyperparams; they still work.
    tx = optax.inject_hyperparams(metaopt.shampoo)(learning_rate=0.1, preconditioning_frequency=2)
    w = jnp.ones((3, 2))
    state = tx.init(w)
    for _ in range(4):
        updates, state = jax.jit(tx.update)(2 * w, state, w)
        w = w + updates
    assert int(state.inner_state[0].count) == 4
    assert bool(jnp.all(jnp.isfinite(w)))


@pytest.mark.parametrize("factory", [metaopt.scale_by_shampoo, metaopt.scale_by_soap])
def test_several_cpu_devices_without_the_scheduler_flag_warn_when_traced(factory, monkeypatch):
    # Construction never warns (tests/test_side_effects.py); tracing batched roots on several
    # CPU devices, where jaxlib's batched LAPACK calls can deadlock, warns without the flag.
    assert jax.default_backend() == "cpu" and jax.device_count() > 1
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    params = {"w": jnp.ones((4, 6))}
    blocked = metaopt.Blocking(block_size=2)  # a stack of 2 x 3 blocks per side: batched
    tx = factory(preconditioning_frequency=1, blocking=blocked)
    state = tx.init(params)
    with pytest.warns(RuntimeWarning, match="prepare_cpu_environment"):
        jax.jit(tx.update).lower(params, state, params)
    metaopt.prepare_cpu_environment()
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in os.environ["XLA_FLAGS"]
    jax.jit(tx.update).lower(params, state, params)  # no warning: warnings are errors here
