"""Shampoo and SOAP inside optax: state layout for ``optax.tree_map_params``, clear errors for
gradients that do not match the parameters, and zero-size parameters.

``optax.tree_map_params`` finds the copies of the parameter tree in a state by calling ``init``
with a placeholder; ``f`` must then reach exactly the parameter-shaped arrays (moments) and
leave the block statistics, preconditioners and eigenbases alone.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import metaopt
from metaopt.optimizers._tree_checks import check_matching

SMALL = metaopt.Blocking(block_size=4)

# name -> (factory, the state's fields holding copies of the parameter tree)
TRANSFORMS = {
    "shampoo": (lambda: metaopt.shampoo(0.1, blocking=SMALL, preconditioning_frequency=2), 2),
    "shampoo_sgd_graft": (
        lambda: metaopt.shampoo(0.1, grafting=metaopt.Grafting("sgd"), blocking=SMALL),
        1,
    ),
    "soap": (lambda: metaopt.soap(0.1, blocking=SMALL, preconditioning_frequency=2), 1),
}


def _params(dtype=jnp.float64):
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(6, 5)), dtype),
        "b": jnp.asarray(rng.normal(size=5), dtype),
        "layer": [jnp.asarray(rng.normal(size=(3, 2, 4)), dtype)],
    }


def _run(tx, params, steps=3, seed=1):
    rng = np.random.default_rng(seed)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(steps):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
        updates, state = update(grads, state, params)
    return updates, state


# ----------------------------------------------------------------------------- tree_map_params
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_tree_map_params_maps_exactly_the_parameter_shaped_arrays(name):
    make, copies = TRANSFORMS[name]
    tx = make()
    params = _params()
    _, state = _run(tx, params)
    param_shapes = [x.shape for x in jax.tree.leaves(params)]

    seen = []

    def to_float32(x):
        seen.append(x.shape)
        return x.astype(jnp.float32)

    mapped = optax.tree_map_params(tx, to_float32, state)
    # f saw every parameter-shaped copy once (mu, and the grafting accumulator for Adam), and
    # nothing else (no statistics, roots, eigenbases or counters).
    assert sorted(seen) == sorted(param_shapes * copies)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    changed = [
        a.shape
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(mapped), strict=True)
        if a.dtype != b.dtype
    ]
    assert sorted(changed) == sorted(param_shapes * copies)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(mapped), strict=True):
        if a.dtype == b.dtype:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_array_equal(a.astype(jnp.float32), b)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_tree_map_params_builds_shardings_from_the_parameters_shardings(name):
    # The use optax documents: per-parameter specs for the moments, something else elsewhere.
    make, _ = TRANSFORMS[name]
    tx = make()
    params = _params()
    _, state = _run(tx, params)
    mesh = Mesh(np.array(jax.devices()[:1]), ("devices",))
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = jax.tree.map(
        lambda x: NamedSharding(mesh, PartitionSpec(*([None] * x.ndim))), params
    )
    shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        state,
        param_shardings,
        transform_non_params=lambda subtree: jax.tree.map(lambda _: replicated, subtree),
    )
    placed = jax.device_put(state, shardings)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(placed), strict=True):
        np.testing.assert_array_equal(a, b)
    # The moments got the parameters' shardings (not the replicated one).
    inner = placed[0]
    assert jax.tree.leaves(inner.mu)[0].sharding == jax.tree.leaves(param_shardings)[0]


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_state_fields_follow_the_parameter_tree(name):
    make, _ = TRANSFORMS[name]
    params = _params()
    state = make().init(params)[0]
    treedef = jax.tree.structure(params)
    per_leaf = [f for f in ("statistics", "preconditioners", "eigenbases") if hasattr(state, f)]
    assert per_leaf
    for field in per_leaf:
        # One entry per parameter leaf, at the parameter's path: a tuple with one matrix stack
        # per preconditioned axis.
        entries = treedef.flatten_up_to(getattr(state, field))
        assert all(isinstance(e, tuple) for e in entries)
    w_stats = state.statistics["w"]
    # w is (6, 5) in blocks of 4: a 2 x 2 grid, a 4 x 4 statistic per block and axis.
    assert [s.shape for s in w_stats] == [(2, 2, 4, 4)] * 2


# ----------------------------------------------------------------------------- mismatched trees
def _mismatches(params):
    return {
        "missing leaf": ({"w": params["w"], "layer": params["layer"]}, ["params['b']"]),
        "list for dict": (
            [params["w"], params["b"], params["layer"]],
            ["PyTreeDef([*, *, [*]])", "different tree structures"],
        ),
        "wrong shape": (
            {**params, "w": jnp.ones((6, 4))},
            ["['w']", "(6, 4)", "(6, 5)"],
        ),
        "broadcastable shape": (
            {**params, "layer": [jnp.ones((3, 1, 4))]},
            ["['layer'][0]", "(3, 1, 4)", "(3, 2, 4)"],
        ),
        "broadcastable vector": (
            {**params, "b": jnp.ones((1,))},
            ["['b']", "(1,)", "(5,)"],
        ),
    }


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("case", sorted(_mismatches(_params())))
@pytest.mark.parametrize("jit", [False, True])
def test_mismatched_gradients_raise_naming_the_leaf_and_shapes(name, case, jit):
    make, _ = TRANSFORMS[name]
    tx = make()
    params = _params()
    state = tx.init(params)
    grads, fragments = _mismatches(params)[case]
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError) as info:
        update(grads, state, params)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_gradients_must_match_the_state_even_without_params(name):
    make, _ = TRANSFORMS[name]
    tx = make()
    state = tx.init(_params())
    other = {"w": jnp.ones((6, 5)), "b": jnp.ones(5), "layer": [jnp.ones((3, 2, 1))]}
    with pytest.raises(ValueError, match=re.escape("(3, 2, 1)")):
        tx.update(other, state)


def test_check_matching_messages():
    params = {"a": {"x": jnp.zeros((3, 4))}, "b": jnp.zeros(2)}
    check_matching("updates", {"a": {"x": jnp.ones((3, 4))}, "b": jnp.ones(2)}, "params", params)
    with pytest.raises(ValueError, match=re.escape("updates['a']['x'] has shape (3, 1)")) as info:
        check_matching(
            "updates", {"a": {"x": jnp.ones((3, 1))}, "b": jnp.ones(2)}, "params", params
        )
    assert "params['a']['x'] has shape (3, 4)" in str(info.value)
    with pytest.raises(ValueError, match="different tree structures") as info:
        check_matching("updates", {"a": {"y": jnp.ones((3, 4))}, "b": 1.0}, "params", params)
    message = str(info.value)
    assert "updates['a']['y']" in message and "params['a']['x']" in message
    assert str(jax.tree.structure(params)) in message
    # Same paths, different containers: both structures are printed.
    with pytest.raises(ValueError, match="container types") as info:
        check_matching("u", (jnp.ones(2),), "p", [jnp.ones(2)])
    assert "PyTreeDef((*,))" in str(info.value) and "PyTreeDef([*])" in str(info.value)


# ----------------------------------------------------------------------------- zero-size leaves
ZERO_SHAPES = [(0, 3), (3, 0), (0,), (5, 0, 7)]
BLOCKINGS = {
    "default": None,
    "block_size_1": metaopt.Blocking(block_size=1),
    "block_size_2_unmerged": metaopt.Blocking(block_size=2, merge_small_dimensions=False),
    "one_sided": metaopt.Blocking(block_size=3, one_sided=True),
}
CORES = {
    "shampoo": lambda blocking: metaopt.scale_by_shampoo(
        blocking=blocking, preconditioning_frequency=1, start_preconditioning_step=1
    ),
    "soap": lambda blocking: metaopt.scale_by_soap(preconditioning_frequency=2, blocking=blocking),
}


@pytest.mark.parametrize("name", sorted(CORES))
@pytest.mark.parametrize("blocking", sorted(BLOCKINGS))
def test_zero_size_leaf_gets_an_empty_update_and_leaves_the_others_alone(name, blocking):
    """Every shape of ZERO_SHAPES, each as its own leaf of one tree beside two ordinary leaves:
    one compiled update with all four empty leaves instead of one per shape (each empty leaf is
    planned and stepped on its own, so together they check what four runs did)."""
    tx = CORES[name](BLOCKINGS[blocking])
    rng = np.random.default_rng(2)
    normal = {"w": jnp.asarray(rng.normal(size=(5, 3))), "v": jnp.asarray(rng.normal(size=4))}
    empty = {f"z{i}": jnp.zeros(shape) for i, shape in enumerate(ZERO_SHAPES)}
    mixed = {**normal, **empty}
    state_mixed, state_normal = tx.init(mixed), tx.init(normal)
    update = jax.jit(tx.update)
    for _ in range(3):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), normal)
        got, state_mixed = update({**g, **empty}, state_mixed, mixed)
        expected, state_normal = update(g, state_normal, normal)
        for key, leaf in empty.items():
            assert got[key].shape == leaf.shape and got[key].dtype == leaf.dtype, key
        # The other leaves step exactly as without the empty ones.
        for key in normal:
            np.testing.assert_array_equal(got[key], expected[key])
    assert int(state_mixed.count) == 3
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state_mixed))
    for field in ("statistics", "preconditioners", "eigenbases"):
        if hasattr(state_mixed, field):
            for key in empty:
                assert getattr(state_mixed, field)[key] == (), (field, key)


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_only_zero_size_leaves(name):
    tx = metaopt.shampoo(0.1) if name == "shampoo" else metaopt.soap(0.1)
    params = {"z": jnp.zeros((0, 3), jnp.float32)}
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(params, state, params)
    assert updates["z"].shape == (0, 3) and updates["z"].dtype == jnp.float32


def test_zero_size_tensor_has_no_preconditioned_axis():
    from metaopt.optimizers._blocking import plan_blocks

    for shape in ZERO_SHAPES:
        for blocking in BLOCKINGS.values():
            plan = plan_blocks(shape, blocking or metaopt.Blocking())
            assert plan.preconditioned == (), (shape, blocking)
