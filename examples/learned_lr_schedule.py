r"""A learning-rate schedule learned by hypergradient, against the tuned constant and cosine.

An MLP is trained on scikit-learn's digits by ``--inner_steps`` steps of full-batch gradient
descent with momentum (the inner run), and its learning rate at step :math:`t` is
:math:`\eta_t = \exp(s_{\lfloor t / m \rfloor})`: one free log-rate :math:`s_j` per segment of
:math:`m` steps (``--segments`` of them). The schedule is tuned on the validation loss at the
end of the run, averaged over random initializations :math:`\theta_0`:

.. math::

   \theta_{t+1} = \theta_t - \eta_t\, v_{t+1}, \quad
   v_{t+1} = \beta v_t + \nabla L_{\mathrm{train}}(\theta_t), \qquad
   \min_s \; \mathbb{E}_{\theta_0}\, L_{\mathrm{val}}(\theta_T(s, \theta_0)),

with :math:`L_{\mathrm{train}}` the cross-entropy plus :math:`\tfrac{\mu}{2}\lVert W\rVert^2`
(``--weight_decay``) and :math:`L_{\mathrm{val}}` the cross-entropy on a validation split. This is
gradient-based hyperparameter optimization by reverse-mode differentiation through training
(Maclaurin, Duvenaud and Adams, ICML 2015; Franceschi et al., ICML 2017).

The rates are *differentiable hyperparameters*: the inner optimizer is
``optax.sgd(schedule, momentum=...)`` whose ``schedule(count)`` reads the traced array
:math:`\exp(s)` at the optimizer's step count, and ``jax.grad`` of the validation loss through
:func:`metaopt.bilevel.solve` differentiates through it. Two ways of computing the
hypergradient (``--methods``):

- ``unrolled``: ``diff=Unrolled()``, backpropagation through all :math:`T` steps: the exact
  gradient of the objective above.
- ``truncated``: greedy windows of ``--truncation`` steps :math:`k`: the objective is
  :math:`\tfrac1W\sum_{w=1}^{W} L_{\mathrm{val}}(\theta_{wk})`, each term differentiated by
  ``diff=Truncated(k)`` through the last :math:`k` steps only, so each segment's rate is tuned
  on the validation loss :math:`k` steps or less after it (the short horizon of Wu, Ren, Liao
  and Grosse, ICLR 2018). ``Truncated(k)`` on the final loss alone would tune only the last
  :math:`k` steps' rates: a rate used earlier gets a zero derivative.

``Implicit`` and ``FirstOrder`` cannot learn a schedule: the solution an implicit derivative
assumes does not depend on the learning rate, so their derivative with respect to it is zero.

Each outer step draws ``--meta_batch`` fresh initializations and takes an Adam step on
:math:`s` (a step whose hypergradient is not finite is skipped and counted). The baselines are
the best constant rate and the best cosine decay (:math:`\eta_t = \tfrac{\eta}2 (1 + \cos(\pi
t / T))`), each chosen on a geometric grid (``--grid_min``, ``--grid_max``, ``--grid_size``) by
the mean validation loss over ``--grid_seeds`` initializations of the training stream. Every
schedule is then scored on ``--eval_seeds`` held-out initializations that neither the
meta-training nor the grid search saw: final validation loss and test accuracy, mean over
those initializations. The figure (``--output_dir``) shows the schedules and the
meta-training curves.

Run it from the repository root (it needs the ``examples`` extra: ``pip install
"metaopt-jax[examples]"``)::

  python examples/learned_lr_schedule.py                       # the CPU default, 3 to 6 min
  python examples/learned_lr_schedule.py --methods=unrolled --inner_steps=200 --segments=20
  python examples/learned_lr_schedule.py --helpfull            # every flag
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from tqdm import tqdm

from metaopt import bilevel
from metaopt.tasks import accuracy, cross_entropy_loss, init_mlp, load_digits

METHODS = ("unrolled", "truncated")
NUM_CLASSES = 10


class ScheduleConfig(NamedTuple):
    """Everything a run depends on (the script fills it from its flags)."""

    seed: int = 0
    num_train: int = 500
    num_validation: int = 300
    num_test: int = 359
    hidden: int = 32
    weight_decay: float = 5e-3
    momentum: float = 0.9
    inner_steps: int = 100
    segments: int = 10
    truncation: int = 20
    initial_learning_rate: float = 0.3
    outer_steps: int = 100
    outer_learning_rate: float = 0.05
    meta_batch: int = 2
    grid_min: float = 0.01
    grid_max: float = 3.0
    grid_size: int = 12
    grid_seeds: int = 4
    eval_seeds: int = 8


class Data(NamedTuple):
    """Arrays passed to jitted code (a pytree): inputs float, labels int32."""

    x_train: Any
    y_train: Any
    x_validation: Any
    y_validation: Any
    x_test: Any
    y_test: Any


class ScheduleResult(NamedTuple):
    """One row of the table: a schedule scored on the held-out initializations."""

    rates: np.ndarray  # the learning rate of every inner step, shape (inner_steps,)
    validation_losses: np.ndarray  # one per held-out initialization
    validation_loss: float  # their mean
    validation_std: float
    test_accuracy: float
    chosen: str  # how the schedule was chosen
    step_seconds: float = float("nan")  # median compiled outer step; nan for the baselines
    compile_seconds: float = float("nan")
    skipped: int = 0  # outer steps whose hypergradient was not finite
    meta_losses: np.ndarray | None = None  # the meta-training objective at every outer step


def check_config(config: ScheduleConfig) -> None:
    """Raises ValueError naming the field when the sizes do not fit together."""
    pool = 1438  # training images of load_digits' split; 359 test images
    if config.num_train + config.num_validation > pool or not 0 < config.num_test <= 359:
        raise ValueError(
            f"num_train={config.num_train} plus num_validation={config.num_validation} must be "
            f"at most {pool}, and num_test={config.num_test} between 1 and 359."
        )
    if not 1 <= config.segments <= config.inner_steps:
        raise ValueError(
            f"segments must be between 1 and inner_steps={config.inner_steps}, got "
            f"segments={config.segments}."
        )
    if not 1 <= config.truncation <= config.inner_steps:
        raise ValueError(
            f"truncation must be between 1 and inner_steps={config.inner_steps}, got "
            f"truncation={config.truncation}."
        )
    if not 0 < config.grid_min < config.grid_max or config.grid_size < 2:
        raise ValueError(
            f"the grid needs 0 < grid_min < grid_max and grid_size >= 2, got "
            f"grid_min={config.grid_min}, grid_max={config.grid_max}, "
            f"grid_size={config.grid_size}."
        )


def load_data(config: ScheduleConfig) -> Data:
    """Digits split into train, validation (both from the training split) and test."""
    digits = load_digits(seed=config.seed)
    dtype = jnp.result_type(float)  # float32, or float64 under jax_enable_x64
    train = slice(0, config.num_train)
    validation = slice(config.num_train, config.num_train + config.num_validation)
    return Data(
        jnp.asarray(digits.x_train[train], dtype),
        jnp.asarray(digits.y_train[train], jnp.int32),
        jnp.asarray(digits.x_train[validation], dtype),
        jnp.asarray(digits.y_train[validation], jnp.int32),
        jnp.asarray(digits.x_test[: config.num_test], dtype),
        jnp.asarray(digits.y_test[: config.num_test], jnp.int32),
    )


def segment_rates(log_rates: jax.Array, steps: int) -> jax.Array:
    """The rate of every step from one log-rate per segment (segments of ceil(T / S) steps)."""
    length = -(-steps // log_rates.shape[0])
    return jnp.repeat(jnp.exp(log_rates), length)[:steps]


def schedule_from_rates(rates: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """An optax schedule that reads ``rates`` (a traced array is fine) at the step count."""
    return lambda count: rates[jnp.minimum(count, rates.shape[0] - 1)]


def cosine_rates(peak: float, steps: int) -> np.ndarray:
    return np.asarray(optax.cosine_decay_schedule(peak, steps)(np.arange(steps)))


def inner_loss(config: ScheduleConfig, data: Data) -> Callable:
    def loss(params):
        squares = sum(jnp.sum(layer["w"] ** 2) for layer in params)
        return cross_entropy_loss(params, data.x_train, data.y_train) + (
            0.5 * config.weight_decay * squares
        )

    return loss


def train(config, data, rates, key, *, steps=None, diff=None):
    """The MLP after ``steps`` (default all) inner steps with per-step ``rates`` from ``key``."""
    init = init_mlp(key, [data.x_train.shape[1], config.hidden, NUM_CLASSES], data.x_train.dtype)
    optimizer = optax.sgd(schedule_from_rates(rates), momentum=config.momentum)
    params, _ = bilevel.solve(
        inner_loss(config, data),
        init,
        optimizer=optimizer,
        steps=config.inner_steps if steps is None else steps,
        diff=bilevel.FirstOrder() if diff is None else diff,
    )
    return params


def validation_loss(params, data: Data) -> jax.Array:
    return cross_entropy_loss(params, data.x_validation, data.y_validation)


def meta_objective(method: str, config: ScheduleConfig) -> Callable:
    """``objective(log_rates, keys, data)``: ``method``'s objective, averaged over ``keys``."""

    def unrolled(log_rates, key, data):
        rates = segment_rates(log_rates, config.inner_steps)
        return validation_loss(train(config, data, rates, key, diff=bilevel.Unrolled()), data)

    def truncated(log_rates, key, data):
        rates = segment_rates(log_rates, config.inner_steps)
        k = config.truncation
        ends = sorted(set(range(k, config.inner_steps + 1, k)) | {config.inner_steps})
        losses = [
            validation_loss(
                train(config, data, rates, key, steps=end, diff=bilevel.Truncated(k)), data
            )
            for end in ends
        ]
        return sum(losses) / len(losses)

    one = {"unrolled": unrolled, "truncated": truncated}[method]

    def objective(log_rates, keys, data):
        return jnp.mean(jax.vmap(lambda key: one(log_rates, key, data))(keys))

    return objective


