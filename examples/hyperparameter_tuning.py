r"""Per-feature L2 penalties tuned by hypergradient descent with ``metaopt.bilevel.solve``.

Ridge regression on scikit-learn's diabetes data (10 clinical features) with
``--noise_features`` columns of pure Gaussian noise appended, trained on a small split so that
the noise can be fit. One shared penalty has to trade shrinking the noise against shrinking the
real features; a penalty per feature need not, but 40 penalties (at the default 30 noise
columns) are far too many for a grid search. They are tuned by gradient descent on the
validation loss instead, as log-penalties :math:`\theta`:

.. math::

   (w^\star, b^\star)(\theta) = \arg\min_{w, b} \tfrac12 \operatorname{mean}_{\mathrm{train}}
   (x^\top w + b - y)^2 + \tfrac12 \textstyle\sum_j e^{\theta_j} w_j^2,
   \qquad \min_\theta \operatorname{mean}_{\mathrm{validation}} (x^\top w^\star + b^\star -
   y)^2.

The inner problem is solved by ``bilevel.solve`` with Adam (any optax transform would do).
``jax.grad`` through the solve is the hypergradient
:math:`\mathrm{d}L_{\mathrm{val}}/\mathrm{d}\theta`, by implicit differentiation: one
conjugate-gradient solve with the inner Hessian, however many inner steps were taken. The outer
optimizer is an optax transform on :math:`\theta`; one outer step (inner solve, hypergradient,
update) is one ``jax.jit``-compiled call.

The script checks the first hypergradient against the closed-form ridge solution, prints a table
while tuning, compares no penalty, the best shared penalty of a grid and the tuned per-feature
penalties on validation and test data, and saves a PNG of the validation loss and the learned
penalties. Warnings from the inner solves (not converged, linear solve failed) are printed as
they happen and counted in the summary. The test loss is shown throughout but never used for
tuning: with many penalties and few validation examples the validation loss can be overfit.
Without noise columns (``--noise_features=0``) that is what happens: ten tuned penalties beat
the best shared one on validation but not on test.

Run it from the repository root (it needs the ``examples`` extra: ``pip install
"metaopt-jax[examples]"``)::

  python examples/hyperparameter_tuning.py                     # the CPU default, seconds
  python examples/hyperparameter_tuning.py --outer_optimizer=ademamix --seed=1
  python examples/hyperparameter_tuning.py --helpfull          # every flag
"""

from __future__ import annotations

import operator
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import datasets
from tqdm import tqdm

import metaopt
from metaopt import bilevel, implicit

OUTER_OPTIMIZERS = ("adam", "sgd", "ademamix")
MAX_PRINTED_WARNINGS = 5  # printed in full; every warning is counted in the summary


class TuningConfig(NamedTuple):
    """Everything a run depends on (the script fills it from its flags)."""

    seed: int = 0
    num_train: int = 80
    num_validation: int = 200
    noise_features: int = 30
    initial_penalty: float = 1e-3
    outer_optimizer: str = "adam"
    outer_learning_rate: float = 0.1
    outer_steps: int = 300
    inner_learning_rate: float = 0.05
    inner_steps: int = 3000
    inner_tol: float = 1e-5
    linear_solve_tol: float = 1e-4
    grid_size: int = 13


class Splits(NamedTuple):
    """Standardized train/validation/test arrays (float32), a pytree passed to jitted code."""

    x_train: Any
    y_train: Any
    x_validation: Any
    y_validation: Any
    x_test: Any
    y_test: Any


class StepRecord(NamedTuple):
    """What one outer step reports (at the penalties before its update)."""

    validation_mse: Any
    test_mse: Any  # never used for tuning; shown to expose overfitting of the validation set
    inner_steps: Any
    inner_gradient_norm: Any
    inner_converged: Any
    hypergradient_norm: Any


