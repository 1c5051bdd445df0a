"""metaopt.learned.PerParameterMLP against its NumPy transcription, and its behaviour as an optax
transform: scale invariance, untrained step sizes, skipped non-finite steps, composition with
optax and flax, meta-gradients, and configuration errors.

The reference (``tests/learned_references.py``) is written from the update rule's specification
with plain loops, independently of the JAX code; both run in float64, where they agree to
round-off (rtol 1e-12 after 10 steps, the features being ratios of O(1) numbers and the network
a few dot products of length <= 13).
"""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt.learned import PerParameterMLP, _per_parameter_mlp
from tests import learned_references as ref

# Short decays so that every momentum differs from the gradient within the 10 compared steps.
DESCRIPTION = PerParameterMLP(
    hidden_size=6,
    hidden_layers=2,
    momentum_decays=(0.5, 0.8, 0.95),
    rms_decay=0.9,
    factored_decay=0.7,
    step_timescales=(1, 3, 10, 100),
)
SHAPES = {"matrix": (5, 3), "tensor": (2, 3, 4), "vector": (3,), "scalar": (), "empty": (3, 0)}
# A different size per leaf: the features are scaled per tensor, so this must not matter.
GRAD_SCALES = {"matrix": 1e-3, "tensor": 1e2, "vector": 1.0, "scalar": 0.3, "empty": 1.0}
MULTIPLIERS = {"matrix": 0.5, "tensor": 1.0 / 3.0, "vector": 2.0, "scalar": 1.5, "empty": 0.25}
# Compilation time grows with the number of leaves: the composition checks use two.
SMALL_SHAPES = {"matrix": (5, 3), "vector": (3,)}
STEPS = 10


def step_schedule(count):
    return 0.02 * (1.0 + 0.3 * count)


def magnitude_schedule(count):
    return 0.4 - 0.01 * count


def random_meta_params(description, seed):
    """Meta-parameters of size O(1), biases included: every feature and layer matters."""
    rng = np.random.default_rng(seed)
    features, tensor_features = description.num_features, description.num_tensor_features
    width = description.hidden_size

    def layer(fan_in, fan_out, bias=True):
        out = {"w": rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in) * 2.0}
        if bias:
            out["b"] = rng.normal(size=fan_out) * 0.5
        return out

    return {
        "input": layer(features, width),
        "tensor": layer(tensor_features, width, bias=False),
        "hidden": [layer(width, width) for _ in range(description.hidden_layers - 1)],
        "output": layer(width, 2),
    }


