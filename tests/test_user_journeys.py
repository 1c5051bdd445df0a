"""User journeys: what an engineer who uses JAX, optax and flax daily writes on day one.

Every test is written as a user would write it, with public names only (``metaopt``, ``optax``,
``flax.nnx``, ``orbax.checkpoint``), and checks a number against an independent run: the same
optimizer fed by hand what the wrapper should feed it, or a closed form. The four families are
AdEMAMix, Shampoo, SOAP and SAM. Learning rates are passed positionally and Shampoo's and SOAP's
damping keeps its default, so these tests do not depend on those argument names.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from metaopt.implicit import custom_root

F32 = jnp.float32

# Each family at a learning rate; preconditioners refreshed every 2 steps so that the short
# runs below use them.
FAMILIES = {
    "ademamix": lambda lr: metaopt.ademamix(lr),
    "shampoo": lambda lr: metaopt.shampoo(lr, preconditioning_frequency=2),
    "soap": lambda lr: metaopt.soap(lr, preconditioning_frequency=2),
    "sam": lambda lr: metaopt.sam(optax.adam(lr), rho=0.05),
}
NAMES = sorted(FAMILIES)


def make_batches(n, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 3))
    out = []
    for _ in range(n):
        x = rng.normal(size=(16, 4))
        out.append((jnp.asarray(x, F32), jnp.asarray(np.tanh(x @ w), F32)))
    return out


def init_params():
    rng = np.random.default_rng(1)
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3)), F32),
        "b": jnp.asarray(rng.normal(size=(3,)), F32),
    }


def loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


# --- flax NNX -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", NAMES)
def test_nnx_training_loss_falls(family):
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(4, 16, rngs=rngs)
            self.out = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x)))

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, FAMILIES[family](1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        extra = {"grad_fn": metaopt.nnx_grad_fn(model, loss_fn, x, y)} if family == "sam" else {}
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads, **extra)
        return loss

    batches = make_batches(4)
    x_all = jnp.concatenate([x for x, _ in batches])
    y_all = jnp.concatenate([y for _, y in batches])
    before = float(loss_fn(model, x_all, y_all))
    for _ in range(8):
        for x, y in batches:
            train_step(model, optimizer, x, y)
    after = float(loss_fn(model, x_all, y_all))
    assert after < 0.5 * before, (before, after)


# --- optax.chain with gradient clipping ---------------------------------------------------------


def sam_gradient(params, x, y, rho=0.05):
    """SAM's gradient written out: the gradient at the normalized ascent step."""
    g = jax.grad(loss)(params, x, y)
    norm = optax.tree.norm(g)
    return jax.grad(loss)(jax.tree.map(lambda p, d: p + rho * d / norm, params, g), x, y)


@pytest.mark.parametrize("family", NAMES)
def test_chain_with_clip_by_global_norm(family):
    # The clipped optimizer's step equals the plain optimizer's step on the clipped gradient.
    # For SAM the clip goes into the base optimizer, where it clips SAM's gradient: clipping
    # the incoming gradient would change nothing, since SAM uses only its direction.
    max_norm = 0.1
    if family == "sam":
        clipped = metaopt.sam(optax.chain(optax.clip_by_global_norm(max_norm), optax.adam(1e-2)))
        reference, reference_gradient = optax.adam(1e-2), sam_gradient
    else:
        clipped = optax.chain(optax.clip_by_global_norm(max_norm), FAMILIES[family](1e-2))
        reference, reference_gradient = FAMILIES[family](1e-2), jax.grad(loss)

    def clip(g):
        norm = optax.tree.norm(g)
        assert norm > 2 * max_norm  # the clip is active
        return jax.tree.map(lambda t: (t / norm) * max_norm, g)

    clipped_update, reference_update = jitted_update(clipped, family), jax.jit(reference.update)
    params = reference_params = init_params()
    state, reference_state = clipped.init(params), reference.init(params)
    for x, y in make_batches(4):
        grads = jax.grad(loss)(params, x, y)
        updates, state = clipped_update(grads, state, params, x, y)
        params = optax.apply_updates(params, updates)
        g = clip(reference_gradient(reference_params, x, y))
        updates, reference_state = reference_update(g, reference_state, reference_params)
        reference_params = optax.apply_updates(reference_params, updates)
    assert_trees_close(params, reference_params)


# --- inject_hyperparams: a learning-rate change mid-run ----------------------------------------


def jitted_update(opt, family, loss_fn=loss, **more):
    """``opt.update`` under ``jax.jit``, as a training step calls it: (grads, state, params, x, y).

    SAM's ``grad_fn`` is built inside from the batch, on the same loss.
    """

    def update(grads, state, params, x, y):
        extra = {"grad_fn": lambda p: jax.grad(loss_fn)(p, x, y)} if family == "sam" else {}
        return opt.update(grads, state, params, **extra, **more)

    return jax.jit(update)


