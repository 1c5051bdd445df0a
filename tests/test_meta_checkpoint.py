"""Meta-training state survives an Orbax checkpoint: a resumed run continues bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import meta
from metaopt.tasks import init_mlp, sinusoid_tasks

ocp = pytest.importorskip("orbax.checkpoint")


def _loss(params, batch):
    x, y = batch
    h = jax.nn.relu(x @ params[0]["w"] + params[0]["b"])
    return jnp.mean((h @ params[1]["w"] + params[1]["b"] - y) ** 2)


INNER = meta.InnerLoop(optax.sgd(0.01), steps=2)
OUTER = optax.adam(1e-3)


@jax.jit
def _meta_step(state):
    key, sample = jax.random.split(jax.random.wrap_key_data(state["key"]))
    tasks = sinusoid_tasks(sample, 4, shots=5)
    grads, _ = jax.grad(meta.maml_loss, has_aux=True)(state["params"], tasks, _loss, INNER)
    updates, opt_state = OUTER.update(grads, state["opt_state"], state["params"])
    return {
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
        "key": jax.random.key_data(key),
        "step": state["step"] + 1,
    }


def _run(state, steps):
    for _ in range(steps):
        state = _meta_step(state)
    return state


def test_resumed_meta_training_continues_bit_for_bit(tmp_path):
    params = init_mlp(jax.random.key(0), [1, 16, 1])
    start = {
        "params": params,
        "opt_state": OUTER.init(params),
        "key": jax.random.key_data(jax.random.key(1)),
        "step": jnp.zeros([], jnp.int32),
    }
    straight = _run(start, 6)
    halfway = _run(start, 3)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "meta", halfway)
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, halfway)
    resumed = _run(checkpointer.restore(tmp_path / "meta", target), 3)
    assert jax.tree.structure(resumed) == jax.tree.structure(straight)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(resumed["step"]) == 6
