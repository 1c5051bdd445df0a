"""metaopt.nnx_grad_fn: sharpness-aware training of a flax NNX module through nnx.Optimizer.

The reference is the same network written as a plain function of a dict of arrays and trained
with plain optax under jax.jit; in float32 both must give the same weights after several steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt

nnx = pytest.importorskip("flax.nnx")

F32 = jnp.float32
STEPS = 5


class MLP(nnx.Module):
    def __init__(self, seed, *, norm=False, dropout=0.0):
        rngs = nnx.Rngs(seed)
        self.hidden = nnx.Linear(3, 16, rngs=rngs, param_dtype=F32, dtype=F32)
        self.norm = nnx.BatchNorm(16, rngs=rngs, param_dtype=F32, dtype=F32) if norm else None
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.out = nnx.Linear(16, 1, rngs=rngs, param_dtype=F32, dtype=F32)

    def __call__(self, x):
        h = self.hidden(x)
        if self.norm is not None:
            h = self.norm(h)
        h = nnx.relu(h)
        if self.drop is not None:
            h = self.drop(h)
        return self.out(h)


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def plain_loss(p, x, y):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)


def batches():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 1))
    for _ in range(STEPS):
        x = rng.normal(size=(32, 3)).astype(np.float32)
        yield jnp.asarray(x), jnp.asarray(np.sin(x @ w).astype(np.float32))


def plain_params(model):
    return {
        "w1": model.hidden.kernel[...],
        "b1": model.hidden.bias[...],
        "w2": model.out.kernel[...],
        "b2": model.out.bias[...],
    }


FAMILIES = {
    "sam": lambda: metaopt.sam(optax.sgd(0.1, momentum=0.9), rho=0.05),
    "asam": lambda: metaopt.asam(optax.sgd(0.1), rho=0.5),
    "gam": lambda: metaopt.gam(optax.sgd(0.1)),
    "gradient_regularization": lambda: metaopt.gradient_regularization(optax.adam(1e-2)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nnx_training_equals_plain_optax_training(family):
    model = MLP(0)
    optimizer = nnx.Optimizer(model, FAMILIES[family](), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        grad_fn = metaopt.nnx_grad_fn(model, loss_fn, x, y)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads, grad_fn=grad_fn)
        return loss

    tx = FAMILIES[family]()
    params = plain_params(model)
    state = tx.init(params)

    @jax.jit
    def plain_step(params, state, x, y):
        grad_fn = lambda p: jax.grad(plain_loss)(p, x, y)
        loss, grads = jax.value_and_grad(plain_loss)(params, x, y)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state, loss

    for x, y in batches():
        nnx_loss = nnx_step(model, optimizer, x, y)
        params, state, loss = plain_step(params, state, x, y)
        np.testing.assert_allclose(nnx_loss, loss, rtol=1e-6)
    assert params["w1"].dtype == model.hidden.kernel[...].dtype == F32
    moved = np.max(np.abs(np.asarray(params["w1"]) - np.asarray(MLP(0).hidden.kernel[...])))
    assert moved > 1e-2  # the comparison is not between two unchanged models
    for name, got in plain_params(model).items():
        np.testing.assert_allclose(got, params[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_second_pass_leaves_batch_statistics_and_dropout_rng_alone():
    # After a SAM step, the module's batch-norm running statistics and dropout RNG counter
    # are those of one forward pass (the first gradient), not of two.
    model = MLP(1, norm=True, dropout=0.2)
    optimizer = nnx.Optimizer(model, metaopt.sam(optax.sgd(0.1)), wrt=nnx.Param)
    x, y = next(batches())
    one_pass = nnx.clone(model)
    nnx.grad(loss_fn)(one_pass, x, y)

    @nnx.jit
    def step(model, optimizer, x, y):
        grad_fn = metaopt.nnx_grad_fn(model, loss_fn, x, y)
        grads = nnx.grad(loss_fn)(model, x, y)
        optimizer.update(model, grads, grad_fn=grad_fn)

    step(model, optimizer, x, y)
    np.testing.assert_array_equal(model.norm.mean[...], one_pass.norm.mean[...])
    np.testing.assert_array_equal(model.norm.var[...], one_pass.norm.var[...])
    assert int(model.drop.rngs.count[...]) == int(one_pass.drop.rngs.count[...]) == 1
    assert not np.array_equal(model.norm.mean[...], MLP(1, norm=True).norm.mean[...])


def test_made_before_the_first_gradient_it_sees_the_same_dropout_masks():
    model = MLP(2, dropout=0.5)
    x, y = next(batches())
    grad_fn = metaopt.nnx_grad_fn(model, loss_fn, x, y)
    first = nnx.grad(loss_fn)(model, x, y)
    again = grad_fn(nnx.state(model, nnx.Param))
    assert jax.tree.structure(again) == jax.tree.structure(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    # Made after it, the RNG counter has moved on: other masks, another gradient.
    later = metaopt.nnx_grad_fn(model, loss_fn, x, y)(nnx.state(model, nnx.Param))
    assert not np.array_equal(later["hidden"]["kernel"], again["hidden"]["kernel"])


def test_wrt_and_has_aux():
    # Only the output layer is trained; the loss also returns its predictions.
    model = MLP(3)
    wrt = nnx.All(nnx.Param, nnx.PathContains("out"))
    optimizer = nnx.Optimizer(model, metaopt.sam(optax.sgd(0.1)), wrt=wrt)
    hidden_before = model.hidden.kernel[...]

    def loss_with_predictions(model, x, y):
        predictions = model(x)
        return jnp.mean((predictions - y) ** 2), predictions

    @nnx.jit
    def step(model, optimizer, x, y):
        grad_fn = metaopt.nnx_grad_fn(model, loss_with_predictions, x, y, wrt=wrt, has_aux=True)
        diff_state = nnx.DiffState(0, wrt)
        (loss, _), grads = nnx.value_and_grad(
            loss_with_predictions, argnums=diff_state, has_aux=True
        )(model, x, y)
        optimizer.update(model, grads, grad_fn=grad_fn)
        return loss

    losses = [float(step(model, optimizer, x, y)) for x, y in batches()]
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(model.hidden.kernel[...], hidden_before)

    # The same steps on the plain function, training w2 and b2 only.
    params = plain_params(MLP(3))
    tx = metaopt.sam(optax.sgd(0.1))
    trained = {"w2": params["w2"], "b2": params["b2"]}
    state = tx.init(trained)
    for x, y in batches():

        def plain_grad(t, x=x, y=y):
            return jax.grad(lambda t: plain_loss({**params, **t}, x, y))(t)

        updates, state = tx.update(plain_grad(trained), state, trained, grad_fn=plain_grad)
        trained = optax.apply_updates(trained, updates)
    np.testing.assert_allclose(model.out.kernel[...], trained["w2"], rtol=1e-6, atol=1e-6)


def test_a_grad_fn_returning_variables_gets_a_message_that_names_the_fix():
    # The obvious NNX grad_fn: nnx.grad on an updated clone returns nnx.Param variables.
    model = MLP(4)
    optimizer = nnx.Optimizer(model, metaopt.sam(optax.sgd(0.1)), wrt=nnx.Param)
    x, y = next(batches())

    def naive_grad_fn(params):
        clone = nnx.clone(model)
        nnx.update(clone, params)
        return nnx.grad(loss_fn)(clone, x, y)

    grads = nnx.grad(loss_fn)(model, x, y)
    with pytest.raises(ValueError, match=r"grad_fn\(params\) and params .*metaopt\.nnx_grad_fn"):
        optimizer.update(model, grads, grad_fn=naive_grad_fn)


def test_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match=r"model must be a flax\.nnx\.Module, got dict"):
        metaopt.nnx_grad_fn({"w": jnp.zeros(3)}, loss_fn)