def make_outer_step(method: str, config: ScheduleConfig, optimizer) -> Callable:
    """``step(log_rates, opt_state, keys, data) -> (log_rates, opt_state, loss, finite)``."""
    objective = meta_objective(method, config)

    def step(log_rates, opt_state, keys, data):
        loss, gradient = jax.value_and_grad(objective)(log_rates, keys, data)
        finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(gradient))
        gradient = jnp.where(finite, gradient, 0.0)
        updates, new_state = optimizer.update(gradient, opt_state, log_rates)
        # A non-finite hypergradient (an inner run that diverged) leaves everything unchanged.
        new_rates, new_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (optax.apply_updates(log_rates, updates), new_state),
            (log_rates, opt_state),
        )
        return new_rates, new_state, loss, finite

    return jax.jit(step)


class Keys(NamedTuple):
    """Disjoint streams of initializations: meta-training, grid search, held-out evaluation."""

    meta: jax.Array
    grid: jax.Array
    evaluation: jax.Array

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> Keys:
        meta, grid, evaluation = jax.random.split(jax.random.key(config.seed), 3)
        return cls(
            meta,
            jax.random.split(grid, config.grid_seeds),
            jax.random.split(evaluation, config.eval_seeds),
        )

    def outer_step(self, step: int, meta_batch: int) -> jax.Array:
        return jax.random.split(jax.random.fold_in(self.meta, step), meta_batch)


