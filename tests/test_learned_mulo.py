"""muLO coordinate check: the learned optimizer's feature updates keep their size as width grows.

Therien et al., "muLO: Compute-Efficient Meta-Generalization of Learned Optimizers" (2024),
train the target network in the maximal update parameterization (muP, Yang et al., "Tensor
Programs V", 2021): weights N(0, 1/fan_in) for the input and hidden layers, N(0, 1/fan_in^2)
for the output layer, and the learned update multiplied by 1 for the input layer and the biases
and by 1/fan_in for hidden and output matrices. The learned update has entries of order one at
every width, as Adam's does, so without those multipliers (the standard parameterization: all
weights N(0, 1/fan_in), all multipliers 1) a hidden or output matrix's update changes the next
pre-activations by a sum of `width` aligned terms, which grows linearly with width.

The check (Yang et al.'s coordinate check): bias-free MLPs 16 -> w -> w -> 4 for w = 16, 64,
128, 256, trained for T steps by the untrained learned optimizer on one fixed batch; on a second
fixed batch, the per-coordinate size (RMS over the units, averaged over the examples) of each
layer's pre-activation change from initialization. Measured (step_multiplier 1e-3, T = 5):

    width            16        64       128       256    256/16
    muLO  layer 1  8.46e-3   8.61e-3   8.54e-3   8.49e-3    1.00
          layer 2  5.97e-3   6.27e-3   6.17e-3   6.18e-3    1.04
          logits   1.07e-3   1.02e-3   7.81e-4   7.52e-4    0.70
    SP    layer 1  8.45e-3   8.32e-3   8.47e-3   8.22e-3    0.97
          layer 2  1.48e-2   4.94e-2   9.86e-2   1.88e-1   12.8
          logits   1.49e-2   8.02e-2   1.80e-1   3.15e-1   21.1

The first layer's fan-in is the data dimension, which does not grow, so its change is flat in
both parameterizations (its multiplier is 1 in both); the hidden layer and the logits are where
the standard parameterization's updates grow with width and muLO's do not. muLO's logit change
has two parts, the output update acting on the features (of order one at every width) and the
initial output weights, N(0, 1/w^2), acting on the features' change, which vanishes as w
grows: at 16 units it still adds to the first part, hence the ratio 0.70. The test allows a
factor of 2 either way.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import learned

INPUTS, CLASSES, BATCH = 16, 4, 64
BASE_WIDTH = 16
WIDTHS = (BASE_WIDTH, 4 * BASE_WIDTH, 8 * BASE_WIDTH, 16 * BASE_WIDTH)
STEPS = 5


def init_mlp(key, width, mup, biases=False):
    """16 -> width -> width -> 4; muP draws the output layer N(0, 1/fan_in^2).

    Without biases by default: they start at zero and take multiplier 1 in both
    parameterizations, so they do not change the comparison, and each tensor costs about a
    second of compilation.
    """
    shapes = [(INPUTS, width), (width, width), (width, CLASSES)]
    params = []
    for i, (k, shape) in enumerate(zip(jax.random.split(key, 3), shapes, strict=True)):
        fan_in = shape[0]
        std = 1.0 / fan_in if mup and i == len(shapes) - 1 else fan_in**-0.5
        layer = {"w": std * jax.random.normal(k, shape, jnp.float32)}
        if biases:
            layer["b"] = jnp.zeros(shape[1], jnp.float32)
        params.append(layer)
    return params


def pre_activations(params, x):
    """The pre-activations of the two hidden layers and the logits."""
    outputs, h = [], x
    for layer in params:
        z = h @ layer["w"] + layer.get("b", 0.0)
        outputs.append(z)
        h = jax.nn.relu(z)
    return outputs


def coordinate_size(z):
    """RMS over the units, averaged over the examples."""
    return float(jnp.mean(jnp.sqrt(jnp.mean(jnp.square(z), axis=-1))))


def measure(width, description, meta_params, data):
    """Sizes of the pre-activation changes after STEPS steps: rows muLO and SP, columns the
    layers. The two parameterizations differ only in data (the initialization and the
    multipliers), so one compiled program serves both."""
    x_train, y_train, x_probe = data
    key = jax.random.key(1)
    inits = [init_mlp(key, width, mup) for mup in (True, False)]
    mulo = learned.mulo_update_multipliers(inits[0], input_layers=["[0]"])
    assert mulo == [{"w": 1.0}, {"w": 1.0 / width}, {"w": 1.0 / width}]
    multipliers = [mulo, jax.tree.map(lambda _: 1.0, mulo)]

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
    rng = np.random.default_rng(0)
    data = (
        jnp.asarray(rng.normal(size=(BATCH, INPUTS)), jnp.float32),
        jnp.asarray(rng.integers(0, CLASSES, size=BATCH)),
        jnp.asarray(rng.normal(size=(BATCH, INPUTS)), jnp.float32),
    )
    description = learned.PerParameterMLP()  # the untrained optimizer, step_multiplier 1e-3
    meta_params = description.init(jax.random.key(0))
    sizes = np.stack([measure(w, description, meta_params, data) for w in WIDTHS])
    mulo, sp = sizes[:, 0], sizes[:, 1]  # [width, layer]
    assert np.all(np.isfinite(sizes)) and np.all(sizes > 1e-4), sizes

    # muLO: every layer's change within a factor 2 of the base width's (measured 0.70-1.04).
    ratios = mulo / mulo[0]
    assert np.all((ratios > 0.5) & (ratios < 2.0)), ratios
    # SP: the hidden layer's and the logits' changes grow more than 4x from 16 to 256 units
    # (measured 12.8x and 21.1x); the first layer's change is flat as under muLO.
    growth = sp[-1] / sp[0]
    assert growth[1] > 4.0 and growth[2] > 4.0, growth
    assert 0.5 < growth[0] < 2.0, growth
    # At the widest network SP's hidden change is several times muLO's.
    assert sp[-1, 1] > 4.0 * mulo[-1, 1], sizes[-1]


def test_mulo_multipliers_of_the_checked_network():
    params = init_mlp(jax.random.key(0), 32, mup=True, biases=True)
    got = learned.mulo_update_multipliers(params, input_layers=["[0]"])
    assert got == [{"w": 1.0, "b": 1.0}, {"w": 1 / 32, "b": 1.0}, {"w": 1 / 32, "b": 1.0}]
