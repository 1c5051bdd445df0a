r"""metaopt's main demo: the library's capabilities, one section each, on small real tasks.

1. Optimizers side by side: an MLP learns scikit-learn's 8x8 handwritten digits with AdamW
   (optax), AdEMAMix, SAM, Shampoo and SOAP (metaopt), from the same initial parameters and the
   same minibatch order. Each epoch is one jit-compiled ``lax.scan`` over minibatches. The demo
   prints a table (final loss on the whole training set, test accuracy, compile and training
   time) and saves the learning curves as a PNG.
2. Hyperparameters by hypergradient: a short run of ``examples/hyperparameter_tuning.py``,
   which tunes one ridge penalty per feature on the validation loss by differentiating through
   ``metaopt.bilevel.solve``.
3. Meta-learning: MAML meta-trains a small MLP's initialization on sinusoid regression tasks
   (``metaopt.meta.maml_loss``), then adapts it to held-out tasks from 10 points with one
   gradient step, against the same network trained on all tasks pooled. The full experiment is
   ``examples/maml_sinusoid.ipynb``.
4. A learned optimizer: the pretrained ``metaopt.learned.pretrained()``, with no hyperparameter
   set, beside AdamW at the demo's learning rate, on an MLP for scikit-learn's breast-cancer data,
   a data set its meta-training never saw. The meta-training and the full held-out comparison
   are ``examples/learned_optimizer.ipynb`` and ``docs/learned-optimizers.md``.

Run it from the repository root (it needs the ``examples`` extra: ``pip install
"metaopt-jax[examples]"``)::

  python examples/demo.py                                   # the CPU default, well under a minute
  python examples/demo.py --epochs=200 --hidden_width=1024  # larger, for an accelerator
  python examples/demo.py --helpfull                        # every flag
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

# A sibling script: examples/ is on the path when demo.py runs. It defines no flags on import.
import evaluate_learned_optimizer
import hyperparameter_tuning
import jax
import jax.numpy as jnp
import optax
from absl import app, flags, logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

import metaopt
from metaopt import learned, meta
from metaopt.tasks import (
    ClassificationData,
    accuracy,
    cross_entropy_loss,
    init_mlp,
    load_digits,
    mlp_task,
    sinusoid_tasks,
)

_EPOCHS = flags.DEFINE_integer(
    "epochs", 60, "Passes over the training set per optimizer.", lower_bound=1
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Examples per minibatch.", lower_bound=1)
_HIDDEN_WIDTH = flags.DEFINE_integer(
    "hidden_width", 128, "Width of each hidden layer.", lower_bound=1
)
_HIDDEN_LAYERS = flags.DEFINE_integer("hidden_layers", 2, "Number of hidden layers.", lower_bound=0)
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", 1e-3, "Peak learning rate, shared by the three optimizers.", lower_bound=0.0
)
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 1e-4, "Decoupled weight decay.", lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data split, the initialization and shuffling.")
_PLOT_PATH = flags.DEFINE_string(
    "plot_path",
    str(Path(__file__).resolve().parent / "output" / "demo.png"),
    "Where the PNG of the learning curves is written.",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a tqdm progress bar per optimizer.")
_META_STEPS = flags.DEFINE_integer(
    "meta_steps", 10_000, "Meta-steps of the meta-learning section.", lower_bound=1
)
_TUNING_STEPS = flags.DEFINE_integer(
    "tuning_steps", 150, "Hypergradient steps of the hyperparameter-tuning section.", lower_bound=1
)
_LEARNED_STEPS = flags.DEFINE_integer(
    "learned_steps", 200, "Training steps of the learned-optimizer section.", lower_bound=1
)


class Curves(NamedTuple):
    """What one optimizer's run produced."""

    train_loss: list[float]  # loss on the whole training set after each epoch
    test_accuracy: list[float]  # after each epoch
    compile_seconds: float
    train_seconds: float