def make_evaluate(config: ScheduleConfig) -> Callable:
    """``evaluate(rates, keys, data) -> (validation losses, test accuracies)``, one per key."""

    def evaluate(rates, keys, data):
        def one(key):
            params = train(config, data, rates, key)
            return validation_loss(params, data), accuracy(params, data.x_test, data.y_test)

        return jax.vmap(one)(keys)

    return jax.jit(evaluate)


def learn_schedule(method, config, data, keys, *, progress=True) -> tuple[np.ndarray, dict]:
    """Meta-trains the log-rates with ``method``; returns the per-step rates and timings."""
    optimizer = optax.adam(config.outer_learning_rate)
    dtype = jnp.result_type(float)
    log_rates = jnp.full(config.segments, math.log(config.initial_learning_rate), dtype)
    opt_state = optimizer.init(log_rates)
    step = make_outer_step(method, config, optimizer)
    start = time.perf_counter()
    step = step.lower(log_rates, opt_state, keys.outer_step(0, config.meta_batch), data).compile()
    compile_seconds = time.perf_counter() - start
    seconds, losses, skipped = [], [], 0
    bar = tqdm(range(config.outer_steps), desc=f"{method:>9}", disable=not progress)
    for i in bar:
        start = time.perf_counter()
        log_rates, opt_state, loss, finite = jax.block_until_ready(
            step(log_rates, opt_state, keys.outer_step(i, config.meta_batch), data)
        )
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
        skipped += not bool(finite)
        bar.set_postfix(meta_loss=f"{float(loss):.4f}")
    timing = {
        "step_seconds": float(np.median(seconds)),
        "compile_seconds": compile_seconds,
        "skipped": skipped,
        "meta_losses": np.asarray(losses),
    }
    return np.asarray(segment_rates(log_rates, config.inner_steps)), timing