def updates_at(opt, family, params, batches, loss_fn=loss, **more):
    """The updates ``opt`` proposes at fixed parameters for a sequence of batches.

    With the parameters held fixed, each update is a function of the gradients seen and the
    hyperparameters only, so two optimizers can be compared step by step.
    """
    update = jitted_update(opt, family, loss_fn, **more)
    state = opt.init(params)
    out = []
    for x, y in batches:
        updates, state = update(jax.grad(loss_fn)(params, x, y), state, params, x, y)
        out.append(updates)
    return out, state


def injected(family, learning_rate):
    """The family with its learning rate injected; SAM's belongs to its base optimizer.

    Injected hyperparameters are float32 arrays, as they are in a float32 program (this test
    session enables float64, which would make them float64 and round differently).
    """
    if family == "sam":
        return metaopt.sam(
            optax.inject_hyperparams(optax.adam, hyperparam_dtype=F32)(learning_rate), rho=0.05
        )
    if family == "ademamix":
        return optax.inject_hyperparams(metaopt.ademamix, hyperparam_dtype=F32)(learning_rate)
    # Integers are static: inject_hyperparams would otherwise turn them into arrays.
    factory = metaopt.shampoo if family == "shampoo" else metaopt.soap
    return optax.inject_hyperparams(
        factory, static_args=("preconditioning_frequency",), hyperparam_dtype=F32
    )(learning_rate, preconditioning_frequency=2)


@pytest.mark.parametrize("family", NAMES)
def test_inject_hyperparams_learning_rate_change_takes_effect(family):
    params, batches = init_params(), make_batches(6)
    opt = injected(family, 1e-2)
    update = jitted_update(opt, family)
    state = opt.init(params)
    changed = []
    for i, (x, y) in enumerate(batches):
        if i == 3:  # the usual optax idiom: edit the hyperparameter in the state
            hyperparams = state[1].hyperparams if family == "sam" else state.hyperparams
            hyperparams["learning_rate"] = jnp.asarray(1e-3, F32)
        updates, state = update(jax.grad(loss)(params, x, y), state, params, x, y)
        changed.append(updates)
    # The references are the same injected optimizer, run at one rate throughout (Shampoo's
    # first roots are ill-conditioned, and a traced hyperparameter compiles to other roundings
    # than a constant one, so the plain optimizer differs from the injected one at 1e-4).
    at_new_rate, _ = updates_at(injected(family, 1e-3), family, params, batches)
    at_old_rate, _ = updates_at(injected(family, 1e-2), family, params, batches)
    for step in range(3):
        assert_trees_close(changed[step], at_old_rate[step])
    for step in range(3, 6):
        assert_trees_close(changed[step], at_new_rate[step])
        old, new = (np.asarray(t[step]["w"]) for t in (at_old_rate, changed))
        assert np.max(np.abs(old - new)) > 0.5 * np.max(np.abs(old))


# --- optax wrappers around each family -----------------------------------------------------------


def loss_of_w(params_w, x, y):
    """The loss as a function of ``w`` alone, ``b`` held at its initial value."""
    return loss({**params_w, "b": init_params()["b"]}, x, y)


def zeros_like_tree(tree):
    return jax.tree.map(jnp.zeros_like, tree)


@pytest.mark.parametrize("family", NAMES)
def test_multi_steps(family):
    # Two mini-batches, then one step of the inner optimizer on their mean gradient. For SAM
    # the inner update runs at the last mini-step, with that mini-step's grad_fn.
    params, batches = init_params(), make_batches(2)
    opt = optax.MultiSteps(FAMILIES[family](1e-2), every_k_schedule=2)
    got, _ = updates_at(opt, family, params, batches)
    assert_trees_close(got[0], zeros_like_tree(params), atol=0)
    g1, g2 = (jax.grad(loss)(params, x, y) for x, y in batches)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    inner = FAMILIES[family](1e-2)
    x, y = batches[1]
    want, _ = jitted_update(inner, family)(mean, inner.init(params), params, x, y)
    assert_trees_close(got[1], want)


@pytest.mark.parametrize("family", NAMES)
def test_apply_if_finite(family):
    # A NaN gradient is skipped (zero update, inner state untouched); the next finite step is
    # the inner optimizer's first step.
    params, ((x, y),) = init_params(), make_batches(1)
    opt = optax.apply_if_finite(FAMILIES[family](1e-2), max_consecutive_errors=3)
    update = jitted_update(opt, family)
    state = opt.init(params)
    grads = jax.grad(loss)(params, x, y)
    nan_grads = {**grads, "w": grads["w"].at[0, 0].set(jnp.nan)}
    updates, state = update(nan_grads, state, params, x, y)
    assert_trees_close(updates, zeros_like_tree(params), atol=0)
    assert int(state.notfinite_count) == 1
    updates, state = update(grads, state, params, x, y)
    assert int(state.notfinite_count) == 0
    inner = FAMILIES[family](1e-2)
    want, _ = jitted_update(inner, family)(grads, inner.init(params), params, x, y)
    assert_trees_close(updates, want)