def make_optimizers(total_steps: int) -> dict[str, optax.GradientTransformationExtraArgs]:
    """The contenders. All share a cosine-decayed learning rate and the same weight decay."""
    learning_rate = optax.cosine_decay_schedule(_LEARNING_RATE.value, total_steps)
    weight_decay = _WEIGHT_DECAY.value
    optimizers = {
        "AdamW": optax.adamw(learning_rate, weight_decay=weight_decay),
        # The paper warms alpha and beta3 up over the whole run. Its beta3 = 0.9999 has a
        # half-life of about 7000 steps, far longer than this run; 0.999 (about 700) suits it.
        # Shorter runs at a larger learning rate can overshoot once the loss is tiny (here: 30
        # epochs at 3e-3), when the slow momentum, weighted by alpha, outlives the gradients
        # that built it.
        "AdEMAMix": metaopt.ademamix(
            learning_rate,
            b3=0.999,
            alpha=5.0,
            alpha_warmup_steps=total_steps,
            b3_warmup_steps=total_steps,
            weight_decay=weight_decay,
        ),
        "SAM (AdamW)": metaopt.sam(optax.adamw(learning_rate, weight_decay=weight_decay), rho=0.05),
        # Adam grafting: AdamW's learning rate carries over. Roots every 10 steps.
        "Shampoo": metaopt.shampoo(
            learning_rate, weight_decay=weight_decay, preconditioning_frequency=10
        ),
        "SOAP": metaopt.soap(learning_rate, b1=0.9, b2=0.999, weight_decay=weight_decay),
    }
    # Plain optax transforms ignore the grad_fn= that SAM needs, so one training step serves all.
    return {name: optax.with_extra_args_support(opt) for name, opt in optimizers.items()}


def make_epoch(optimizer: optax.GradientTransformationExtraArgs, batch_size: int) -> Callable:
    """One epoch: a scan of optimizer steps over shuffled minibatches, then an evaluation."""

    def epoch(params, opt_state, key, data: ClassificationData):
        num_train = data.x_train.shape[0]
        num_batches = num_train // batch_size  # the last partial batch is dropped
        order = jax.random.permutation(key, num_train)[: num_batches * batch_size]

        def step(carry, index):
            params, opt_state = carry
            x, y = data.x_train[index], data.y_train[index]
            grads = jax.grad(cross_entropy_loss)(params, x, y)
            updates, opt_state = optimizer.update(
                grads, opt_state, params, grad_fn=lambda p: jax.grad(cross_entropy_loss)(p, x, y)
            )
            return (optax.apply_updates(params, updates), opt_state), None

        batches = order.reshape(num_batches, batch_size)
        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
        train_loss = cross_entropy_loss(params, data.x_train, data.y_train)
        test_accuracy = accuracy(params, data.x_test, data.y_test)
        return params, opt_state, train_loss, test_accuracy

    return jax.jit(epoch)


def train(name, optimizer, params, epoch_keys, data: ClassificationData) -> Curves:
    """Trains from ``params`` with one key per epoch; times compilation and training apart."""
    start = time.perf_counter()
    opt_state = optimizer.init(params)
    epoch = make_epoch(optimizer, _BATCH_SIZE.value)
    epoch = epoch.lower(params, opt_state, epoch_keys[0], data).compile()
    compile_seconds = time.perf_counter() - start

    train_loss, test_accuracy = [], []
    start = time.perf_counter()
    bar = tqdm(epoch_keys, desc=f"{name:>12}", unit="epoch", disable=not _PROGRESS.value)
    for key in bar:
        params, opt_state, loss, acc = epoch(params, opt_state, key, data)
        train_loss.append(float(loss))  # float() waits for the device, so the timing is honest
        test_accuracy.append(float(acc))
        bar.set_postfix(train_loss=f"{train_loss[-1]:.2e}", test_acc=f"{test_accuracy[-1]:.3f}")
    return Curves(train_loss, test_accuracy, compile_seconds, time.perf_counter() - start)


