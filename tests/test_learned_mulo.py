"""muLO coordinate check: the learned optimizer's feature updates keep their size as width grows.

Therien et al., "muLO: Compute-Efficient Meta-Generalization of Learned Optimizers" (2024),
train the target network in the maximal update parameterization (muP, Yang et al., "Tensor
Programs V", 2021): weights N(0, 1/fan_in) for the input and hidden layers, N(0, 1/fan_in^2)
for the output layer, and the learned update multiplied by 1 for the input layer and the biases
and by 1/fan_in for hidden and output matrices. The learned update has entries of order one at
every width, as Adam's does, so without those multipliers (the standard parameterization: all
weights N(0, 1/fan_in), all multipliers 1) a hidden or output matrix's update changes the next
pre-activations by a sum of `width` aligned terms, which grows linearly with width.

The check (Yang et al.'s coordinate check): `metaopt.tasks.mlp_task("blobs")` MLPs
16 -> w -> w -> 4 (ReLU) for w = 16, 64, 128, 256, in muP (the task's "mup" initialization and
its update multipliers) and in SP, trained for T steps by the untrained learned optimizer on one
fixed minibatch; on a second fixed minibatch, the per-coordinate size (RMS over the units,
averaged over the examples) of each layer's pre-activation change from initialization.
Measured (step_multiplier 1e-3, T = 5):

    width            16        64       128       256    256/16
    muLO  layer 1  9.01e-3   9.21e-3   9.55e-3   9.38e-3    1.04
          layer 2  7.76e-3   7.81e-3   7.94e-3   8.07e-3    1.04
          logits   4.13e-3   3.54e-3   3.84e-3   3.85e-3    0.93
    SP    layer 1  9.10e-3   9.19e-3   9.27e-3   9.20e-3    1.01
          layer 2  1.77e-2   4.83e-2   9.09e-2   1.74e-1    9.8
          logits   2.13e-2   3.72e-2   1.37e-1   2.97e-1   14.0

The first layer's fan-in is the data dimension, which does not grow, so its change is flat in
both parameterizations (its multiplier is 1 in both); the hidden layer and the logits are where
the standard parameterization's updates grow with width and muLO's do not. The test allows
muLO a factor of 2 either way and asks SP for more than 4x.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import learned
from metaopt.tasks import mlp_apply, mlp_task

BATCH = 64
BASE_WIDTH = 16
WIDTHS = (BASE_WIDTH, 4 * BASE_WIDTH, 8 * BASE_WIDTH, 16 * BASE_WIDTH)
STEPS = 5


def pre_activations(params, x):
    """The pre-activations of the hidden layers and the logits of metaopt.tasks.mlp_apply."""
    outputs, h = [], x
    for layer in params:
        z = h @ layer["w"] + layer["b"]
        outputs.append(z)
        h = jax.nn.relu(z)
    return outputs


def coordinate_size(z):
    """RMS over the units, averaged over the examples."""
    return float(jnp.mean(jnp.sqrt(jnp.mean(jnp.square(z), axis=-1))))


def measure(width, description, meta_params):
    """Sizes of the pre-activation changes after STEPS steps: rows muLO and SP, columns the
    layers. The two parameterizations differ only in data (the initialization and the
    multipliers), so one compiled program serves both."""
    inits, multipliers = [], []
    for parameterization in ("mup", "standard"):
        task = mlp_task(
            "blobs", (width, width), batch_size=BATCH, parameterization=parameterization
        )
        params = task.init(jax.random.key(1))
        if parameterization == "mup":
            update_multipliers = task.update_multipliers(params)
            # The task's multipliers are muLO's, as the learned package computes them.
            mulo = learned.mulo_update_multipliers(params, input_layers=["[0]"])
            assert update_multipliers == mulo
            assert [m["w"] for m in mulo] == [1.0, 1 / width, 1 / width]
            assert all(m["b"] == 1.0 for m in mulo)
        else:
            update_multipliers = jax.tree.map(lambda _: 1.0, params)
        x_train, y_train = task.sample_batch(jax.random.key(2))
        x_probe, _ = task.sample_batch(jax.random.key(3))
        np.testing.assert_allclose(
            pre_activations(params, x_train)[-1], mlp_apply(params, x_train), rtol=1e-6
        )
        inits.append(params)
        multipliers.append(update_multipliers)

    def loss(params):
        logits = pre_activations(params, x_train)[-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()

    def changes(params, update_multipliers):
        tx = description.transform(meta_params, update_multipliers=update_multipliers)

        def step(carry, _):
            current, state = carry
            updates, state = tx.update(jax.grad(loss)(current), state, current)
            return (optax.apply_updates(current, updates), state), None

        (final, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=STEPS)
        before, after = pre_activations(params, x_probe), pre_activations(final, x_probe)
        return [b - a for a, b in zip(before, after, strict=True)]

    compiled = jax.jit(changes)
    runs = [compiled(*args) for args in zip(inits, multipliers, strict=True)]
    return np.array([[coordinate_size(delta) for delta in deltas] for deltas in runs])


def test_mulo_feature_updates_stay_flat_as_width_grows_and_sp_updates_grow():
    description = learned.PerParameterMLP()  # the untrained optimizer, step_multiplier 1e-3
    meta_params = description.init(jax.random.key(0))
    sizes = np.stack([measure(w, description, meta_params) for w in WIDTHS])
    mulo, sp = sizes[:, 0], sizes[:, 1]  # [width, layer]
    assert np.all(np.isfinite(sizes)) and np.all(sizes > 1e-4), sizes

    # muLO: every layer's change within a factor 2 of the base width's (measured 0.86-1.06).
    ratios = mulo / mulo[0]
    assert np.all((ratios > 0.5) & (ratios < 2.0)), ratios
    # SP: the hidden layer's and the logits' changes grow more than 4x from 16 to 256 units
    # (measured 9.8x and 14.0x); the first layer's change is flat as under muLO.
    growth = sp[-1] / sp[0]
    assert growth[1] > 4.0 and growth[2] > 4.0, growth
    assert 0.5 < growth[0] < 2.0, growth
    # At the widest network SP's hidden change is several times muLO's.
    assert sp[-1, 1] > 4.0 * mulo[-1, 1], sizes[-1]