def random_tree(seed, scales=None, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    scales = scales or dict.fromkeys(shapes, 1.0)
    return {name: rng.normal(size=shape) * scales[name] for name, shape in shapes.items()}


def gradient_sequence(seed, steps=STEPS, shapes=SHAPES):
    # A common drift plus noise: the momenta, the RMS and the factored moment all differ.
    drift = random_tree(seed, GRAD_SCALES, shapes)
    return [
        {
            name: drift[name] * (1 + 0.1 * t) + noise
            for name, noise in random_tree(seed + 1 + t, GRAD_SCALES, shapes).items()
        }
        for t in range(steps)
    ]


def to_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


def run_jax(tx, params, grads_sequence):
    """Updates of every step (params += updates) and the final state, jitted."""
    params = to_jax(params)
    state = tx.init(params)
    step = jax.jit(tx.update)
    all_updates = []
    for grads in grads_sequence:
        updates, state = step(to_jax(grads), state, params)
        params = optax.apply_updates(params, updates)
        all_updates.append(updates)
    return all_updates, state


def assert_trees_close(actual, expected, rtol, label):
    for name, want in expected.items():
        got = np.asarray(actual[name])
        want = np.asarray(want)
        assert got.shape == want.shape, (label, name, got.shape, want.shape)
        atol = rtol * float(np.max(np.abs(want), initial=0.0))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{label} {name}")


def reference_run(meta_params, description=DESCRIPTION, **overrides):
    kwargs = {
        "step_multiplier": step_schedule,
        "magnitude_multiplier": magnitude_schedule,
        "update_multipliers": MULTIPLIERS,
    } | overrides
    return ref.run(meta_params, random_tree(0), gradient_sequence(1), description, **kwargs)


def flat_updates(all_updates):
    return np.concatenate([np.ravel(u) for updates in all_updates for u in ref.flatten(updates)])


# ------------------------------------------------------------------------------ the reference
# A network large enough to be evaluated by matrix products, where DESCRIPTION's is written out
# entry by entry (the two code paths of the update).
DENSE_DESCRIPTION = dataclasses.replace(DESCRIPTION, hidden_size=24, hidden_layers=3)


@pytest.mark.parametrize(
    "description", [DESCRIPTION, DENSE_DESCRIPTION], ids=["entrywise", "dense"]
)
def test_jax_matches_the_numpy_transcription_over_ten_steps(description):
    assert _per_parameter_mlp._is_entrywise(description) == (description is DESCRIPTION)
    meta_params = random_meta_params(description, 0)
    tx = description.transform(
        to_jax(meta_params),
        step_multiplier=step_schedule,
        magnitude_multiplier=magnitude_schedule,
        update_multipliers=MULTIPLIERS,
    )
    got, state = run_jax(tx, random_tree(0), gradient_sequence(1))
    want, want_state = reference_run(meta_params, description)
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        for leaf in g.values():
            assert leaf.dtype == jnp.float64
        assert_trees_close(g, w, 1e-12, f"step {t}")
    assert max(np.max(np.abs(u)) for u in want[-1].values() if u.size) > 1e-3  # steps were taken

    assert int(state.count) == want_state["count"] == STEPS
    assert int(state.skipped_steps) == want_state["skipped_steps"] == 0
    names = sorted(SHAPES)  # the reference's leaves are in sorted-key order too
    for name, leaf in zip(names, want_state["leaves"], strict=True):
        for k, momentum in enumerate(leaf["m"]):
            assert_trees_close({name: state.momenta[name][k]}, {name: momentum}, 1e-12, f"m{k}")
        assert_trees_close({name: state.second_moment[name]}, {name: leaf["v"]}, 1e-12, "v")
        assert_trees_close({name: state.row_moment[name]}, {name: leaf["r"]}, 1e-12, "row")
        assert_trees_close({name: state.column_moment[name]}, {name: leaf["c"]}, 1e-12, "col")


def test_every_feature_changes_the_reference_update():
    # Were two features equal (or one unused), the comparison above could not tell them apart.
    meta_params = random_meta_params(DESCRIPTION, 0)
    base = flat_updates(reference_run(meta_params)[0])
    scale = np.max(np.abs(base))
    features = DESCRIPTION.num_features
    for i in range(features):
        swapped = copy.deepcopy(meta_params)
        w = swapped["input"]["w"]
        w[[i, (i + 1) % features]] = w[[(i + 1) % features, i]]
        change = np.max(np.abs(flat_updates(reference_run(swapped)[0]) - base)) / scale
        assert change > 1e-3, (i, change)
    for j in range(DESCRIPTION.num_tensor_features):
        scaled = copy.deepcopy(meta_params)
        scaled["tensor"]["w"][j] *= 2.0
        change = np.max(np.abs(flat_updates(reference_run(scaled)[0]) - base)) / scale
        assert change > 1e-6, (j, change)


# ------------------------------------------------------------------------------ behaviour
def test_untrained_optimizer_takes_small_finite_steps_at_any_gradient_scale():
    description = PerParameterMLP()
    meta_params = description.init(jax.random.key(0))
    for leaf in jax.tree.leaves(meta_params):
        assert leaf.dtype == jnp.float32
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), random_tree(0))
    lam = description.step_multiplier
    tx = description.transform(meta_params)  # one transform: one compilation for all scales
    per_scale = {}
    for scale in (1e-8, 1.0, 1e8):
        grads = [
            jax.tree.map(lambda x: jnp.asarray(x * scale, jnp.float32), random_tree(10 + t))
            for t in range(4)
        ]
        all_updates, state = run_jax(tx, params, grads)
        for leaf in jax.tree.leaves(state):
            assert bool(jnp.all(jnp.isfinite(leaf))), scale
        sizes = np.concatenate([np.abs(np.ravel(u)) for u in jax.tree.leaves(all_updates)])
        assert np.all(np.isfinite(sizes))
        # Measured: median 0.19 lambda1, largest 0.74 lambda1 at every scale.
        assert 0.05 * lam < np.median(sizes) and np.max(sizes) < 3 * lam, (scale, sizes)
        per_scale[scale] = sizes
    for scale in (1e-8, 1e8):
        np.testing.assert_allclose(per_scale[scale], per_scale[1.0], rtol=0, atol=1e-4 * lam)


