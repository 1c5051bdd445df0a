"""The optimizer contract: one battery that every metaopt transform must pass.

Register a transform in ``tests/optimizer_registry.py`` and it is checked for: convergence on
standard problems, jit equivalence, ``inject_hyperparams`` equivalence, differentiable
hyperparameters (against finite differences, float64), dtype preservation, stable state, a
bit-exact checkpoint round trip, sharded equals unsharded on an 8-device mesh, no NaN for
zero gradients, the documented handling of NaN, inf and huge (1e30) gradients, clear errors for
gradients that do not match the parameters, empty updates for zero-size leaves, and, for every
public factory, a TypeError naming the argument when a numeric argument is given a string.
"""

from __future__ import annotations

import inspect
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests.optimizer_registry import (
    CONSTRUCTORS,
    COVERAGE,
    ENTRIES,
    ENTRY_BY_NAME,
    numeric_arguments,
    public_transforms,
)

NAMES = [entry.name for entry in ENTRIES]


# ----------------------------------------------------------------------------- problems
def _quadratic(dtype):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    a = (q * np.linspace(1.0, 10.0, 10)) @ q.T
    b = rng.normal(size=10)
    x_star = np.linalg.solve(a, b)
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)

    def loss(x):
        return 0.5 * x @ a @ x - b @ x

    optimum = float(loss(jnp.asarray(x_star, dtype)))
    return loss, jnp.zeros(10, dtype), optimum


def _rosenbrock(dtype):
    def loss(p):
        x, y = p["x"], p["y"]
        return jnp.sum(jnp.square(1.0 - x) + 100.0 * jnp.square(y - x * x))

    return loss, {"x": jnp.array([-1.2], dtype), "y": jnp.array([1.0], dtype)}, 0.0


def _least_squares(dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 8))
    w = rng.normal(size=8)
    y = x @ w + 0.1 * rng.normal(size=64)
    optimum_w = np.linalg.lstsq(x, y, rcond=None)[0]
    x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)

    def loss(p):
        return 0.5 * jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))

    optimum = float(loss({"w": jnp.asarray(optimum_w, dtype), "b": jnp.zeros((), dtype)}))
    return loss, {"w": jnp.zeros(8, dtype), "b": jnp.zeros((), dtype)}, optimum


def _mlp(dtype):
    rng = np.random.default_rng(2)
    # Asymmetric data: no gradient entry is zero up to round-off, which would make Adam-type
    # derivatives with respect to hyperparameters ill-conditioned (d sqrt(v)/dv at v ~ 0).
    x = np.linspace(-2, 3, 64)[:, None]
    y = np.sin(x) + 0.5
    x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    params = {
        "w1": jnp.asarray(rng.normal(size=(1, 16)), dtype),
        "b1": jnp.zeros(16, dtype),
        "w2": jnp.asarray(rng.normal(size=(16, 1)) / 4.0, dtype),
        "b2": jnp.zeros(1, dtype),
    }

    def loss(p):
        hidden = jnp.tanh(x @ p["w1"] + p["b1"])
        return 0.5 * jnp.mean(jnp.square(hidden @ p["w2"] + p["b2"] - y))

    return loss, params, 0.0


PROBLEMS = {
    "quadratic": _quadratic,
    "rosenbrock": _rosenbrock,
    "least_squares": _least_squares,
    "mlp": _mlp,
}
# (learning rate for adaptive methods, for momentum SGD bases, steps, required fraction of the
# initial excess loss that must be gone)
SETTINGS = {
    "quadratic": (0.05, 0.01, 1000, 1e-3),
    "rosenbrock": (0.02, 1e-3, 3000, 1e-2),
    "least_squares": (0.05, 0.05, 1000, 1e-3),
    "mlp": (0.01, 0.05, 1500, 5e-2),
}


# ----------------------------------------------------------------------------- helpers
def _with_extra_args(tx):
    return optax.with_extra_args_support(tx)