@pytest.mark.parametrize("family", NAMES)
@pytest.mark.parametrize("wrapper", ["multi_transform", "masked"])
def test_multi_transform_and_masked(family, wrapper):
    # The family trains w only. Its updates equal the family's on w alone, with b held fixed
    # (for SAM: the perturbation covers w only). With multi_transform b is frozen; with masked
    # b's gradient passes through unchanged. SAM needs the whole tree as all_params.
    params, batches = init_params(), make_batches(3)
    if wrapper == "multi_transform":
        opt = optax.multi_transform(
            {"family": FAMILIES[family](1e-2), "frozen": optax.set_to_zero()},
            {"w": "family", "b": "frozen"},
        )
    else:
        opt = optax.masked(FAMILIES[family](1e-2), {"w": True, "b": False})
    more = {"all_params": params} if family == "sam" else {}
    got, _ = updates_at(opt, family, params, batches, **more)
    want, _ = updates_at(FAMILIES[family](1e-2), family, {"w": params["w"]}, batches, loss_of_w)
    for step, (x, y) in enumerate(batches):
        assert_trees_close(got[step]["w"], want[step]["w"])
        b_update = jax.grad(loss)(params, x, y)["b"] if wrapper == "masked" else 0.0
        np.testing.assert_array_equal(got[step]["b"], jnp.broadcast_to(b_update, (3,)))


# --- Orbax: save a Shampoo state, restore it, continue bit for bit -------------------------------


def test_orbax_checkpoint_of_a_shampoo_state_continues_bit_for_bit(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    opt = metaopt.shampoo(1e-2, preconditioning_frequency=2)

    @jax.jit
    def train_step(params, opt_state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    batches = make_batches(8)
    params = init_params()
    opt_state = opt.init(params)
    for x, y in batches[:3]:  # stop between two preconditioner refreshes
        params, opt_state = train_step(params, opt_state, x, y)

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "step3", {"params": params, "opt_state": opt_state})
    checkpointer.wait_until_finished()

    for x, y in batches[3:]:
        params, opt_state = train_step(params, opt_state, x, y)
    uninterrupted = {"params": params, "opt_state": opt_state}

    # A new process knows only the model and the optimizer: it builds the tree to restore into.
    fresh = {"params": init_params(), "opt_state": opt.init(init_params())}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
    restored = checkpointer.restore(tmp_path / "step3", abstract)
    checkpointer.close()
    assert jax.tree.structure(restored) == jax.tree.structure(fresh)
    assert int(restored["opt_state"][0].count) == 3
    params, opt_state = restored["params"], restored["opt_state"]
    for x, y in batches[3:]:
        params, opt_state = train_step(params, opt_state, x, y)
    resumed = {"params": params, "opt_state": opt_state}
    assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


# --- A jaxopt-style hypergradient ----------------------------------------------------------------


def test_hypergradient_of_ridge_regression_through_custom_root():
    # Ridge regression solved iteratively, differentiated with respect to the regularization
    # strength by the implicit function theorem, against the closed form.
    rng = np.random.default_rng(3)
    x_train, x_val = (jnp.asarray(rng.normal(size=(40, 5))) for _ in range(2))
    w_true = jnp.asarray(rng.normal(size=5))
    y_train = x_train @ w_true + 0.5 * jnp.asarray(rng.normal(size=40))
    y_val = x_val @ w_true

    def ridge_objective(w, lam):
        return 0.5 * jnp.sum((x_train @ w - y_train) ** 2) + 0.5 * lam * jnp.sum(w**2)

    @custom_root(jax.grad(ridge_objective))
    def ridge_solver(init_w, lam):
        matvec = lambda w: x_train.T @ (x_train @ w) + lam * w
        w, _ = jax.scipy.sparse.linalg.cg(matvec, x_train.T @ y_train, x0=init_w, tol=1e-12)
        return w

    def validation_loss(lam):
        w = ridge_solver(jnp.zeros(5), lam)
        return 0.5 * jnp.sum((x_val @ w - y_val) ** 2)

    def closed_form_validation_loss(lam):
        w = jnp.linalg.solve(x_train.T @ x_train + lam * jnp.eye(5), x_train.T @ y_train)
        return 0.5 * jnp.sum((x_val @ w - y_val) ** 2)

    lam = jnp.asarray(3.0)
    hypergradient = jax.grad(validation_loss)(lam)
    expected = jax.grad(closed_form_validation_loss)(lam)
    assert hypergradient.dtype == jnp.float64
    assert abs(float(expected)) > 1e-3  # not a trivially zero derivative
    np.testing.assert_allclose(hypergradient, expected, rtol=1e-8)
    np.testing.assert_allclose(jax.jit(jax.grad(validation_loss))(lam), expected, rtol=1e-8)