def test_update_is_invariant_to_the_gradient_scale():
    meta_params = to_jax(random_meta_params(DESCRIPTION, 3))
    tx = DESCRIPTION.transform(meta_params, step_multiplier=0.05, magnitude_multiplier=0.5)
    grads = gradient_sequence(5, steps=4)
    base, _ = run_jax(tx, random_tree(2), grads)
    for scale in (1e-3, 1e3):
        scaled = [jax.tree.map(lambda g: g * scale, gs) for gs in grads]
        got, _ = run_jax(tx, random_tree(2), scaled)
        for t, (g, b) in enumerate(zip(got, base, strict=True)):
            assert_trees_close(g, b, 1e-12, f"scale {scale} step {t}")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_skips_the_step(bad):
    meta_params = to_jax(random_meta_params(DESCRIPTION, 4))
    tx = DESCRIPTION.transform(meta_params, step_multiplier=0.05)
    params = to_jax(random_tree(0))
    _, state = run_jax(tx, params, gradient_sequence(1, steps=3))
    grads = to_jax(random_tree(9))
    grads["tensor"] = grads["tensor"].at[1, 2, 3].set(bad)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    for name, leaf in updates.items():
        assert leaf.dtype == params[name].dtype and not np.any(np.asarray(leaf)), name
    assert int(new_state.skipped_steps) == int(state.skipped_steps) + 1 == 1
    assert int(new_state.count) == int(state.count) == 3
    for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
        if new is not new_state.skipped_steps:
            np.testing.assert_array_equal(new, old)


def _plain_updates(tx, params, grads_sequence):
    all_updates, _ = run_jax(tx, params, grads_sequence)
    return all_updates


def test_in_optax_chain():
    meta_params = to_jax(random_meta_params(DESCRIPTION, 4))
    tx = DESCRIPTION.transform(meta_params, step_multiplier=0.05)
    chained = optax.chain(optax.add_decayed_weights(0.3), tx)
    params = to_jax(random_tree(0, shapes=SMALL_SHAPES))
    grads = gradient_sequence(1, steps=3, shapes=SMALL_SHAPES)
    got = _plain_updates(chained, params, grads)
    # By hand: the same steps on g + 0.3 p.
    state, want, step = tx.init(params), [], jax.jit(tx.update)
    for g in grads:
        g = jax.tree.map(lambda gi, p: gi + 0.3 * p, to_jax(g), params)
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
        want.append(updates)
    for g, w in zip(got, want, strict=True):
        assert_trees_close(g, w, 1e-12, "chain")


def test_in_optax_multi_steps():
    meta_params = to_jax(random_meta_params(DESCRIPTION, 4))
    tx = DESCRIPTION.transform(meta_params, step_multiplier=0.05)
    params = to_jax(random_tree(0, shapes=SMALL_SHAPES))
    grads = [to_jax(g) for g in gradient_sequence(1, steps=4, shapes=SMALL_SHAPES)]
    multi_steps = optax.MultiSteps(tx, every_k_schedule=2, accumulator_dtype=jnp.float64)
    got = _plain_updates(multi_steps, params, grads)
    means = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in (0, 2)]
    want = _plain_updates(tx, params, means)
    for name in SMALL_SHAPES:
        assert not np.any(np.asarray(got[0][name])) and not np.any(np.asarray(got[2][name]))
    assert_trees_close(got[1], want[0], 1e-12, "first accumulated step")
    assert_trees_close(got[3], want[1], 1e-12, "second accumulated step")


