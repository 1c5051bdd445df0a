"""SAM, ASAM, GAM and finite-difference gradient regularization against NumPy transcriptions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec

import metaopt
from tests import references


def _as_jax(numpy_grad):
    """Wraps a NumPy gradient so the same function feeds metaopt (eager) and the reference."""
    return lambda p: jnp.asarray(numpy_grad(np.asarray(p)))


def _run(opt, grad, theta0, steps):
    params = jnp.asarray(theta0)
    state = opt.init(params)
    trajectory = [np.asarray(params)]
    for _ in range(steps):
        updates, state = opt.update(grad(params), state, params, grad_fn=grad)
        params = optax.apply_updates(params, updates)
        trajectory.append(np.asarray(params))
    return np.stack(trajectory)


@pytest.fixture(scope="module")
def logistic():
    _, grad, hess, theta0 = references.logistic_problem(n=60, dim=5, seed=0)
    return grad, hess, theta0


def test_sam_matches_paper_update(logistic):
    grad, _, theta0 = logistic
    got = _run(metaopt.sam(optax.sgd(0.5), rho=0.1), _as_jax(grad), theta0, 30)
    expected = np.stack(references.sam_reference(grad, theta0, 0.5, 0.1, 30))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_sam_differs_from_plain_sgd(logistic):
    # Guards the comparison above: a missing perturbation would fail it by this much.
    grad, _, theta0 = logistic
    sam = _run(metaopt.sam(optax.sgd(0.5), rho=0.1), _as_jax(grad), theta0, 30)
    sgd = np.stack(references.sam_reference(grad, theta0, 0.5, 0.0, 30))
    assert np.max(np.abs(sam - sgd)) > 1e-3


def test_asam_matches_paper_update(logistic):
    grad, _, theta0 = logistic
    got = _run(metaopt.asam(optax.sgd(0.5), rho=0.5, eta=0.01), _as_jax(grad), theta0, 30)
    expected = np.stack(references.asam_reference(grad, theta0, 0.5, 0.5, 0.01, 30))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_gam_matches_paper_update_with_finite_differences(logistic):
    grad, _, theta0 = logistic
    opt = metaopt.gam(optax.sgd(0.5), rho=0.2, alpha=0.5, fd_radius=0.01)
    got = _run(opt, _as_jax(grad), theta0, 20)
    expected = np.stack(references.gam_fd_reference(grad, theta0, 0.5, 0.2, 0.5, 0.01, 20))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_gam_equals_exact_hessian_formula_on_quadratic():
    # On a quadratic the finite differences are exact Hessian-vector products.
    _, grad, hess, theta0 = references.quadratic_problem(6, seed=1)
    got = _run(metaopt.gam(optax.sgd(0.05), rho=0.1, alpha=0.7), _as_jax(grad), theta0, 15)
    expected = np.stack(references.gam_reference(grad, hess, theta0, 0.05, 0.1, 0.7, 15))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("direction", ["forward", "backward", "central"])
def test_gradient_regularization_matches_paper_update(logistic, direction):
    grad, _, theta0 = logistic
    opt = metaopt.gradient_regularization(
        optax.sgd(0.5), gamma=0.2, epsilon=0.05, direction=direction
    )
    got = _run(opt, _as_jax(grad), theta0, 25)
    expected = np.stack(
        references.gradient_regularization_reference(grad, theta0, 0.5, 0.2, 0.05, direction, 25)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_gradient_regularization_is_exact_on_quadratic():
    _, grad, hess, theta0 = references.quadratic_problem(5, seed=2)
    got = _run(
        metaopt.gradient_regularization(optax.sgd(0.05), 0.1, 0.3), _as_jax(grad), theta0, 10
    )
    expected = np.stack(references.gradient_regularization_exact(grad, hess, theta0, 0.05, 0.1, 10))
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-13)


def test_central_difference_is_second_order_accurate(logistic):
    grad, hess, theta0 = logistic
    exact = references.gradient_regularization_exact(grad, hess, theta0, 0.5, 0.5, 1)[1]

    def error(direction, eps):
        opt = metaopt.gradient_regularization(optax.sgd(0.5), 0.5, eps, direction=direction)
        return np.max(np.abs(_run(opt, _as_jax(grad), theta0, 1)[1] - exact))

    # Halving the step halves the forward error and quarters the central one.
    assert 1.8 < error("forward", 0.02) / error("forward", 0.01) < 2.2
    assert 3.6 < error("central", 0.02) / error("central", 0.01) < 4.4


SHARPNESS_TRANSFORMS = {
    "sam": lambda: metaopt.scale_by_sam(0.05),
    "asam": lambda: metaopt.scale_by_asam(0.5),
    "gam": lambda: metaopt.scale_by_gam(0.05, 0.1),
    "gr_forward": lambda: metaopt.scale_by_gradient_regularization(0.05, 0.05),
    "gr_central": lambda: metaopt.scale_by_gradient_regularization(0.05, 0.05, direction="central"),
}
GRAD_FN_CALLS = {"sam": 1, "asam": 1, "gam": 3, "gr_forward": 1, "gr_central": 2}


@pytest.mark.parametrize("name", sorted(SHARPNESS_TRANSFORMS))
def test_grad_fn_call_count(name):
    calls = []

    def loss(p):
        return jnp.sum(jnp.cos(p) * p)

    def grad_fn(p):
        calls.append(None)
        return jax.grad(loss)(p)

    tx = SHARPNESS_TRANSFORMS[name]()
    params = jnp.linspace(0.0, 1.0, 4)
    state = tx.init(params)
    jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(
        jax.grad(loss)(params), state, params
    )
    assert len(calls) == GRAD_FN_CALLS[name]


@pytest.mark.parametrize("name", sorted(SHARPNESS_TRANSFORMS))
def test_zero_gradient_gives_no_nan_in_values_or_hypergradients(name):
    tx = SHARPNESS_TRANSFORMS[name]()
    params = jnp.ones(3)
    zero_grad_fn = jnp.zeros_like

    def outcome(p):
        updates, _ = tx.update(jnp.zeros(3), tx.init(p), p, grad_fn=zero_grad_fn)
        return jnp.sum(updates)

    assert np.all(np.isfinite(outcome(params)))
    assert np.all(np.isfinite(jax.grad(outcome)(params)))

    def outcome_rho(rho):
        t = metaopt.scale_by_sam(rho)
        updates, _ = t.update(jnp.zeros(3), t.init(params), params, grad_fn=lambda p: p - 1.0)
        return jnp.sum(updates)

    assert np.isfinite(jax.grad(outcome_rho)(0.05))


@pytest.mark.parametrize("name", sorted(SHARPNESS_TRANSFORMS))
def test_missing_grad_fn_explains_the_calling_convention(name):
    tx = SHARPNESS_TRANSFORMS[name]()
    params = jnp.ones(2)
    with pytest.raises(TypeError, match="grad_fn"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: metaopt.scale_by_sam(-0.1), "rho"),
        (lambda: metaopt.scale_by_asam(0.5, eta=-1.0), "eta"),
        (lambda: metaopt.scale_by_gam(0.05, alpha=-1.0), "alpha"),
        (lambda: metaopt.scale_by_gam(0.05, fd_radius=0.0), "fd_radius"),
        (lambda: metaopt.scale_by_gam(0.0), "rho"),
        (lambda: metaopt.scale_by_gradient_regularization(0.1, epsilon=0.0), "epsilon"),
        (lambda: metaopt.scale_by_gradient_regularization(-0.1), "gamma"),
    ],
)
def test_bad_configuration_names_the_argument(make, name):
    with pytest.raises(ValueError, match=rf"got {name}="):
        make()


def test_bad_direction_lists_the_choices():
    with pytest.raises(ValueError, match="'forward'"):
        metaopt.scale_by_gradient_regularization(direction="sideways")


def test_nonfinite_gradient_is_recorded_and_skipped_with_apply_if_finite():
    opt = optax.apply_if_finite(metaopt.sam(optax.sgd(0.1), 0.05), max_consecutive_errors=5)
    params = jnp.ones(3)
    state = opt.init(params)
    bad = jnp.array([1.0, jnp.nan, 0.0])
    updates, state = opt.update(bad, state, params, grad_fn=lambda p: p)
    assert not bool(state.last_finite) and int(state.notfinite_count) == 1
    np.testing.assert_array_equal(optax.apply_updates(params, updates), params)
    # The rejected step leaves the inner state as it was: nothing non-finite is stored.
    assert int(state.inner_state[0].count) == 0
    assert np.isfinite(float(state.inner_state[0].gradient_norm))


@pytest.mark.parametrize("name", sorted(SHARPNESS_TRANSFORMS))
def test_nonfinite_gradient_at_the_perturbed_point_is_caught_inside_the_chain(name):
    # apply_if_finite around the base optimizer sees the gradient the transform produced, so a
    # NaN at the perturbed point is rejected as well as one in the incoming gradient.
    opt = optax.chain(SHARPNESS_TRANSFORMS[name](), optax.apply_if_finite(optax.sgd(0.1), 5))
    params = jnp.ones(3)
    state = opt.init(params)
    nan_away_from_params = lambda p: jnp.where(jnp.all(p == params), p, jnp.nan)
    updates, state = opt.update(params, state, params, grad_fn=nan_away_from_params)
    np.testing.assert_array_equal(optax.apply_updates(params, updates), params)
    assert int(state[1].notfinite_count) == 1


def _least_squares(seed=0, n=64, d=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.1 * rng.normal(size=n)
    return jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize(
    "make",
    [
        lambda axis: metaopt.scale_by_sam(0.1, axis_name=axis),
        lambda axis: metaopt.scale_by_asam(0.5, axis_name=axis),
        lambda axis: metaopt.scale_by_gam(0.1, 0.3, axis_name=axis),
        lambda axis: metaopt.scale_by_gradient_regularization(0.1, 0.1, axis_name=axis),
    ],
)
def test_data_parallel_perturbation_equals_full_batch(make):
    """On 8 devices, per-replica gradients averaged over the axis give the full-batch step."""
    x, y = _least_squares()

    def loss(w, xb, yb):
        return 0.5 * jnp.mean(jnp.square(xb @ w - yb))

    w = jnp.linspace(-1.0, 1.0, x.shape[1])
    full = make(None)
    expected, _ = full.update(
        jax.grad(loss)(w, x, y), full.init(w), w, grad_fn=lambda p: jax.grad(loss)(p, x, y)
    )

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = make("data")

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec("data"), PartitionSpec("data")),
        out_specs=PartitionSpec(),
        check_vma=False,  # per-replica gradients, as under pmap
    )
    def step(w, xb, yb):
        local_grad_fn = lambda p: jax.grad(loss)(p, xb, yb)
        updates, _ = sharded.update(local_grad_fn(w), sharded.init(w), w, grad_fn=local_grad_fn)
        return updates

    got = jax.jit(step)(w, x, y)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)

    # Without the axis name each replica perturbs with its own gradient (m-sharpness): different.
    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec("data"), PartitionSpec("data")),
        out_specs=PartitionSpec(),
        check_vma=False,  # per-replica gradients, as under pmap
    )
    def local_step(w, xb, yb):
        local_grad_fn = lambda p: jax.grad(loss)(p, xb, yb)
        updates, _ = full.update(local_grad_fn(w), full.init(w), w, grad_fn=local_grad_fn)
        return jax.lax.pmean(updates, "data")

    assert np.max(np.abs(jax.jit(local_step)(w, x, y) - expected)) > 1e-6


# ----------------------------------------------------------------------------- non-finite input
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", sorted(SHARPNESS_TRANSFORMS))
def test_nonfinite_gradient_shows_in_the_gradient_norm(name, bad):
    # The documented diagnostic: a non-finite value in state.gradient_norm means a non-finite
    # gradient reached the transform (a NaN used to read 0.0).
    tx = SHARPNESS_TRANSFORMS[name]()
    params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(3)}
    grads = {"w": jnp.ones((2, 2)), "b": jnp.array([0.0, bad, 1.0])}
    _, state = tx.update(grads, tx.init(params), params, grad_fn=lambda p: grads)
    assert not np.isfinite(float(state.gradient_norm))
    assert np.isnan(float(state.gradient_norm)) == np.isnan(bad)


def test_global_norm_matches_numpy_and_has_zero_derivative_at_zero():
    from metaopt.optimizers._common import global_norm

    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(3, 4)), "b": [rng.normal(size=5), np.float64(2.5)]}
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    np.testing.assert_allclose(global_norm(tree), np.linalg.norm(flat), rtol=1e-15)
    # Derivative x / |x| away from zero, 0 at zero (not NaN), in values and second derivatives.
    x = jnp.asarray(flat)
    np.testing.assert_allclose(jax.grad(global_norm)(x), flat / np.linalg.norm(flat), rtol=1e-14)
    zero = jnp.zeros(4)
    np.testing.assert_array_equal(jax.grad(global_norm)(zero), np.zeros(4))
    assert np.all(np.isfinite(jax.hessian(global_norm)(zero)))
    assert np.isnan(global_norm({"a": jnp.array([1.0, np.nan])}))
    assert global_norm({"a": jnp.array([1.0, -np.inf])}) == np.inf
    # Large finite entries do not overflow in float32 (their squares would).
    huge = {"a": jnp.array([3e30, -4e30], jnp.float32), "b": jnp.zeros(2, jnp.bfloat16)}
    np.testing.assert_allclose(float(global_norm(huge)), 5e30, rtol=1e-6)


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "make, name",
    [
        (lambda v: metaopt.sam(optax.sgd(0.1), rho=v), "rho"),
        (lambda v: metaopt.scale_by_sam(v), "rho"),
        (lambda v: metaopt.asam(optax.sgd(0.1), rho=v), "rho"),
        (lambda v: metaopt.asam(optax.sgd(0.1), eta=v), "eta"),
        (lambda v: metaopt.gam(optax.sgd(0.1), rho=v), "rho"),
        (lambda v: metaopt.gam(optax.sgd(0.1), alpha=v), "alpha"),
        (lambda v: metaopt.gam(optax.sgd(0.1), fd_radius=v), "fd_radius"),
        (lambda v: metaopt.gradient_regularization(optax.sgd(0.1), gamma=v), "gamma"),
        (lambda v: metaopt.gradient_regularization(optax.sgd(0.1), epsilon=v), "epsilon"),
    ],
)
@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_nonfinite_hyperparameter_is_rejected_at_construction(make, name, value):
    # rho=inf used to be accepted and gave an update of -inf at the first step.
    with pytest.raises(ValueError, match=rf"{name} must be finite.*got {name}={value!r}"):
        make(value)


@pytest.mark.parametrize("base", ["adam", None, optax.adam])
@pytest.mark.parametrize(
    "alias", [metaopt.sam, metaopt.asam, metaopt.gam, metaopt.gradient_regularization]
)
def test_base_optimizer_must_be_an_optax_transform(alias, base):
    # sam("adam") used to fail with "'str' object has no attribute 'init'".
    with pytest.raises(
        TypeError,
        match=r"base_optimizer must be an optax GradientTransformation.*"
        r"base_optimizer=optax\.adam\(1e-3\)",
    ):
        alias(base)


# ----------------------------------------------------------------------------- masking
def _masked_problem():
    """A loss in which every leaf's gradient depends on every other leaf."""
    params = {
        "layer": {"w": jnp.array([[0.5, -1.0], [2.0, 0.25], [-0.5, 1.5]]), "s": jnp.array(0.8)},
        "b": jnp.array([0.1, -0.3]),
    }
    x = jnp.asarray(np.random.default_rng(4).normal(size=(7, 3)))

    def loss(p):
        hidden = jnp.tanh(x @ p["layer"]["w"] * p["layer"]["s"] + p["b"])
        return jnp.mean(jnp.square(hidden - 0.3)) + 0.1 * jnp.sum(p["b"] ** 2)

    return params, loss