def _run(tx, loss, params, steps, state=None):
    """Runs ``steps`` optimizer steps; returns (params, state, losses)."""
    tx = _with_extra_args(tx)
    grad_fn = jax.grad(loss)
    state = tx.init(params) if state is None else state

    def body(carry, _):
        p, s = carry
        updates, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
        return (optax.apply_updates(p, updates), s), loss(p)

    (params, state), losses = jax.lax.scan(body, (params, state), None, length=steps)
    return params, state, losses


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _structure(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------- the contract
def test_every_public_transform_is_in_the_contract():
    covered = {name for name, entry in COVERAGE.items() if entry in ENTRY_BY_NAME}
    missing = public_transforms() - covered
    assert not missing, f"register these in tests/optimizer_registry.py: {sorted(missing)}"


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("name", NAMES)
def test_converges_on_standard_problems(name, problem):
    entry = ENTRY_BY_NAME[name]
    loss, params, optimum = PROBLEMS[problem](jnp.float32)
    adaptive_lr, sgd_lr, steps, fraction = SETTINGS[problem]
    lr = adaptive_lr if entry.adaptive else sgd_lr
    key_value = entry.convergence_key_value or entry.key_value
    final, _, _ = jax.jit(lambda p: _run(entry.make(lr, key_value), loss, p, steps))(params)
    initial_gap = float(loss(params)) - optimum
    final_gap = float(loss(final)) - optimum
    assert np.isfinite(final_gap)
    assert final_gap <= fraction * initial_gap, (final_gap, initial_gap)


@pytest.mark.parametrize("name", NAMES)
def test_jit_gives_the_same_trajectory(name):
    entry = ENTRY_BY_NAME[name]
    loss, params, _ = _least_squares(jnp.float64)
    tx = _with_extra_args(entry.make(0.01, entry.key_value))
    grad_fn = jax.grad(loss)
    eager_state = jit_state = tx.init(params)
    eager = jitted = params
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
    for _ in range(5):
        updates, eager_state = tx.update(grad_fn(eager), eager_state, eager, grad_fn=grad_fn)
        eager = optax.apply_updates(eager, updates)
        updates, jit_state = step(grad_fn(jitted), jit_state, jitted)
        jitted = optax.apply_updates(jitted, updates)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), eager, jitted
    )


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_gives_identical_updates(name):
    entry = ENTRY_BY_NAME[name]
    # inject_hyperparams stores hyperparameters in the parameters' dtype while Python floats
    # are weakly typed; with float64 parameters both paths compute in float64 and must agree
    # bit for bit (in float32 mode both compute in float32).
    loss, params, _ = _mlp(jnp.float64)
    plain, _, plain_losses = _run(entry.make(0.01, entry.key_value), loss, params, 20)
    injected, state, injected_losses = _run(entry.inject(0.01, entry.key_value), loss, params, 20)
    if entry.inject_ulps == 0:
        _assert_trees_equal(plain, injected)
        np.testing.assert_array_equal(plain_losses, injected_losses)
    else:
        tolerance = entry.inject_ulps * np.finfo(np.float64).eps
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance),
            (plain, plain_losses),
            (injected, injected_losses),
        )
    assert entry.key in state.hyperparams


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameter_gradient_matches_finite_differences(name):
    """The gradient of the loss after 8 steps with respect to the learning rate and to the
    method's key hyperparameter, each against central differences.

    One compiled program (the loss and its gradient with respect to both hyperparameters)
    serves all five evaluations: its loss output gives the finite differences, so the check
    costs one compilation instead of four while comparing the same numbers as before.
    """
    entry = ENTRY_BY_NAME[name]
    loss, params, _ = _mlp(jnp.float64)
    x0 = {"learning_rate": 0.01, "key": entry.key_value}

    def loss_after_steps(values):
        final, _, _ = _run(entry.make(values["learning_rate"], values["key"]), loss, params, 8)
        return loss(final)

    value_and_grad = jax.jit(jax.value_and_grad(loss_after_steps))
    point = {k: jnp.float64(v) for k, v in x0.items()}
    _, analytic = value_and_grad(point)
    for hyperparameter, value in x0.items():
        h = 1e-5 * value
        plus, _ = value_and_grad({**point, hyperparameter: jnp.float64(value + h)})
        minus, _ = value_and_grad({**point, hyperparameter: jnp.float64(value - h)})
        numeric = (float(plus) - float(minus)) / (2 * h)
        assert abs(numeric) > 1e-8, f"{hyperparameter} must influence the loss in this check"
        np.testing.assert_allclose(
            float(analytic[hyperparameter]), numeric, rtol=1e-5, err_msg=hyperparameter
        )


