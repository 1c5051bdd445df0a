"""The pretrained learned optimizers load offline from package data and train unseen tasks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import learned, tasks


def test_every_pretrained_optimizer_loads_with_its_metadata():
    for name in learned.PRETRAINED:
        optimizer, meta_params = learned.load_pretrained(name)
        optimizer.check_meta_params(meta_params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(meta_params))
        metadata = learned.pretrained_metadata(name)
        assert metadata["command"].startswith("python examples/train_learned_optimizer.py")
        assert f"--parameterization={optimizer.parameterization}" in metadata["command"]
        assert np.isfinite(metadata["final_meta_loss"])
        assert metadata["meta_training_wall_time_s"] > 0


def test_unknown_name_and_missing_multipliers_are_clear_errors():
    with pytest.raises(ValueError, match=r"name must be one of \('default', 'mulo'\).*'adam'"):
        learned.pretrained("adam")
    with pytest.raises(ValueError, match="update_multipliers"):
        learned.pretrained("mulo")


def _final_train_loss(task, tx, steps=200, seed=0):
    params = task.init(jax.random.key(seed))

    def step(carry, key):
        params, state = carry
        grads = jax.grad(task.loss)(params, task.sample_batch(key))
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    keys = jax.random.split(jax.random.key(seed + 1), steps)
    (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, keys))((params, tx.init(params)))
    return float(task.evaluate(params)["train_loss"]), float(
        task.evaluate(task.init(jax.random.key(seed)))["train_loss"]
    )


@pytest.mark.parametrize("name", learned.PRETRAINED)
def test_pretrained_trains_a_data_set_meta_training_never_saw(name):
    # breast_cancer is held out of the meta-training distribution. Measured (200 steps, seed 0):
    # see docs/learned-optimizers.md; here only "it trains": the loss falls by 10x or more.
    parameterization = "mup" if name == "mulo" else "standard"
    task = tasks.mlp_task(
        "breast_cancer", (32, 32), batch_size=64, parameterization=parameterization
    )
    params = jax.eval_shape(task.init, jax.random.key(0))
    multipliers = task.update_multipliers(params) if name == "mulo" else None
    final, initial = _final_train_loss(
        task, learned.pretrained(name, update_multipliers=multipliers)
    )
    assert final < initial / 10, (final, initial)
