"""The quality benchmark: steps to a target loss at each method's best learning rate."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from benchmarks import harness
from benchmarks.shampoo.common import (
    ADAM,
    ADAMW,
    make_shampoo,
    make_soap,
    transformer_loss,
    transformer_parameters,
)

_LEARNING_RATES = flags.DEFINE_list(
    "shampoo_learning_rates",
    ["1e-3", "3e-3", "1e-2", "3e-2"],
    "Learning-rate grid of the quality runs, the same for every method.",
)
_QUALITY_FREQUENCY = flags.DEFINE_integer(
    "shampoo_quality_frequency",
    10,
    "Shampoo's preconditioning_frequency in quality runs.",
    lower_bound=1,
)
_DIGITS_HIDDEN = flags.DEFINE_list(
    "shampoo_digits_hidden", ["32", "16", "32"], "Hidden widths of the linear autoencoder."
)
_DIGITS_STEPS = flags.DEFINE_integer(
    "shampoo_digits_steps", 1000, "Full-batch steps on the digits autoencoder.", lower_bound=1
)
_DIGITS_TARGET = flags.DEFINE_float(
    "shampoo_digits_target",
    0.01,
    "Target: loss at most (1 + this) times the PCA optimum.",
    lower_bound=0.0,
)
_MARKOV_VOCAB = flags.DEFINE_integer(
    "shampoo_markov_vocab", 32, "Markov chain states.", lower_bound=2
)
_MARKOV_SEQUENCE = flags.DEFINE_integer(
    "shampoo_markov_seq_len", 32, "Tokens per Markov sequence.", lower_bound=3
)
_MARKOV_WIDTH = flags.DEFINE_integer(
    "shampoo_markov_d_model", 64, "Transformer width on the Markov task.", lower_bound=1
)
_MARKOV_HEADS = flags.DEFINE_integer(
    "shampoo_markov_heads", 4, "Attention heads on the Markov task.", lower_bound=1
)
_MARKOV_BATCH = flags.DEFINE_integer(
    "shampoo_markov_batch", 32, "Sequences per minibatch on the Markov task.", lower_bound=1
)
_MARKOV_STEPS = flags.DEFINE_integer(
    "shampoo_markov_steps", 800, "Training steps on the Markov task.", lower_bound=1
)
_MARKOV_EVAL_EVERY = flags.DEFINE_integer(
    "shampoo_markov_eval_every", 20, "Steps between held-out evaluations.", lower_bound=1
)
_MARKOV_TARGET = flags.DEFINE_float(
    "shampoo_markov_target",
    0.3,
    "Target: held-out loss at most the chain's own loss plus this many nats.",
    lower_bound=0.0,
)
_PLOT_DIR = flags.DEFINE_string(
    "shampoo_plot_dir",
    str(harness.REPORT_PATH.parent / "_static"),
    "Folder for the loss-curve images (the report links them as _static/<name>.png).",
)

flags.register_validator(
    "shampoo_digits_hidden",
    lambda values: bool(values) and all(v.isdigit() and int(v) > 0 for v in values),
    message="--shampoo_digits_hidden takes comma-separated positive integers, e.g. 32,16,32.",
)


def _positive_floats(values: Sequence[str]) -> bool:
    try:
        return bool(values) and all(float(v) > 0 for v in values)
    except ValueError:
        return False


flags.register_validator(
    "shampoo_learning_rates",
    _positive_floats,
    message="--shampoo_learning_rates takes comma-separated positive numbers, e.g. 1e-3,3e-3.",
)

_MARKOV_SUPPORT, _MARKOV_POOL, _MARKOV_EVAL = 3, 16384, 256
_DIGITS_EVAL_EVERY = 5


def run() -> list[str]:
    """Runs the quality benchmark on both problems; returns the introduction and two sections."""
    learning_rates = [float(v) for v in _LEARNING_RATES.value]
    plot_dir = Path(_PLOT_DIR.value)
    return [
        _quality_intro(learning_rates),
        quality_digits([int(h) for h in _DIGITS_HIDDEN.value], learning_rates, plot_dir),
        quality_markov(learning_rates, plot_dir),
    ]


# Methods and training runs.


def _methods(frequency: int) -> list[tuple[str, Callable[[Any], optax.GradientTransformation]]]:
    """The compared methods as functions of the learning rate (a traced scalar)."""
    return [
        (ADAM, optax.adam),
        (ADAMW, optax.adamw),
        (
            f"metaopt.shampoo (Adam grafting, roots every {frequency})",
            lambda lr: make_shampoo(lr, frequency=frequency),
        ),
        ("metaopt.soap (bases refreshed every 10)", lambda lr: make_soap(lr)),
    ]


def _trainer(make_optimizer, loss, sample_batch, evaluate, steps: int, every: int):
    """``train(params, learning_rate)``: evaluations every ``every`` steps (and at step 0), and
    Shampoo's count of rejected roots; jitted once, whatever the learning rate."""

    @jax.jit
    def train(params, learning_rate):
        optimizer = make_optimizer(learning_rate)

        def step(carry, t):
            params, state = carry
            grads = jax.grad(loss)(params, *sample_batch(t))
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        def segment(carry, k):
            carry, _ = jax.lax.scan(step, carry, k * every + jnp.arange(every))
            return carry, evaluate(carry[0])

        carry = (params, optimizer.init(params))
        (_, state), values = jax.lax.scan(segment, carry, jnp.arange(steps // every))
        failures = getattr(state[0], "root_failures", jnp.zeros([], jnp.int32))
        return jnp.concatenate([evaluate(params)[None], values]), failures

    return train


@dataclasses.dataclass(frozen=True)
class Curve:
    """One training run: held-out or full-batch losses every ``every`` steps from step 0."""

    method: str
    learning_rate: float
    losses: np.ndarray
    every: int
    root_failures: int

    def steps_to(self, target: float) -> int | None:
        """Steps after which every evaluation is at most ``target`` (None if the last is not):
        a run that touches the target and leaves it again has not reached it."""
        above = np.flatnonzero(~(self.losses <= target))
        if above.size and above[-1] == self.losses.size - 1:
            return None
        return 0 if above.size == 0 else (int(above[-1]) + 1) * self.every

    @property
    def final(self) -> float:
        return float(self.losses[-1])


def _run_grid(loss, params, sample_batch, evaluate, steps, every, learning_rates, target):
    """Every method at every learning rate; returns all curves and each method's best one
    (fewest steps to the target, then lowest final loss; a diverged run is never best)."""
    curves: dict[str, list[Curve]] = {}
    for method, make_optimizer in _methods(_QUALITY_FREQUENCY.value):
        train = _trainer(make_optimizer, loss, sample_batch, evaluate, steps, every)
        curves[method] = []
        start = time.perf_counter()
        for lr in learning_rates:
            losses, failures = train(params, jnp.float32(lr))
            curves[method].append(Curve(method, lr, np.asarray(losses), every, int(failures)))
        harness.log(f"shampoo quality: {method}, {time.perf_counter() - start:.1f} s")

    def rank(curve):
        steps_to = curve.steps_to(target)
        final = curve.final if np.isfinite(curve.final) else np.inf
        return (steps_to is None, steps_to or 0, final)

    best = {method: min(runs, key=rank) for method, runs in curves.items()}
    return curves, best


def _quality_table(curves, best, target, learning_rates) -> str:
    adam_steps = best[ADAM].steps_to(target)
    rows = []
    for method, curve in best.items():
        steps_to = curve.steps_to(target)
        ratio = f"{steps_to / adam_steps:.2f}" if steps_to is not None and adam_steps else "n/a"
        rows.append(
            [
                method,
                f"{curve.learning_rate:g}",
                "not reached" if steps_to is None else str(steps_to),
                ratio,
                f"{curve.final:.4g}",
                str(curve.root_failures) if method.startswith("metaopt.shampoo") else "",
            ]
        )
    best_table = harness.markdown_table(
        [
            "method",
            "best learning rate",
            "steps to target",
            "÷ Adam's",
            "final loss",
            "rejected roots",
        ],
        rows,
    )
    grid_rows = []
    for method, runs in curves.items():
        cells = []
        for curve in runs:
            steps_to = curve.steps_to(target)
            final = f"{curve.final:.3g}" if np.isfinite(curve.final) else "diverged"
            cells.append(f"{'—' if steps_to is None else steps_to} ({final})")
        grid_rows.append([method, *cells])
    grid_table = harness.markdown_table(
        ["steps to target (final loss)", *(f"lr {lr:g}" for lr in learning_rates)], grid_rows
    )
    return best_table + "\n" + grid_table


def _plot(
    curves_by_method: dict[str, Curve],
    offset: float,
    title: str,
    ylabel: str,
    target: float,
    path: Path,
) -> None:
    """Loss above ``offset`` against steps, log scale, one line per method at its best rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for method, curve in curves_by_method.items():
        steps = np.arange(curve.losses.size) * curve.every
        excess = np.maximum(curve.losses - offset, 1e-8)
        axes.plot(steps, excess, label=f"{method}, lr {curve.learning_rate:g}")
    axes.axhline(target - offset, color="gray", linestyle="--", linewidth=1, label="target")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def _quality_intro(learning_rates: Sequence[float]) -> str:
    return (
        "### Quality: steps to a target loss\n\n"
        f"Each method is run once per learning rate of the grid "
        f"{', '.join(f'{lr:g}' for lr in learning_rates)} (the same grid for all), from the same "
        f"initialization and on the same data; the best rate is the one that reaches the target "
        f"in the fewest steps (then the lowest final loss). Steps to target count the steps after "
        f"which every later evaluation of the loss is at or below the target, so a run that "
        f"touches the target and leaves it again (an unstable rate) has not reached it. "
        f"`optax.adam` and `optax.adamw` "
        f"(weight decay 1e-4) with their defaults; `metaopt.shampoo` with its defaults (Adam "
        f"grafting, block size 1024, so each matrix here is one block, roots by `eigh`) and "
        f"`preconditioning_frequency={_QUALITY_FREQUENCY.value}`; `metaopt.soap` with its "
        f"defaults (b1 = b2 = 0.95, weight decay 0.01, refresh every 10). Constant learning "
        f"rates, no warm-up. Each run is one jitted `lax.scan`, compiled once per method (the "
        f"learning rate is a traced argument).\n"
    )


def digits_data() -> np.ndarray:
    """scikit-learn's 8x8 digits (bundled, no download), scaled to [0, 1] and centered."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float64) / 16.0
    return (x - x.mean(axis=0)).astype(np.float32)


def linear_autoencoder_loss(params, x) -> jax.Array:
    """Mean squared reconstruction error per entry of a deep linear autoencoder without biases."""
    h = x
    for w in params:
        h = h @ w
    return jnp.mean(jnp.square(h - x))


def quality_digits(hidden: Sequence[int], learning_rates: Sequence[float], plot_dir: Path) -> str:
    """Steps to (1 + target) times the PCA optimum, full batch, on the digits autoencoder."""
    x = digits_data()
    sizes = [x.shape[1], *hidden, x.shape[1]]
    rng = np.random.default_rng(1)
    params = [
        (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        for n_in, n_out in itertools.pairwise(sizes)
    ]
    # A linear autoencoder with a bottleneck of k units is at best the projection on the top k
    # principal components (Eckart-Young): the loss left is the sum of the other eigenvalues.
    eigenvalues = np.linalg.eigvalsh(x.astype(np.float64).T @ x / x.shape[0])[::-1]
    k = min(hidden)
    optimum = float(eigenvalues[k:].sum() / x.shape[1])
    target = optimum * (1.0 + _DIGITS_TARGET.value)
    data = jnp.asarray(x)
    curves, best = _run_grid(
        linear_autoencoder_loss,
        [jnp.asarray(w) for w in params],
        lambda t: (data,),
        lambda p: linear_autoencoder_loss(p, data),
        _DIGITS_STEPS.value,
        _DIGITS_EVAL_EVERY,
        learning_rates,
        target,
    )
    name = "digits_autoencoder"
    _plot(
        best,
        optimum,
        f"digits linear autoencoder {'-'.join(map(str, sizes))}",
        "loss − PCA optimum",
        target,
        plot_dir / f"shampoo_{name}.png",
    )
    spread = eigenvalues[0] / eigenvalues[k - 1]
    return (
        f"\n#### Deep linear autoencoder {'-'.join(map(str, sizes))} on the digits "
        f"({x.shape[0]} images, full batch, {_DIGITS_STEPS.value} steps)\n\n"
        f"Pixels scaled to [0, 1] and centered; no biases; weights drawn N(0, 1/fan-in); the "
        f"full-batch loss is evaluated every {_DIGITS_EVAL_EVERY} steps. "
        f"The best loss is the PCA reconstruction error with {k} components, {optimum:.5g} "
        f"(mean squared error per pixel); the target is {1 + _DIGITS_TARGET.value:g} × that, "
        f"{target:.5g}. The top {k} eigenvalues of the data covariance span a factor of "
        f"{spread:.0f}, and the product of four matrices adds its own ill-conditioning.\n\n"
        + _quality_table(curves, best, target, learning_rates)
        + "\n![Loss above the optimum against steps, digits autoencoder]"
        f"(_static/shampoo_{name}.png)\n"
    )


def markov_table(rng: np.random.Generator, vocab: int, support: int) -> np.ndarray:
    """A second-order chain: after tokens (a, b), the next one is drawn from ``support`` random
    tokens with Dirichlet(1) weights. Returns probabilities ``[vocab, vocab, vocab]``."""
    table = np.zeros((vocab, vocab, vocab))
    for a, b in itertools.product(range(vocab), repeat=2):
        successors = rng.choice(vocab, size=support, replace=False)
        table[a, b, successors] = rng.dirichlet(np.ones(support))
    return table


def markov_sequences(
    rng: np.random.Generator, table: np.ndarray, count: int, length: int
) -> np.ndarray:
    """``count`` sequences of ``length`` tokens: two uniform tokens, then the chain."""
    vocab = table.shape[0]
    tokens = np.zeros((count, length), np.int32)
    tokens[:, :2] = rng.integers(0, vocab, (count, 2))
    cumulative = np.cumsum(table, axis=-1)
    for t in range(2, length):
        rows = cumulative[tokens[:, t - 2], tokens[:, t - 1]]
        draws = rng.random((count, 1))
        tokens[:, t] = np.minimum((draws > rows).sum(axis=-1), vocab - 1)
    return tokens


def markov_chain_loss(table: np.ndarray, tokens: np.ndarray) -> float:
    """The chain's own mean next-token loss on ``tokens``: log(vocab) for the second token (the
    first one says nothing about it), -log p(next | previous two) after it."""
    vocab = table.shape[0]
    probabilities = table[tokens[:, :-2], tokens[:, 1:-1], tokens[:, 2:]]
    losses = np.concatenate(
        [np.full((tokens.shape[0], 1), np.log(vocab)), -np.log(probabilities)], axis=1
    )
    return float(losses.mean())


def quality_markov(learning_rates: Sequence[float], plot_dir: Path) -> str:
    """Steps to the chain's own loss + target on held-out sequences, for the transformer block."""
    vocab, length = _MARKOV_VOCAB.value, _MARKOV_SEQUENCE.value
    width, heads, batch = _MARKOV_WIDTH.value, _MARKOV_HEADS.value, _MARKOV_BATCH.value
    steps, every = _MARKOV_STEPS.value, _MARKOV_EVAL_EVERY.value
    if width % heads:
        raise ValueError(
            f"shampoo_markov_d_model must be divisible by shampoo_markov_heads, got {width} "
            f"and {heads}."
        )
    rng = np.random.default_rng(2)
    table = markov_table(rng, vocab, _MARKOV_SUPPORT)
    pool = jnp.asarray(markov_sequences(rng, table, _MARKOV_POOL, length + 1))
    held_out = markov_sequences(rng, table, _MARKOV_EVAL, length + 1)
    floor = markov_chain_loss(table, held_out)
    target = floor + _MARKOV_TARGET.value
    params = jax.tree.map(jnp.asarray, transformer_parameters(rng, vocab, width, length))
    loss = functools.partial(transformer_loss, heads=heads)
    key = jax.random.key(3)
    evaluation = jnp.asarray(held_out)

    def sample_batch(t):
        rows = pool[jax.random.randint(jax.random.fold_in(key, t), (batch,), 0, _MARKOV_POOL)]
        return rows[:, :-1], rows[:, 1:]

    curves, best = _run_grid(
        loss,
        params,
        sample_batch,
        lambda p: loss(p, evaluation[:, :-1], evaluation[:, 1:]),
        steps,
        every,
        learning_rates,
        target,
    )
    name = "markov_transformer"
    _plot(
        best,
        floor,
        f"transformer block, order-2 Markov chain over {vocab} tokens",
        "held-out loss − chain's own loss, nats",
        target,
        plot_dir / f"shampoo_{name}.png",
    )
    num_params = sum(np.size(x) for x in jax.tree.leaves(params))
    return (
        f"\n#### Transformer block on a second-order Markov chain ({vocab} tokens; "
        f"{steps} steps of {batch} sequences)\n\n"
        f"The transformer of the speed benchmark at d_model {width}, {heads} heads, "
        f"{length} tokens ({num_params:,} parameters), trained on next-token prediction. "
        f"Sequences start with two uniform tokens; each next token is drawn, given the two "
        f"before it, from {_MARKOV_SUPPORT} fixed random successors with Dirichlet(1) weights, "
        f"so the model must attend to the previous token. Minibatches are drawn from "
        f"{_MARKOV_POOL:,} sequences; the loss is measured every {every} steps on "
        f"{_MARKOV_EVAL} held-out sequences, whose loss under the chain itself is "
        f"{floor:.4f} nats (uniform guessing: {np.log(vocab):.3f}); the target is that plus "
        f"{_MARKOV_TARGET.value:g}, {target:.4f}, and steps to it are resolved to {every}.\n\n"
        + _quality_table(curves, best, target, learning_rates)
        + f"\n![Held-out loss above the chain's own against steps, Markov transformer]"
        f"(_static/shampoo_{name}.png)\n"
    )