def test_in_optax_apply_if_finite():
    meta_params = to_jax(random_meta_params(DESCRIPTION, 4))
    tx = DESCRIPTION.transform(meta_params, step_multiplier=0.05)
    params = to_jax(random_tree(0, shapes=SMALL_SHAPES))
    grads = [to_jax(g) for g in gradient_sequence(1, steps=2, shapes=SMALL_SHAPES)]
    nan_grads = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads[0])
    guarded = optax.apply_if_finite(tx, max_consecutive_errors=3)
    got, state = run_jax(guarded, params, [grads[0], nan_grads, grads[1]])
    want = _plain_updates(tx, params, grads)
    assert int(state.total_notfinite) == 1
    for name in SMALL_SHAPES:
        assert not np.any(np.asarray(got[1][name]))
    assert_trees_close(got[0], want[0], 1e-12, "before the NaN")
    assert_trees_close(got[2], want[1], 1e-12, "after the NaN")


def test_in_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    meta_params = to_jax(random_meta_params(DESCRIPTION, 4))
    tx = DESCRIPTION.transform(meta_params, step_multiplier=0.05)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(8, 4))), jnp.asarray(rng.normal(size=(8, 3)))

    def loss(params):
        return jnp.mean((x @ params["kernel"] + params["bias"] - y) ** 2)

    @nnx.jit
    def nnx_step(model, optimizer):
        grads = nnx.grad(lambda m: loss({"kernel": m.kernel[...], "bias": m.bias[...]}))(model)
        optimizer.update(model, grads)

    @jax.jit
    def plain_step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = {"kernel": model.kernel[...], "bias": model.bias[...]}
    start, state = loss(params), tx.init(params)
    for _ in range(3):
        nnx_step(model, optimizer)
        params, state = plain_step(params, state)
    np.testing.assert_allclose(model.kernel[...], params["kernel"], rtol=1e-12)
    np.testing.assert_allclose(model.bias[...], params["bias"], rtol=1e-12)
    assert abs(float(loss(params)) - float(start)) > 1e-3  # the model moved