def test_sam_inside_multi_transform_matches_hand_computation():
    # SAM on the layer (its perturbation and norm cover the layer only), Adam on the bias.
    params, loss = _masked_problem()
    rho, lr_sam, lr_adam = 0.05, 0.1, 0.01
    labels = {"layer": {"w": "sam", "s": "sam"}, "b": "adam"}
    tx = optax.multi_transform(
        {"sam": metaopt.sam(optax.sgd(lr_sam), rho=rho), "adam": optax.adam(lr_adam)}, labels
    )
    state = tx.init(params)
    p = params
    ref = jax.tree.map(np.asarray, params)
    m, v = np.zeros(2), np.zeros(2)
    grad = jax.grad(loss)
    for t in range(1, 4):
        g = grad(p)
        updates, state = tx.update(g, state, p, grad_fn=grad, all_params=p)
        p = optax.apply_updates(p, updates)

        # The hand computation, in NumPy from gradients of the loss at explicit points.
        g_ref = jax.tree.map(np.asarray, grad(ref))
        layer = g_ref["layer"]
        norm = np.sqrt(np.sum(layer["w"] ** 2) + layer["s"] ** 2)
        perturbed = {
            "layer": {k: ref["layer"][k] + rho * layer[k] / norm for k in ("w", "s")},
            "b": ref["b"],
        }
        g_sam = jax.tree.map(np.asarray, grad(perturbed))["layer"]
        m = 0.9 * m + 0.1 * g_ref["b"]
        v = 0.999 * v + 0.001 * g_ref["b"] ** 2
        step_b = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        ref = {
            "layer": {k: ref["layer"][k] - lr_sam * g_sam[k] for k in ("w", "s")},
            "b": ref["b"] - lr_adam * step_b,
        }
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15), p, ref)
    # Guard: perturbing the whole tree instead would differ by more than the tolerance.
    whole = metaopt.sam(optax.sgd(lr_sam), rho=rho)
    g = grad(params)
    whole_update, _ = whole.update(g, whole.init(params), params, grad_fn=grad)
    masked_update, _ = tx.update(g, tx.init(params), params, grad_fn=grad, all_params=params)
    assert np.max(np.abs(whole_update["layer"]["w"] - masked_update["layer"]["w"])) > 1e-6