def grid_search(config, data, keys, evaluate) -> dict[str, tuple[float, np.ndarray]]:
    """The best constant rate and cosine peak on the grid, by mean validation loss."""
    dtype = jnp.result_type(float)
    grid = np.geomspace(config.grid_min, config.grid_max, config.grid_size)
    best = {}
    for name, rates_of in (
        ("constant", lambda r: np.full(config.inner_steps, r)),
        ("cosine", lambda r: cosine_rates(r, config.inner_steps)),
    ):
        scores = []
        for rate in grid:
            losses, _ = evaluate(jnp.asarray(rates_of(rate), dtype), keys.grid, data)
            mean = float(jnp.mean(losses))
            scores.append(mean if math.isfinite(mean) else math.inf)
        rate = float(grid[int(np.argmin(scores))])
        best[name] = (rate, rates_of(rate))
    return best


def run(
    config: ScheduleConfig, methods: Sequence[str] = METHODS, *, progress: bool = True
) -> dict[str, ScheduleResult]:
    """Learns a schedule with each of ``methods``, tunes the baselines and scores them all."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got unknown {unknown}.")
    check_config(config)
    data = load_data(config)
    keys = Keys.from_config(config)
    evaluate = make_evaluate(config)
    dtype = jnp.result_type(float)

    def score(rates, chosen, **extra):
        losses, accuracies = evaluate(jnp.asarray(rates, dtype), keys.evaluation, data)
        return ScheduleResult(
            rates=np.asarray(rates),
            validation_losses=np.asarray(losses),
            validation_loss=float(jnp.mean(losses)),
            validation_std=float(jnp.std(losses)),
            test_accuracy=float(jnp.mean(accuracies)),
            chosen=chosen,
            **extra,
        )

    results = {}
    for method in methods:
        rates, timing = learn_schedule(method, config, data, keys, progress=progress)
        results[f"learned ({method})"] = score(
            rates,
            f"{config.outer_steps} Adam steps from {config.initial_learning_rate:g}",
            **timing,
        )
    for name, (rate, rates) in grid_search(config, data, keys, evaluate).items():
        results[f"best {name}"] = score(rates, f"peak {rate:.3g} of {config.grid_size}")
    return results


def markdown_table(results: dict[str, ScheduleResult]) -> str:
    """The results as a markdown table (a row per schedule).

    The validation loss is the mean ± standard deviation over the held-out initializations;
    "vs constant" is the mean of the paired differences with the best constant rate on the same
    initializations, and on how many of them the schedule is better.
    """
    lines = [
        "| schedule | chosen | validation loss | vs constant | test accuracy "
        "| outer step (ms) | skipped |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    reference = results.get("best constant")
    for name, r in results.items():
        step = "-" if math.isnan(r.step_seconds) else f"{1e3 * r.step_seconds:.0f}"
        paired = "-"
        if reference is not None and r is not reference:
            difference = r.validation_losses - reference.validation_losses
            paired = f"{difference.mean():+.4f} ({int(np.sum(difference < 0))}/{len(difference)})"
        lines.append(
            f"| {name} | {r.chosen} | {r.validation_loss:.4f} ± {r.validation_std:.4f} | "
            f"{paired} | {100 * r.test_accuracy:.1f}% | {step} | {r.skipped} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, ScheduleResult], path: Path) -> Path:
    """The schedules (log scale) and the meta-training curves, as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(figure)
    rates_axes, meta_axes = figure.subplots(1, 2)
    for name, r in results.items():
        rates_axes.plot(r.rates, label=f"{name}: {r.validation_loss:.3f}", lw=1.6)
        if r.meta_losses is not None:
            meta_axes.plot(r.meta_losses, label=name, lw=1.0)
    low = min(float(np.min(r.rates[r.rates > 0], initial=np.inf)) for r in results.values())
    rates_axes.set(yscale="log", xlabel="inner step", ylabel="learning rate")
    rates_axes.set_ylim(bottom=max(low, 1e-2 * max(float(r.rates.max()) for r in results.values())))
    rates_axes.set_title("schedules (legend: held-out validation loss)", fontsize=10)
    rates_axes.legend(fontsize=8)
    meta_axes.set(yscale="log", xlabel="outer step", ylabel="meta-training objective (own)")
    meta_axes.set_title("meta-training (fresh initializations each step)", fontsize=10)
    if meta_axes.lines:
        meta_axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    return path