@pytest.mark.parametrize("hidden_size", [5, 100], ids=["entrywise", "dense"])
def test_meta_gradient_matches_central_differences(hidden_size):
    rng = np.random.default_rng(7)
    x, y = jnp.asarray(rng.normal(size=(16, 4))), jnp.asarray(rng.normal(size=(16, 3)))
    init = {"w": jnp.asarray(rng.normal(size=(4, 3)) * 0.5), "b": jnp.zeros(3)}

    def loss(params):
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    # A smaller network than DESCRIPTION's (one hidden layer) keeps the compilation short.
    description = PerParameterMLP(
        hidden_size=hidden_size, momentum_decays=(0.5, 0.9), rms_decay=0.9
    )
    assert _per_parameter_mlp._is_entrywise(description) == (hidden_size == 5)

    def meta_loss(meta_params):
        tx = description.transform(meta_params, step_multiplier=0.05, magnitude_multiplier=0.5)

        def inner(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(inner, (init, tx.init(init)), None, length=5)
        return loss(params)

    meta_params = to_jax(random_meta_params(description, 8))
    direction = to_jax(random_meta_params(description, 9))
    norm = np.sqrt(sum(float(jnp.sum(d**2)) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d / norm, direction)
    # One compiled program gives the gradient and, at the shifted points, the losses.
    value_and_grad = jax.jit(jax.value_and_grad(meta_loss))
    _, grad = value_and_grad(meta_params)
    pairs = zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in pairs)
    h = 1e-5
    plus, minus = (
        value_and_grad(jax.tree.map(lambda m, d: m + s * h * d, meta_params, direction))[0]
        for s in (1, -1)
    )
    numeric = float(plus - minus) / (2 * h)
    assert abs(analytic) > 1e-4  # the meta-parameters matter to the loss
    # Central differences: error O(h^2 f''') ~ 1e-10 plus round-off 1e-16 / h ~ 1e-11.
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
    # Forward mode (the entry-by-entry network's custom JVP) agrees with reverse mode.
    _, forward = jax.jit(lambda m, d: jax.jvp(meta_loss, (m,), (d,)))(meta_params, direction)
    np.testing.assert_allclose(float(forward), analytic, rtol=1e-10)


def test_entrywise_network_equals_the_matrix_products():
    rng = np.random.default_rng(3)
    features, width = 7, 5
    weights = (
        jnp.asarray(rng.normal(size=(features, width))),
        jnp.asarray(rng.normal(size=width)),
        [(jnp.asarray(rng.normal(size=(width, width))), jnp.asarray(rng.normal(size=width)))],
        jnp.asarray(rng.normal(size=(width, 2))),
        jnp.asarray(rng.normal(size=2)),
    )
    xs = [jnp.asarray(rng.normal(size=11)) for _ in range(features)]
    got = _per_parameter_mlp._entrywise_network(weights, xs)
    want = _per_parameter_mlp._dense_network(weights, xs)
    for g, w in zip(got, want, strict=True):
        assert float(jnp.std(w)) > 0.1  # ReLUs active and inactive: the outputs vary
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------------ errors
def _wrong_structures():
    good = jax.tree.map(np.zeros_like, DESCRIPTION.init(jax.random.key(0)))
    no_tensor = {k: v for k, v in good.items() if k != "tensor"}
    wide_input = copy.deepcopy(good)
    wide_input["input"]["w"] = np.zeros((DESCRIPTION.num_features + 1, DESCRIPTION.hidden_size))
    fewer_hidden = copy.deepcopy(good)
    fewer_hidden["hidden"] = []
    no_output_bias = copy.deepcopy(good)
    del no_output_bias["output"]["b"]
    # The leaf's path, as jax.tree_util.keystr writes it (the message also prints the
    # description, whose field names contain "hidden").
    return [
        (no_tensor, r"\['tensor'\]\['w'\]"),
        (wide_input, r"\['input'\]\['w'\]"),
        (fewer_hidden, r"\['hidden'\]\[0\]"),
        (no_output_bias, r"\['output'\]\['b'\]"),
    ]


@pytest.mark.parametrize("case", range(4))
def test_wrong_meta_parameter_structure_names_the_leaf(case):
    meta_params, leaf = _wrong_structures()[case]
    with pytest.raises(ValueError, match=leaf):
        DESCRIPTION.transform(meta_params)


BAD_DESCRIPTIONS = [
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_layers": 0}, "hidden_layers"),
    ({"momentum_decays": (0.9, 1.0)}, "momentum_decays"),
    ({"momentum_decays": (-0.1,)}, "momentum_decays"),
    ({"rms_decay": 1.0}, "rms_decay"),
    ({"factored_decay": -0.5}, "factored_decay"),
    ({"step_multiplier": -1e-3}, "step_multiplier"),
    ({"magnitude_multiplier": -1.0}, "magnitude_multiplier"),
    ({"parameterization": "mup"}, "parameterization"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_DESCRIPTIONS)
def test_bad_configuration_names_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        PerParameterMLP(**kwargs)


@pytest.mark.parametrize("name", ["step_multiplier", "magnitude_multiplier"])
def test_negative_multiplier_in_transform_names_the_argument(name):
    meta_params = DESCRIPTION.init(jax.random.key(0))
    with pytest.raises(ValueError, match=name):
        DESCRIPTION.transform(meta_params, **{name: -0.5})