def test_asam_inside_masked_matches_hand_computation():
    params, loss = _masked_problem()
    rho, eta = 0.5, 0.01
    tx = optax.masked(metaopt.scale_by_asam(rho, eta), {"layer": True, "b": False})
    grad = jax.grad(loss)
    g = grad(params)
    out, state = tx.update(g, tx.init(params), params, grad_fn=grad, all_params=params)
    np_params = jax.tree.map(np.asarray, params)
    g_layer = jax.tree.map(np.asarray, g["layer"])
    scale = {k: np.abs(np_params["layer"][k]) + eta for k in ("w", "s")}
    norm = np.sqrt(sum(np.sum((scale[k] * g_layer[k]) ** 2) for k in ("w", "s")))
    perturbed = {
        "layer": {
            k: np_params["layer"][k] + rho * scale[k] ** 2 * g_layer[k] / norm for k in ("w", "s")
        },
        "b": np_params["b"],
    }
    expected = {
        "layer": jax.tree.map(np.asarray, grad(perturbed)["layer"]),
        "b": np.asarray(g["b"]),
    }
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15), out, expected
    )
    expected_norm = np.sqrt(sum(np.sum(g_layer[k] ** 2) for k in ("w", "s")))
    np.testing.assert_allclose(state.inner_state.gradient_norm, expected_norm, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(SHARPNESS_TRANSFORMS))