class Evaluation(NamedTuple):
    """A fitted model's scores and how its inner solve ended."""

    validation_mse: float
    test_mse: float
    test_r2: float
    inner_steps: int
    inner_gradient_norm: float
    inner_converged: bool


class Comparison(NamedTuple):
    """Everything the script prints and plots."""

    feature_names: list[str]
    history: list[StepRecord]  # one per outer step, as Python scalars
    penalties: np.ndarray  # the tuned per-feature penalties exp(theta)
    results: dict[str, Evaluation]  # "no penalty", "best shared", "per-feature"
    shared_penalty: float  # the grid's best
    initial_penalty: float
    hypergradient_error: float  # relative error of the first hypergradient vs the closed form
    caught_warnings: list[warnings.WarningMessage]
    compile_seconds: float
    tuning_seconds: float


def load_noisy_diabetes(
    seed: int, num_train: int, num_validation: int, noise_features: int
) -> tuple[Splits, list[str]]:
    """Diabetes data plus Gaussian noise columns, shuffled by ``seed`` and split three ways.

    Inputs and targets are standardized with the training set's statistics only, so a mean
    squared error of 1 is about what predicting the training mean scores.
    """
    bunch = datasets.load_diabetes()
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(bunch.target), noise_features))
    inputs = np.concatenate([bunch.data, noise], axis=1)
    targets = np.asarray(bunch.target, np.float64)
    num_test = len(targets) - num_train - num_validation
    if num_train < 2 or num_validation < 1 or num_test < 1:
        raise app.UsageError(
            f"--num_train={num_train} and --num_validation={num_validation} must leave at least "
            f"2 training, 1 validation and 1 test example of the {len(targets)}."
        )
    order = rng.permutation(len(targets))
    train, validation, test = np.split(order, [num_train, num_train + num_validation])
    mean, std = inputs[train].mean(axis=0), inputs[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    y_mean, y_std = targets[train].mean(), targets[train].std()

    def standardize(index):
        x = ((inputs[index] - mean) / std).astype(np.float32)
        y = ((targets[index] - y_mean) / y_std).astype(np.float32)
        return jnp.asarray(x), jnp.asarray(y)

    splits = Splits(*standardize(train), *standardize(validation), *standardize(test))
    names = list(bunch.feature_names) + [f"noise {i}" for i in range(1, noise_features + 1)]
    return splits, names


# The parameters are one vector: the weights w, then the intercept b.
def predict(params: jax.Array, x: jax.Array) -> jax.Array:
    return x @ params[:-1] + params[-1]


def mean_squared_error(params: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((predict(params, x) - y) ** 2)


def training_loss(params, log_penalties, x, y) -> jax.Array:
    """The inner objective: half the training MSE plus the per-feature penalty (not on b)."""
    penalty = jnp.sum(jnp.exp(log_penalties) * params[:-1] ** 2)
    return 0.5 * mean_squared_error(params, x, y) + 0.5 * penalty


def closed_form_ridge(log_penalties, x, y) -> jax.Array:
    """The inner problem's exact solution: (X^T X / n + diag(exp(theta), 0)) w = X^T y / n."""
    design = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
    penalties = jnp.append(jnp.exp(log_penalties), 0.0)
    hessian = design.T @ design / x.shape[0] + jnp.diag(penalties)
    return jnp.linalg.solve(hessian, design.T @ y / x.shape[0])


def make_inner_solve(config: TuningConfig) -> Callable:
    """``inner_solve(log_penalties, init, x, y) -> (params, diagnostics)``, differentiable."""
    # Adam scales each coordinate by its own gradient history, which copes with penalties that
    # end up orders of magnitude apart; plain gradient descent would need a step below
    # 2 / (largest penalty) and crawl along the weakly penalized features. Each solve starts
    # from zero: a warm start from the previous solution does not help Adam, whose first step
    # has the size of the learning rate in every coordinate however small the gradient (its
    # second-moment estimate starts at zero); here it saved no steps and left 7 of 300 solves
    # short of the tolerance.
    optimizer = optax.adam(config.inner_learning_rate)
    diff = bilevel.Implicit(implicit.CG(tol=config.linear_solve_tol))

    def inner_solve(log_penalties, init, x, y):
        return bilevel.solve(
            training_loss,
            init,
            log_penalties,
            x,
            y,
            optimizer=optimizer,
            steps=config.inner_steps,
            tol=config.inner_tol,
            diff=diff,
        )

    return inner_solve


def make_outer_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=0.9, nesterov=True)
    if name == "ademamix":
        return metaopt.ademamix(learning_rate)
    raise ValueError(f"outer_optimizer must be one of {OUTER_OPTIMIZERS}, got {name!r}.")


def make_outer_step(inner_solve: Callable, outer_optimizer: optax.GradientTransformation):
    """One jit-compiled outer step: inner solve, hypergradient, outer update."""

    def validation_loss(log_penalties, data: Splits):
        init = jnp.zeros(data.x_train.shape[1] + 1)
        params, diagnostics = inner_solve(log_penalties, init, data.x_train, data.y_train)
        loss = mean_squared_error(params, data.x_validation, data.y_validation)
        return loss, (params, diagnostics)

    @jax.jit
    def outer_step(log_penalties, outer_state, data: Splits):
        (loss, (params, diagnostics)), hypergradient = jax.value_and_grad(
            validation_loss, has_aux=True
        )(log_penalties, data)
        updates, outer_state = outer_optimizer.update(hypergradient, outer_state, log_penalties)
        record = StepRecord(
            validation_mse=loss,
            test_mse=mean_squared_error(params, data.x_test, data.y_test),
            inner_steps=diagnostics.steps,
            inner_gradient_norm=diagnostics.gradient_norm,
            inner_converged=diagnostics.converged,
            hypergradient_norm=jnp.linalg.norm(hypergradient),
        )
        return optax.apply_updates(log_penalties, updates), outer_state, record, hypergradient

    return outer_step


def _unstack(tree, size: int) -> list:
    return [jax.tree.map(operator.itemgetter(i), tree) for i in range(size)]


def evaluate(params, diagnostics, data: Splits) -> Evaluation:
    test_mse = float(mean_squared_error(params, data.x_test, data.y_test))
    return Evaluation(
        validation_mse=float(mean_squared_error(params, data.x_validation, data.y_validation)),
        test_mse=test_mse,
        test_r2=1.0 - test_mse / float(jnp.var(data.y_test)),
        inner_steps=int(diagnostics.steps),
        inner_gradient_norm=float(diagnostics.gradient_norm),
        inner_converged=bool(diagnostics.converged),
    )


def print_row(step: int, record: StepRecord) -> None:
    converged = "yes" if record.inner_converged else "NO"
    tqdm.write(
        f"{step:>5} {record.validation_mse:>9.4f} {record.test_mse:>9.4f} "
        f"{record.inner_steps:>6} {record.inner_gradient_norm:>10.2e} {converged:>9} "
        f"{record.hypergradient_norm:>10.2e}"
    )


def report_warnings(step: int, new: list[warnings.WarningMessage], total: int) -> None:
    """Prints the first few warnings in full; later ones are only counted."""
    for index, warning in enumerate(new, start=total - len(new) + 1):
        if index <= MAX_PRINTED_WARNINGS:
            tqdm.write(f"  {warning.category.__name__} at outer step {step}:")
            tqdm.write(f"    {warning.message}")
        if index == MAX_PRINTED_WARNINGS:
            tqdm.write("  (further warnings are counted in the summary, not printed)")


def compare(config: TuningConfig, *, progress: bool = True, print_every: int = 0) -> Comparison:
    """Fits the baselines, tunes the per-feature penalties, and evaluates all three."""
    data, names = load_noisy_diabetes(
        config.seed, config.num_train, config.num_validation, config.noise_features
    )
    num_features = data.x_train.shape[1]
    inner_solve = make_inner_solve(config)
    zeros = jnp.zeros(num_features + 1)

    # Baselines: no penalty (log-penalty -inf), and a grid of shared penalties solved at once.
    fit = jax.jit(
        lambda log_penalties: inner_solve(log_penalties, zeros, data.x_train, data.y_train)
    )
    results = {"no penalty": evaluate(*fit(jnp.full(num_features, -jnp.inf)), data)}
    grid = np.logspace(-4, 2, config.grid_size)
    grid_params, grid_diagnostics = jax.vmap(fit)(jnp.log(grid)[:, None] * jnp.ones(num_features))
    grid_results = [
        evaluate(params, diagnostics, data)
        for params, diagnostics in zip(
            grid_params, _unstack(grid_diagnostics, len(grid)), strict=True
        )
    ]
    best = min(range(len(grid)), key=lambda i: grid_results[i].validation_mse)
    results["best shared"] = grid_results[best]

    outer_optimizer = make_outer_optimizer(config.outer_optimizer, config.outer_learning_rate)
    outer_step = make_outer_step(inner_solve, outer_optimizer)
    log_penalties = jnp.full(num_features, jnp.log(config.initial_penalty))
    outer_state = outer_optimizer.init(log_penalties)
    start = time.perf_counter()
    outer_step = outer_step.lower(log_penalties, outer_state, data).compile()
    compile_seconds = time.perf_counter() - start

    exact_hypergradient = jax.grad(
        lambda t: mean_squared_error(
            closed_form_ridge(t, data.x_train, data.y_train), data.x_validation, data.y_validation
        )
    )(log_penalties)

    history: list[StepRecord] = []
    start = time.perf_counter()
    if print_every:
        header = (
            f"{'step':>5} {'val MSE':>9} {'test MSE':>9} {'inner':>6} {'inner |g|':>10} "
            f"{'converged':>9} {'|hypergrad|':>10}"
        )
        tqdm.write(header)
        tqdm.write("-" * len(header))
    with warnings.catch_warnings(record=True) as caught:
        # Every failed solve is reported, not only the first from each place in the code.
        warnings.simplefilter("always")
        bar = tqdm(range(config.outer_steps), desc="tuning", unit="step", disable=not progress)
        for step in bar:
            reported = len(caught)
            log_penalties, outer_state, record, hypergradient = outer_step(
                log_penalties, outer_state, data
            )
            # device_get waits for the step, so its run-time warnings are in `caught` by now.
            record = StepRecord(*(x.item() for x in jax.device_get(record)))
            if step == 0:
                hypergradient_error = float(
                    jnp.linalg.norm(hypergradient - exact_hypergradient)
                    / jnp.linalg.norm(exact_hypergradient)
                )
            history.append(record)
            if len(caught) > reported:
                report_warnings(step, caught[reported:], len(caught))
            if print_every and (step % print_every == 0 or step == config.outer_steps - 1):
                print_row(step, record)
            bar.set_postfix(val_mse=f"{record.validation_mse:.4f}")
        tuning_seconds = time.perf_counter() - start
        results["per-feature"] = evaluate(*fit(log_penalties), data)
    return Comparison(
        feature_names=names,
        history=history,
        penalties=np.exp(np.asarray(log_penalties)),
        results=results,
        shared_penalty=float(grid[best]),
        initial_penalty=config.initial_penalty,
        hypergradient_error=hypergradient_error,
        caught_warnings=list(caught),
        compile_seconds=compile_seconds,
        tuning_seconds=tuning_seconds,
    )


def print_summary(comparison: Comparison) -> None:
    first = comparison.history[0]
    tuned = comparison.results["per-feature"]
    print(
        f"\nTuning: {len(comparison.history)} outer steps in {comparison.tuning_seconds:.1f} s "
        f"(compilation {comparison.compile_seconds:.1f} s); inner Adam steps per outer step: "
        f"median {np.median([r.inner_steps for r in comparison.history]):.0f}, "
        f"most {max(r.inner_steps for r in comparison.history)}."
    )
    failed = sum(not r.inner_converged for r in comparison.history)
    print(
        f"Inner solves that missed their tolerance during tuning: {failed} of "
        f"{len(comparison.history)}."
    )
    categories: dict[str, int] = {}
    for warning in comparison.caught_warnings:
        categories[warning.category.__name__] = categories.get(warning.category.__name__, 0) + 1
    counts = ", ".join(f"{n} {name}" for name, n in categories.items()) or "none"
    print(f"Warnings during tuning: {counts}.")
    print(
        f"First hypergradient (implicit, through {first.inner_steps} Adam steps) vs the "
        f"closed-form ridge solution: relative error {comparison.hypergradient_error:.1e}."
    )
    print(
        f"\nValidation MSE: {first.validation_mse:.4f} before tuning -> "
        f"{tuned.validation_mse:.4f} after"
    )
    print()
    header = (
        f"{'penalties':<28} {'val MSE':>9} {'test MSE':>9} {'test R2':>8} {'inner steps':>11} "
        f"{'converged':>9}"
    )
    print(header)
    print("-" * len(header))
    labels = {
        "no penalty": "no penalty",
        "best shared": f"shared {comparison.shared_penalty:.3g} (grid best)",
        "per-feature": "per-feature (tuned)",
    }
    for name, r in comparison.results.items():
        converged = "yes" if r.inner_converged else f"NO {r.inner_gradient_norm:.1e}"
        print(
            f"{labels[name]:<28} {r.validation_mse:>9.4f} {r.test_mse:>9.4f} {r.test_r2:>8.3f} "
            f"{r.inner_steps:>11} {converged:>9}"
        )
    num_real = sum(not n.startswith("noise") for n in comparison.feature_names)
    real, noise = comparison.penalties[:num_real], comparison.penalties[num_real:]
    print(
        f"\nTuned penalties: median {np.median(real):.3g} on the {num_real} diabetes features "
        f"(range {real.min():.2g} to {real.max():.2g})"
        + (
            f", median {np.median(noise):.3g} on the {len(noise)} noise features "
            f"(range {noise.min():.2g} to {noise.max():.2g})."
            if len(noise)
            else "."
        )
    )


def save_plot(comparison: Comparison, path: Path) -> None:
    figure = Figure(figsize=(12, 4.2), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg: no display needed
    loss_axes, penalty_axes = figure.subplots(1, 2, width_ratios=[1, 1.6])
    steps = range(len(comparison.history))
    shared = comparison.results["best shared"]
    loss_axes.plot(steps, [r.validation_mse for r in comparison.history], label="validation")
    loss_axes.plot(
        steps, [r.test_mse for r in comparison.history], label="test (not used for tuning)"
    )
    loss_axes.axhline(shared.validation_mse, color="C0", ls="--", lw=1, label="best shared, val")
    loss_axes.axhline(shared.test_mse, color="C1", ls="--", lw=1, label="best shared, test")
    loss_axes.set(xlabel="outer step", ylabel="MSE (standardized target)", yscale="log")
    loss_axes.set_title("per-feature penalties: loss while tuning")

    names = comparison.feature_names
    colors = ["C2" if not n.startswith("noise") else "C7" for n in names]
    penalty_axes.bar(range(len(names)), comparison.penalties, color=colors)
    penalty_axes.axhline(
        comparison.shared_penalty, color="k", ls="--", lw=1, label="best shared penalty"
    )
    penalty_axes.axhline(
        comparison.initial_penalty, color="k", ls=":", lw=1, label="initial penalty"
    )
    penalty_axes.set(
        xlabel="feature (unlabelled: noise)", ylabel="penalty exp(theta)", yscale="log"
    )
    num_real = sum(not n.startswith("noise") for n in names)
    penalty_axes.set_xticks(range(num_real), names[:num_real], rotation=90)
    penalty_axes.set_title(
        f"tuned penalties: {num_real} diabetes features (green), "
        f"{len(names) - num_real} noise features (grey)"
    )
    for axes in (loss_axes, penalty_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def define_flags() -> None:
    """The script's flags. Defined when run as a script, not on import: ``demo.py`` imports
    :func:`compare`, and absl refuses a second definition of its ``--seed`` or ``--plot_path``.
    """
    d = TuningConfig()
    flags.DEFINE_integer("seed", d.seed, "Seed of the noise features and the data split.")
    flags.DEFINE_integer("num_train", d.num_train, "Training examples.", lower_bound=2)
    flags.DEFINE_integer(
        "num_validation", d.num_validation, "Validation examples (the outer loss).", lower_bound=1
    )
    flags.DEFINE_integer(
        "noise_features", d.noise_features, "Pure-noise columns added.", lower_bound=0
    )
    flags.DEFINE_float(
        "initial_penalty", d.initial_penalty, "Every penalty's starting value (> 0)."
    )
    flags.DEFINE_enum(
        "outer_optimizer",
        d.outer_optimizer,
        OUTER_OPTIMIZERS,
        "Outer optax transform on the log-penalties (sgd: Nesterov momentum 0.9; ademamix: "
        "metaopt's). sgd takes one step size for hypergradient entries that differ by orders "
        "of magnitude; at learning rates 1 to 30 it tuned worse than adam at 0.1.",
    )
    flags.DEFINE_float(
        "outer_learning_rate", d.outer_learning_rate, "Outer learning rate.", lower_bound=0.0
    )
    flags.DEFINE_integer("outer_steps", d.outer_steps, "Hypergradient steps.", lower_bound=1)
    flags.DEFINE_float(
        "inner_learning_rate", d.inner_learning_rate, "Inner Adam learning rate.", lower_bound=0.0
    )
    flags.DEFINE_integer("inner_steps", d.inner_steps, "Most inner steps per solve.", lower_bound=1)
    flags.DEFINE_float(
        "inner_tol", d.inner_tol, "Inner gradient norm at which a solve stops.", lower_bound=0.0
    )
    flags.DEFINE_float(
        "linear_solve_tol",
        d.linear_solve_tol,
        "Relative residual of the conjugate-gradient solve of the implicit derivative.",
        lower_bound=0.0,
    )
    flags.DEFINE_integer(
        "grid_size", d.grid_size, "Shared penalties tried, 1e-4 to 1e2.", lower_bound=1
    )
    flags.DEFINE_integer("print_every", 25, "Table row every this many outer steps; 0: none.")
    flags.DEFINE_string(
        "plot_path",
        str(Path(__file__).resolve().parent / "output" / "hyperparameter_tuning.png"),
        "Where the PNG is written.",
    )
    flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # as in demo.py: no JAX INFO lines
    values = flags.FLAGS
    config = TuningConfig(**{name: values[name].value for name in TuningConfig._fields})
    if not config.initial_penalty > 0:
        raise app.UsageError(
            f"--initial_penalty must be positive (it is tuned as a logarithm), got "
            f"{config.initial_penalty}."
        )
    start = time.perf_counter()
    print(
        f"diabetes + {config.noise_features} noise features: {config.num_train} train / "
        f"{config.num_validation} validation examples, the rest test; {config.outer_steps} outer "
        f"{config.outer_optimizer} steps (learning rate {config.outer_learning_rate}) on "
        f"{10 + config.noise_features} log-penalties; inner Adam, at most {config.inner_steps} "
        f"steps to gradient norm {config.inner_tol}; device: {jax.devices()[0].platform}"
    )
    comparison = compare(config, progress=values.progress, print_every=values.print_every)
    print_summary(comparison)
    path = Path(values.plot_path)
    save_plot(comparison, path)
    print(f"\nPlot saved to {path}")
    print(f"Total wall time (after imports): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)