def benchmark_row(config: ScheduleConfig | None = None) -> dict[str, str]:
    """A small run for the bilevel benchmark suite: learned (unrolled) against the baselines.

    The default configuration (50 inner steps, 40 outer steps, a grid of 6) takes about a
    minute on a 2-core CPU, most of it compilation.
    """
    config = config or ScheduleConfig(
        num_train=300, inner_steps=50, segments=5, outer_steps=40, grid_size=6, eval_seeds=4
    )
    results = run(config, ("unrolled",), progress=False)
    learned = results["learned (unrolled)"]
    constant, cosine = results["best constant"], results["best cosine"]
    return {
        "application": "learning-rate schedule (digits MLP)",
        "method": f"unrolled, {config.inner_steps} inner steps",
        "metric": "held-out validation loss: learned / best constant / best cosine",
        "value": (
            f"{learned.validation_loss:.4f} / {constant.validation_loss:.4f} / "
            f"{cosine.validation_loss:.4f}"
        ),
        "time per outer step": f"{1e3 * learned.step_seconds:.0f} ms",
    }


def define_flags() -> None:
    """The script's flags (defined when run as a script, not on import)."""
    d = ScheduleConfig()
    flags.DEFINE_list("methods", list(METHODS), f"Comma-separated, among {', '.join(METHODS)}.")
    flags.DEFINE_integer("seed", d.seed, "Seed of the data split and of the initializations.")
    flags.DEFINE_integer("num_train", d.num_train, "Training examples.", lower_bound=1)
    flags.DEFINE_integer("num_validation", d.num_validation, "Validation examples.", lower_bound=1)
    flags.DEFINE_integer("num_test", d.num_test, "Test examples (at most 359).", lower_bound=1)
    flags.DEFINE_integer("hidden", d.hidden, "Hidden units of the MLP.", lower_bound=1)
    flags.DEFINE_float(
        "weight_decay", d.weight_decay, "L2 penalty of the inner loss.", lower_bound=0
    )
    flags.DEFINE_float("momentum", d.momentum, "Momentum of the inner SGD.", lower_bound=0)
    flags.DEFINE_integer("inner_steps", d.inner_steps, "Steps of the inner run T.", lower_bound=1)
    flags.DEFINE_integer(
        "segments", d.segments, "Learned log-rates (one per segment).", lower_bound=1
    )
    flags.DEFINE_integer("truncation", d.truncation, "Window k of truncated.", lower_bound=1)
    flags.DEFINE_float(
        "initial_learning_rate",
        d.initial_learning_rate,
        "Starting rate of every segment.",
        lower_bound=0,
    )
    flags.DEFINE_integer("outer_steps", d.outer_steps, "Outer Adam steps.", lower_bound=1)
    flags.DEFINE_float(
        "outer_learning_rate", d.outer_learning_rate, "Outer Adam rate on log-rates."
    )
    flags.DEFINE_integer(
        "meta_batch", d.meta_batch, "Initializations per outer step.", lower_bound=1
    )
    flags.DEFINE_float("grid_min", d.grid_min, "Smallest rate of the baselines' grid.")
    flags.DEFINE_float("grid_max", d.grid_max, "Largest rate of the baselines' grid.")
    flags.DEFINE_integer("grid_size", d.grid_size, "Rates on the geometric grid.", lower_bound=2)
    flags.DEFINE_integer(
        "grid_seeds", d.grid_seeds, "Initializations per grid point.", lower_bound=1
    )
    flags.DEFINE_integer("eval_seeds", d.eval_seeds, "Held-out initializations.", lower_bound=1)
    flags.DEFINE_string("output_dir", "examples/output", "Where the figure is written.")
    flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # no JAX INFO lines
    values = flags.FLAGS
    config = ScheduleConfig(**{name: values[name].value for name in ScheduleConfig._fields})
    unknown = sorted(set(values.methods) - set(METHODS))
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; choose among {', '.join(METHODS)}.")
    try:
        check_config(config)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    start = time.perf_counter()
    print(
        f"digits: {config.num_train} train / {config.num_validation} validation / "
        f"{config.num_test} test; MLP 64-{config.hidden}-10, {config.inner_steps} steps of SGD "
        f"(momentum {config.momentum}), {config.segments} learned rates, {config.outer_steps} "
        f"outer steps of {config.meta_batch} initializations; scored on {config.eval_seeds} "
        f"held-out initializations; device: {jax.devices()[0].platform}"
    )
    results = run(config, values.methods, progress=values.progress)
    print()
    print(markdown_table(results))
    length = -(-config.inner_steps // config.segments)
    for name, r in results.items():
        if r.meta_losses is not None:
            rates = " ".join(f"{rate:.3g}" for rate in r.rates[::length])
            print(f"\n{name}, the rate of each segment of {length} steps: {rates}")
    path = plot(results, Path(values.output_dir) / "learned_lr_schedule.png")
    print(f"\nFigure: {path}")
    print(f"Total wall time (after imports): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)