def test_masked_transform_equals_the_transform_on_the_visible_subproblem(name):
    # Inside optax.masked, a transform acts on the leaves it sees as it would on the loss of
    # those leaves alone, with the hidden leaves held at their current values.
    params, loss = _masked_problem()
    grad = jax.grad(loss)
    tx = SHARPNESS_TRANSFORMS[name]()
    masked = optax.masked(tx, {"layer": {"w": True, "s": False}, "b": True})

    def visible(p):
        return {"w": p["layer"]["w"], "b": p["b"]}

    def sub_grad_fn(q):
        full = {"layer": {"w": q["w"], "s": params["layer"]["s"]}, "b": q["b"]}
        return visible(grad(full))

    g = grad(params)
    expected, expected_state = tx.update(
        visible(g), tx.init(visible(params)), visible(params), grad_fn=sub_grad_fn
    )
    got, state = jax.jit(lambda g, s, p: masked.update(g, s, p, grad_fn=grad, all_params=p))(
        g, masked.init(params), params
    )
    np.testing.assert_allclose(got["layer"]["w"], expected["w"], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(got["b"], expected["b"], rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(got["layer"]["s"], g["layer"]["s"])  # passed through
    assert float(state.inner_state.gradient_norm) == float(expected_state.gradient_norm)


@pytest.mark.parametrize("name", sorted(SHARPNESS_TRANSFORMS))
def test_masked_transform_without_all_params_explains_the_fix(name):
    params, loss = _masked_problem()
    masked = optax.masked(SHARPNESS_TRANSFORMS[name](), {"layer": True, "b": False})
    g = jax.grad(loss)(params)
    with pytest.raises(TypeError, match=r"all_params=params"):
        masked.update(g, masked.init(params), params, grad_fn=jax.grad(loss))


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_huge_float32_gradient_keeps_the_perturbation(name):
    # The squares of 1e30 overflow float32; the norm used to be inf, which silently dropped the
    # perturbation (SAM's gradient was then the plain gradient at the unperturbed point).
    tx = SHARPNESS_TRANSFORMS[name]()
    params = jnp.array([1.0, -2.0, 0.5], jnp.float32)
    huge = jnp.array([1e30, 0.0, -1e30], jnp.float32)
    seen = []

    def grad_fn(p):
        seen.append(p)
        return huge

    _, state = tx.update(huge, tx.init(params), params, grad_fn=grad_fn)
    np.testing.assert_allclose(float(state.gradient_norm), np.sqrt(2.0) * 1e30, rtol=1e-6)
    p64, direction = np.asarray(params, np.float64), np.array([1.0, 0.0, -1.0])
    if name == "sam":
        expected = p64 + 0.05 * direction / np.sqrt(2.0)
    else:  # ASAM with rho 0.5, eta 0.01: eps = rho T^2 g / |T g|
        t = np.abs(p64) + 0.01
        expected = p64 + 0.5 * t**2 * direction / np.linalg.norm(t * direction)
    np.testing.assert_allclose(seen[0], expected, rtol=1e-6)


def test_mask_that_hides_a_whole_subtree():
    # optax.masked replaces a subtree masked out by a prefix mask with a single MaskedNode.
    params, loss = _masked_problem()
    grad = jax.grad(loss)
    g = grad(params)
    tx = optax.masked(metaopt.scale_by_sam(0.1), {"layer": False, "b": True})
    out, _ = tx.update(g, tx.init(params), params, grad_fn=grad, all_params=params)
    g_b = np.asarray(g["b"])
    perturbed = {**params, "b": params["b"] + 0.1 * g_b / np.linalg.norm(g_b)}
    np.testing.assert_allclose(out["b"], grad(perturbed)["b"], rtol=1e-13, atol=1e-15)
    jax.tree.map(np.testing.assert_array_equal, out["layer"], g["layer"])