def print_table(results: dict[str, Curves]) -> None:
    header = (
        f"{'optimizer':<12} {'train loss':>10} {'test acc':>9} {'compile s':>10} {'train s':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, c in results.items():
        print(
            f"{name:<12} {c.train_loss[-1]:>10.3e} {c.test_accuracy[-1]:>9.2%} "
            f"{c.compile_seconds:>10.2f} {c.train_seconds:>8.2f}"
        )


def save_plot(results: dict[str, Curves], path: Path) -> None:
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg: no display needed
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for name, c in results.items():
        epochs = range(1, len(c.train_loss) + 1)
        loss_axes.plot(epochs, c.train_loss, label=name)
        accuracy_axes.plot(epochs, c.test_accuracy, label=name)
    loss_axes.set(xlabel="epoch", ylabel="train loss (whole training set)", yscale="log")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("MLP on scikit-learn digits")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def optimizers_side_by_side() -> None:
    """AdamW, AdEMAMix, SAM, Shampoo and SOAP train the same MLP on digits; table and curves."""
    key_init, key_shuffle = jax.random.split(jax.random.key(_SEED.value))
    data = ClassificationData(*map(jnp.asarray, load_digits(seed=_SEED.value)))
    num_features, num_classes = data.x_train.shape[1], 10
    sizes = [num_features, *[_HIDDEN_WIDTH.value] * _HIDDEN_LAYERS.value, num_classes]
    params = init_mlp(key_init, sizes)
    epoch_keys = list(jax.random.split(key_shuffle, _EPOCHS.value))
    steps_per_epoch = data.x_train.shape[0] // _BATCH_SIZE.value
    if steps_per_epoch == 0:
        raise app.UsageError(
            f"--batch_size={_BATCH_SIZE.value} exceeds the {data.x_train.shape[0]} training "
            f"examples; use a smaller batch."
        )
    total_steps = _EPOCHS.value * steps_per_epoch
    print(
        f"digits: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test examples; "
        f"MLP {sizes}; {_EPOCHS.value} epochs x {steps_per_epoch} steps of batch "
        f"{_BATCH_SIZE.value} = {total_steps} steps; device: {jax.devices()[0].platform}"
    )

    results = {
        name: train(name, optimizer, params, epoch_keys, data)
        for name, optimizer in make_optimizers(total_steps).items()
    }
    print()
    print_table(results)
    path = Path(_PLOT_PATH.value)
    save_plot(results, path)
    print(f"\nLearning curves saved to {path}")


def hyperparameters_by_hypergradient() -> None:
    """Per-feature ridge penalties tuned by gradient descent on the validation loss."""
    config = hyperparameter_tuning.TuningConfig(seed=_SEED.value, outer_steps=_TUNING_STEPS.value)
    comparison = hyperparameter_tuning.compare(config, progress=_PROGRESS.value)
    history, results = comparison.history, comparison.results
    shared, tuned = results["best shared"], results["per-feature"]
    failed = sum(not record.inner_converged for record in history)
    print(
        f"diabetes + {config.noise_features} noise features: "
        f"{config.noise_features + 10} log-penalties, {len(history)} Adam steps on the "
        f"hypergradient through bilevel.solve (implicit differentiation, "
        f"{comparison.tuning_seconds:.1f} s after {comparison.compile_seconds:.1f} s compiling)"
    )
    print(
        f"validation MSE: {history[0].validation_mse:.4f} before tuning -> "
        f"{tuned.validation_mse:.4f} after (best shared penalty: {shared.validation_mse:.4f})"
    )
    print(
        f"test MSE: {tuned.test_mse:.4f} tuned per feature, {shared.test_mse:.4f} with the best "
        f"shared penalty ({comparison.shared_penalty:.3g}), {results['no penalty'].test_mse:.4f} "
        f"with none"
    )
    print(
        f"inner solves short of their tolerance: {failed} of {len(history)}; warnings: "
        f"{len(comparison.caught_warnings)}. The full example: examples/hyperparameter_tuning.py"
    )


def sinusoid_mse(params, batch):
    """Mean squared error of a ReLU MLP (``init_mlp`` layout) on ``(inputs, targets)``."""
    x, y = batch
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return jnp.mean((x @ params[-1]["w"] + params[-1]["b"] - y) ** 2)


def meta_learning() -> None:
    """MAML on sinusoid regression against a network trained on all tasks pooled."""
    inner = meta.InnerLoop(optax.sgd(0.01), steps=1)
    outer = optax.adam(1e-3)

    def maml_step(carry, key):
        params, opt_state = carry
        tasks = sinusoid_tasks(key, 25, shots=10)
        grads, _ = jax.grad(meta.maml_loss, has_aux=True)(params, tasks, sinusoid_mse, inner)
        updates, opt_state = outer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    def pooled_step(carry, key):
        params, opt_state = carry
        tasks = sinusoid_tasks(key, 25, shots=20)
        grads = jax.grad(lambda p: jnp.mean(jax.vmap(sinusoid_mse, (None, 0))(p, tasks.support)))(
            params
        )
        updates, opt_state = outer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    def train(step, key):
        params = init_mlp(jax.random.PRNGKey(_SEED.value), [1, 40, 40, 1])
        keys = jax.random.split(key, _META_STEPS.value)
        (params, _), _ = jax.lax.scan(step, (params, outer.init(params)), keys)
        return params

    def after_adaptation(params, lr, tasks):
        adapt = meta.InnerLoop(optax.sgd(lr), steps=1)
        return jax.vmap(
            lambda t: sinusoid_mse(meta.adapt(sinusoid_mse, params, t.support, adapt)[0], t.query)
        )(tasks)

    start = time.perf_counter()
    maml_params = jax.jit(lambda k: train(maml_step, k))(jax.random.PRNGKey(1))
    pooled_params = jax.jit(lambda k: train(pooled_step, k))(jax.random.PRNGKey(2))
    evaluate = jax.jit(after_adaptation, static_argnums=1)
    # The pooled network's fine-tuning step is chosen on validation tasks, as in the notebook.
    validation = sinusoid_tasks(jax.random.PRNGKey(99), 200, shots=10, query_shots=100)
    scores = {
        lr: float(evaluate(pooled_params, lr, validation).mean()) for lr in (1e-3, 3e-3, 1e-2)
    }
    pooled_lr = min(scores, key=lambda lr: scores[lr] if math.isfinite(scores[lr]) else math.inf)
    held_out = sinusoid_tasks(jax.random.PRNGKey(123), 500, shots=10, query_shots=100)
    maml_mse = evaluate(maml_params, 0.01, held_out)
    pooled_mse = evaluate(pooled_params, pooled_lr, held_out)
    print(
        f"sinusoid regression, 10 points per task, {_META_STEPS.value} meta-steps of 25 tasks "
        f"({time.perf_counter() - start:.1f} s)"
    )
    print(
        f"query MSE after one gradient step on 500 held-out tasks: "
        f"MAML {float(maml_mse.mean()):.3f}, network trained on all tasks "
        f"{float(pooled_mse.mean()):.3f} (step {pooled_lr:g}). "
        f"The full experiment: examples/maml_sinusoid.ipynb"
    )


def learned_optimizer() -> None:
    """The pretrained learned optimizer beside AdamW on a data set meta-training never saw."""
    task = mlp_task("breast_cancer", (32, 32), batch_size=64)
    steps = _LEARNED_STEPS.value
    contenders = {
        f"AdamW (lr {_LEARNING_RATE.value:g})": optax.adamw(
            _LEARNING_RATE.value, weight_decay=_WEIGHT_DECAY.value
        ),
        "learned (pretrained)": learned.pretrained(),
    }
    print(f"{task.name}: {steps} steps from the same initialization and minibatches")
    header = f"{'optimizer':<22} {'train loss':>10} {'test acc':>9}"
    print(header)
    print("-" * len(header))
    for name, optimizer in contenders.items():
        *_, final = evaluate_learned_optimizer.train_curve(task, optimizer, steps, _SEED.value)
        print(f"{name:<22} {final['train_loss']:>10.3e} {final['test_accuracy']:>9.2%}")
    made = learned.pretrained_metadata()
    print(
        f"(the learned optimizer sets no hyperparameter; it was meta-trained for "
        f"{made['meta_steps']} PES steps in {made['meta_training_wall_time_s']:.0f} s of CPU)"
    )


# The demo is a list of sections, each a titled function that prints its own results.
SECTIONS: list[tuple[str, Callable[[], None]]] = [
    ("Optimizers side by side", optimizers_side_by_side),
    ("Hyperparameters by hypergradient", hyperparameters_by_hypergradient),
    ("Meta-learning", meta_learning),
    ("A learned optimizer", learned_optimizer),
]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # absl turns INFO logging on by default; JAX's INFO lines (which backends it probed)
        # would clutter the demo's output. --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    for number, (title, section) in enumerate(SECTIONS, start=1):
        print(f"== {number}. {title} ==")
        section()
    print(f"\nTotal wall time (after imports): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app.run(main)
