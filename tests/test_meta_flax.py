"""meta.nnx_loss: a flax NNX module with batch norm gives the plain function's meta-gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import meta
from metaopt.tasks import sinusoid_tasks

nnx = pytest.importorskip("flax.nnx")


def _model():
    model = nnx.Sequential(
        nnx.Linear(1, 6, rngs=nnx.Rngs(0), param_dtype=jnp.float64, dtype=jnp.float64),
        nnx.BatchNorm(
            6,
            rngs=nnx.Rngs(1),
            param_dtype=jnp.float64,
            dtype=jnp.float64,
            use_running_average=False,
        ),
        nnx.relu,
        nnx.Linear(6, 1, rngs=nnx.Rngs(2), param_dtype=jnp.float64, dtype=jnp.float64),
    )
    # flax keeps running statistics in float32 whatever param_dtype says; in this float64
    # suite, writing a batch's float64 statistics into them warns.
    norm = model.layers[1]
    # (New variables rather than Variable.set_value, which flax 0.11, the extra's floor, lacks.)
    norm.mean = nnx.BatchStat(jnp.zeros(6, jnp.float64))
    norm.var = nnx.BatchStat(jnp.ones(6, jnp.float64))
    return model


def _plain_loss(p, batch):
    # The same network written out: batch norm with the batch's own statistics (train mode).
    x, y = batch
    h = x @ p["w1"] + p["b1"]
    mean, var = jnp.mean(h, axis=0), jnp.var(h, axis=0)
    h = (h - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["shift"]
    h = jax.nn.relu(h)
    return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)


def test_nnx_module_with_batch_norm_matches_the_plain_function():
    model = _model()
    params, loss_fn = meta.nnx_loss(model, lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2))
    linear1, norm, _, linear2 = model.layers
    plain = {
        "w1": linear1.kernel[...],
        "b1": linear1.bias[...],
        "scale": norm.scale[...],
        "shift": norm.bias[...],
        "w2": linear2.kernel[...],
        "b2": linear2.bias[...],
    }
    tasks = sinusoid_tasks(jax.random.key(0), 4, shots=8, dtype=jnp.float64)
    inner = meta.InnerLoop(optax.sgd(0.05), steps=2)
    grad = jax.jit(jax.grad(lambda p, f: meta.maml_loss(p, tasks, f, inner)[0]), static_argnums=1)
    got, want = grad(params, loss_fn), grad(plain, _plain_loss)
    pairs = {
        "w1": got["layers"][0]["kernel"],
        "b1": got["layers"][0]["bias"],
        "scale": got["layers"][1]["scale"],
        "shift": got["layers"][1]["bias"],
        "w2": got["layers"][3]["kernel"],
        "b2": got["layers"][3]["bias"],
    }
    for name, value in pairs.items():
        np.testing.assert_allclose(jnp.asarray(value[...]), want[name], rtol=1e-10, atol=1e-14)
    # Running statistics are constants: meta-training neither differentiates nor updates them.
    assert "mean" not in str(jax.tree.structure(params))
    np.testing.assert_array_equal(norm.mean[...], np.zeros(6))


def test_nnx_loss_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match=r"nnx\.Module"):
        meta.nnx_loss(lambda x: x, lambda m, b: 0.0)