@pytest.mark.parametrize("name", NAMES)
def test_new_hyperparameter_values_do_not_recompile(name):
    entry = ENTRY_BY_NAME[name]
    loss, params, _ = _least_squares(jnp.float32)
    traces = []

    @jax.jit
    def run(lr, key):
        traces.append(None)
        return _run(entry.make(lr, key), loss, params, 3)[0]

    first = run(jnp.float32(0.01), jnp.float32(entry.key_value))
    second = run(jnp.float32(0.02), jnp.float32(entry.key_value * 1.5))
    assert len(traces) == 1
    assert not np.allclose(first["w"], second["w"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", NAMES)
def test_parameter_dtype_and_state_are_preserved(name, dtype):
    entry = ENTRY_BY_NAME[name]
    loss, params, _ = _mlp(dtype)
    tx = _with_extra_args(entry.make(0.01, entry.key_value))
    state0 = tx.init(params)
    grad_fn = jax.grad(loss)
    step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
    state = state0
    for _ in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        for leaf in jax.tree.leaves(updates) + jax.tree.leaves(params):
            assert leaf.dtype == dtype
        assert _structure(state) == _structure(state0)
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_continues_bit_for_bit(name, tmp_path):
    entry = ENTRY_BY_NAME[name]
    loss, params, _ = _mlp(jnp.float32)
    tx = entry.make(0.01, entry.key_value)
    run = jax.jit(lambda p, s: _run(tx, loss, p, 10, s)[:2])
    params, state = run(params, _with_extra_args(tx).init(params))

    # Save with numpy.savez, restore into the structure of a fresh state.
    leaves, treedef = jax.tree.flatten((params, state))
    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(x) for x in leaves])
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(buffer.getvalue())
    with np.load(path) as data:
        restored_leaves = [jnp.asarray(data[f"arr_{i}"]) for i in range(len(leaves))]
    restored = jax.tree.unflatten(treedef, restored_leaves)
    for a, b in zip(leaves, restored_leaves, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape

    uninterrupted = run(params, state)
    resumed = run(*restored)
    _assert_trees_equal(uninterrupted, resumed)


@pytest.mark.parametrize("name", NAMES)
def test_sharded_parameters_give_the_unsharded_result(name):
    entry = ENTRY_BY_NAME[name]
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(32, 16)))
    params = {"w": jnp.asarray(rng.normal(size=(16, 8)) / 4), "b": jnp.zeros(8)}

    def loss(p):
        return jnp.mean(jnp.square(jnp.tanh(x @ p["w"] + p["b"]) - 0.5))

    run = jax.jit(lambda p: _run(entry.make(0.05, entry.key_value), loss, p, 5)[0])
    expected = run(params)

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("rows", "cols"))
    sharding = {
        "w": NamedSharding(mesh, PartitionSpec("rows", "cols")),
        "b": NamedSharding(mesh, PartitionSpec("cols")),
    }
    sharded_params = jax.device_put(params, sharding)
    got = run(sharded_params)
    rtol = entry.sharded_rtol
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-2 * rtol), got, expected
    )
    # The parameters stay distributed as they came in.
    assert got["w"].sharding.is_equivalent_to(sharding["w"], 2)


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradient_gives_finite_updates_and_state(name):
    entry = ENTRY_BY_NAME[name]
    params = {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    tx = _with_extra_args(entry.make(0.01, entry.key_value))
    zeros = jax.tree.map(jnp.zeros_like, params)

    @jax.jit  # one compiled program, not the three steps op by op
    def three_steps(params):
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(zeros, state, params, grad_fn=lambda p: zeros)
            params = optax.apply_updates(params, updates)
        return params, updates, state

    for leaf in jax.tree.leaves(three_steps(params)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


# ----------------------------------------------------------------------------- bad input
def _small_problem(dtype):
    params = {"w": jnp.full((4, 3), 0.5, dtype), "b": jnp.zeros(3, dtype)}

    def loss(p):  # not separable: every gradient entry depends on every parameter
        coupling = 0.1 * jnp.square(jnp.sum(p["w"]) + jnp.sum(p["b"]))
        return jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(jnp.square(p["b"] - 1.0)) + coupling

    return params, loss


def _with_entry(grads, value):
    """The gradient with one entry of ``w`` replaced (also in what grad_fn returns)."""
    return {**grads, "w": grads["w"].at[1, 1].set(value)}


def _warm_state(tx, params, loss, steps=3):
    """Parameters and state after a few clean steps, so moments and statistics are not zero."""
    params, state, _ = _run(tx, loss, params, steps)
    return params, state


def _finite(tree):
    return all(
        bool(np.all(np.isfinite(np.asarray(x, np.float64))))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    )


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_is_skipped_or_visible(name):
    entry = ENTRY_BY_NAME[name]
    params, loss = _small_problem(jnp.float32)
    tx = _with_extra_args(entry.make(0.01, entry.key_value))
    clean = jax.grad(loss)

    @jax.jit  # one compiled program for the warm-up, the bad step and the clean step after it
    def steps(p, bad):
        p, s = _warm_state(tx, p, loss)
        bad_grad_fn = lambda q: _with_entry(clean(q), bad)
        updates, new_state = tx.update(bad_grad_fn(p), s, p, grad_fn=bad_grad_fn)
        return updates, new_state, tx.update(clean(p), new_state, p, grad_fn=clean)

    for bad in (np.nan, np.inf, -np.inf):
        updates, new_state, after = steps(params, jnp.float32(bad))
        if entry.nonfinite == "skips":
            # The method's own step is skipped (weight decay in the alias may still act).
            assert _finite(updates)
            assert _finite(new_state), f"a skipped step wrote {bad} into the state"
            assert _finite(after)
        else:
            assert entry.nonfinite == "propagates"
            # The leaf that received the bad value must show it, never a finite, wrong update.
            assert not np.all(np.isfinite(np.asarray(updates["w"], np.float64))), bad


@pytest.mark.parametrize("name", NAMES)
def test_huge_gradient_is_exact_or_documented(name):
    entry = ENTRY_BY_NAME[name]
    results = {}
    for dtype in (jnp.float32, jnp.float64):
        params, loss = _small_problem(dtype)
        tx = _with_extra_args(entry.make(0.01, entry.key_value))
        huge_grad_fn = lambda p, loss=loss: _with_entry(jax.grad(loss)(p), 1e30)

        @jax.jit  # the warm-up and the huge step in one compiled program
        def warm_then_huge(p, tx=tx, loss=loss, huge_grad_fn=huge_grad_fn):
            p, s = _warm_state(tx, p, loss)
            return p, tx.update(huge_grad_fn(p), s, p, grad_fn=huge_grad_fn)[0]

        results[dtype] = warm_then_huge(params)
    params32, updates32 = results[jnp.float32]
    if entry.huge_gradient == "exact":
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(
                np.asarray(a, np.float64), b, rtol=1e-5, atol=1e-6
            ),
            updates32,
            results[jnp.float64][1],
        )
    elif entry.huge_gradient == "second_moment_overflows":
        assert _finite(optax.apply_updates(params32, updates32))
    else:
        assert entry.huge_gradient == "scale_dependent"


@pytest.mark.parametrize("mismatch", ["shape", "missing_leaf"])
@pytest.mark.parametrize("name", NAMES)
def test_mismatched_gradient_tree_is_a_clear_error(name, mismatch):
    entry = ENTRY_BY_NAME[name]
    params, loss = _small_problem(jnp.float32)
    tx = _with_extra_args(entry.make(0.01, entry.key_value))
    state = tx.init(params)
    grads = jax.grad(loss)(params)
    if mismatch == "shape":  # broadcastable against the parameter: must not pass silently
        grads, expected = {**grads, "w": grads["w"][:, :1]}, r"\['w'\].*\(4, 1\).*\(4, 3\)"
    else:
        grads, expected = {"w": grads["w"]}, r"tree structure|\['b'\]"
    with pytest.raises((ValueError, TypeError), match=expected):
        tx.update(grads, state, params, grad_fn=lambda p: grads)


@pytest.mark.parametrize("name", NAMES)
def test_zero_size_leaf_gets_an_empty_update(name):
    entry = ENTRY_BY_NAME[name]
    params = {"w": jnp.full((4, 3), 0.5, jnp.float32), "empty": jnp.zeros((3, 0), jnp.float32)}

    def loss(p):
        return jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(p["empty"])

    tx = _with_extra_args(entry.make(0.01, entry.key_value))
    grad_fn = jax.grad(loss)

    @jax.jit  # the warm-up and the last step in one compiled program
    def warm_then_step(params):
        params, state = _warm_state(tx, params, loss)
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return updates, state, params

    updates, state, params = warm_then_step(params)
    assert updates["empty"].shape == (3, 0) and updates["empty"].dtype == jnp.float32
    assert _finite((updates, state, params))


# ----------------------------------------------------------------------------- constructors
CONSTRUCTOR_ARGUMENTS = [
    (factory, argument)
    for factory in sorted(CONSTRUCTORS)
    for argument in numeric_arguments(factory)
]


def test_every_public_factory_is_in_the_constructor_checks():
    # The transform factories and the configuration classes Shampoo and SOAP take.
    missing = (public_transforms() | {"Blocking", "Grafting"}) - set(CONSTRUCTORS)
    assert not missing, f"add these to CONSTRUCTORS in tests/optimizer_registry.py: {missing}"


@pytest.mark.parametrize("factory_name, argument", CONSTRUCTOR_ARGUMENTS)
def test_string_hyperparameter_is_rejected_at_construction(factory_name, argument):
    factory, required = CONSTRUCTORS[factory_name]
    with pytest.raises(TypeError, match=rf"\b{argument}='0\.9'"):
        factory(**{**required, argument: "0.9"})


@pytest.mark.parametrize("factory_name, argument", CONSTRUCTOR_ARGUMENTS)
def test_numeric_hyperparameter_types_are_accepted(factory_name, argument):
    factory, required = CONSTRUCTORS[factory_name]
    parameter = inspect.signature(factory).parameters[argument]
    default = required.get(argument, parameter.default)
    if isinstance(default, bool) or not isinstance(default, float):
        pytest.skip("whole-number and optional arguments have their own checks")
    for value in (default, np.float32(default), np.float64(default), jnp.asarray(default)):
        built = factory(**{**required, argument: value})
        if hasattr(built, "update"):  # a transform
            assert callable(built.update) and callable(built.init)
        else:  # a configuration object (Grafting, Blocking) keeps the value it was given
            assert getattr(built, argument) is value

    @jax.jit
    def construct_with_traced(v):  # as optax.inject_hyperparams and jax.grad pass it
        factory(**{**required, argument: v})
        return v

    construct_with_traced(jnp.asarray(default))
    if "Schedule" in str(parameter.annotation):
        factory(**{**required, argument: optax.constant_schedule(default)})
