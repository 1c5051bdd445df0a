r"""Data hypercleaning on scikit-learn's digits: one learned weight per training example.

Half of the training labels (``--corruption``) are replaced by a different class, chosen at
random. A linear softmax classifier :math:`\theta = (W, b)` is trained on the weighted training
loss, and the weights are tuned so that the trained classifier does well on a small, clean
validation set (Franceschi et al., ICML 2017; the data-cleaning experiment of Kwon, Kwon, Wright
and Nowak, ICML 2023, which introduced F2SA):

.. math::

   \theta^\star(w) = \arg\min_\theta \tfrac1n \textstyle\sum_{i=1}^n \sigma(w_i)\,
   \ell(\theta; x_i, \tilde y_i) + \tfrac{\mu}{2}\lVert\theta\rVert^2, \qquad
   \min_w \tfrac1m \textstyle\sum_{j=1}^m \ell(\theta^\star(w); x^{\mathrm{val}}_j,
   y^{\mathrm{val}}_j),

with :math:`\ell` the cross-entropy, :math:`\tilde y_i` the possibly corrupted labels and
:math:`\sigma` the logistic sigmoid, which keeps every weight in :math:`(0, 1)` without a
projection (a weight can approach 0, "drop this example", but never turn a loss into a gain).
The L2 term :math:`\mu > 0` makes the inner problem strongly convex, as implicit
differentiation and F2SA's analysis assume.

Each outer step runs ``--inner_steps`` gradient-descent steps on the inner problem, warm-started
from the previous outer step, computes a hypergradient and takes an Adam step on :math:`w`. The
methods (``--methods``) differ only in the hypergradient:

- ``f2sa``: :class:`metaopt.bilevel.F2SA`, two warm-started first-order solves, no second
  derivative. The multiplier is :math:`\lambda_k = (a + b k)/\mu` at outer step :math:`k`
  (``--multiplier`` :math:`a`, ``--multiplier_growth`` :math:`b`): F2SA's analysis asks for
  :math:`\lambda \ge 2 L_f/\mu_g`, with :math:`L_f` the outer gradient's Lipschitz constant
  (about 0.86 here) and :math:`\mu_g = \mu` the inner strong convexity, and its bias shrinks as
  :math:`1/\lambda` times a constant that grows as :math:`\mu` shrinks, so the schedule is
  written in units of :math:`1/\mu`;
- ``implicit_cg``: implicit differentiation, adjoint system solved by conjugate gradient;
- ``implicit_neumann``: implicit differentiation with a truncated Neumann series
  (``--neumann_steps`` terms, scale the inner learning rate);
- ``unrolled``: backpropagation through the inner steps of the outer step;
- ``truncated``: backpropagation through the last ``--truncated_steps`` of them;
- ``slbamm``: :class:`metaopt.bilevel.SLBAMM`, the single-loop method: an outer step is
  ``--inner_steps`` of its iterations, each one gradient step on the classifier, one on the
  multiplier and one plain gradient step on :math:`w` (``--slbamm_learning_rate``; no Adam);
- ``no_weights``: the baseline, every weight 1 (plain training on the corrupted data);
- ``clean_only``: the oracle, weight 1 on the clean examples and 0 on the corrupted ones.

Every method's final weights are scored the same way: a classifier is trained from zero with
them for ``--eval_steps`` steps and its test accuracy is reported, with the precision and recall
of "weight below ``--threshold``" as a detector of the corrupted examples, and the median wall
time of one compiled outer step (inner solve, hypergradient and update; after compilation,
``block_until_ready``).

Run it from the repository root (it needs the ``examples`` extra: ``pip install
"metaopt-jax[examples]"``)::

  python examples/hypercleaning.py                                 # the CPU default, about 30 s
  python examples/hypercleaning.py --methods=f2sa,implicit_cg --outer_steps=400
  python examples/hypercleaning.py --helpfull                      # every flag
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from tqdm import tqdm

from metaopt import bilevel, implicit
from metaopt.tasks import load_digits

NUM_CLASSES = 10
HYPERGRADIENT_METHODS = (
    "f2sa",
    "implicit_cg",
    "implicit_neumann",
    "unrolled",
    "truncated",
    "slbamm",
)
FIXED_METHODS = ("no_weights", "clean_only")  # weights set by hand, no outer loop
METHODS = HYPERGRADIENT_METHODS + FIXED_METHODS


class CleaningConfig(NamedTuple):
    """Everything a run depends on (the script fills it from its flags)."""

    seed: int = 0
    num_train: int = 1000
    num_validation: int = 200
    num_test: int = 359
    corruption: float = 0.5
    l2: float = 1e-2
    inner_learning_rate: float = 0.3
    inner_steps: int = 30
    outer_steps: int = 200
    outer_learning_rate: float = 0.1
    multiplier: float = 1.0  # F2SA's lambda_0, in units of 1 / l2
    multiplier_growth: float = 0.01  # its growth per outer step, in units of 1 / l2
    neumann_steps: int = 30
    truncated_steps: int = 10
    slbamm_learning_rate: float = 30.0
    cg_tol: float = 1e-4
    eval_steps: int = 2000
    threshold: float = 0.1


class Data(NamedTuple):
    """Arrays passed to jitted code (a pytree): inputs float, labels int32."""

    x_train: Any
    y_train: Any  # the corrupted labels, the only ones the methods see
    x_validation: Any
    y_validation: Any
    x_test: Any
    y_test: Any


class MethodResult(NamedTuple):
    """One row of the table."""

    test_accuracy: float
    precision: float  # of "weight < threshold" as a detector of the corrupted examples
    recall: float
    flagged: int  # examples whose weight is below the threshold
    validation_loss: float
    step_seconds: float  # median of one compiled outer step; nan for the fixed methods
    compile_seconds: float
    warnings: int  # runtime warnings (inner or adjoint solves not converged, F2SA failures)
    weights: np.ndarray
    outer_steps: int = 0  # outer steps taken (fewer than configured under a time budget)


def load_corrupted_digits(config: CleaningConfig) -> tuple[Data, np.ndarray]:
    """Digits split four ways, a fraction of the training labels corrupted (seeded).

    Returns the data and the boolean mask of the corrupted training examples.
    """
    digits = load_digits(seed=config.seed)  # 1438 standardized training images, 359 test
    pool = len(digits.y_train)
    if config.num_train + config.num_validation > pool or config.num_test > len(digits.y_test):
        raise app.UsageError(
            f"--num_train={config.num_train} plus --num_validation={config.num_validation} must "
            f"be at most {pool}, and --num_test={config.num_test} at most {len(digits.y_test)}."
        )
    if not 0.0 <= config.corruption < 1.0:
        raise app.UsageError(f"--corruption must be in [0, 1), got {config.corruption}.")
    rng = np.random.default_rng(config.seed)
    train = slice(0, config.num_train)
    validation = slice(config.num_train, config.num_train + config.num_validation)
    labels = digits.y_train[train].copy()
    corrupted = np.zeros(config.num_train, bool)
    corrupted[rng.permutation(config.num_train)[: round(config.corruption * config.num_train)]] = 1
    # A different class, uniformly: add 1..9 modulo 10.
    labels[corrupted] = (labels[corrupted] + rng.integers(1, NUM_CLASSES, corrupted.sum())) % 10
    dtype = jnp.result_type(float)  # float32, or float64 under jax_enable_x64
    data = Data(
        jnp.asarray(digits.x_train[train], dtype),
        jnp.asarray(labels, jnp.int32),
        jnp.asarray(digits.x_train[validation], dtype),
        jnp.asarray(digits.y_train[validation], jnp.int32),
        jnp.asarray(digits.x_test[: config.num_test], dtype),
        jnp.asarray(digits.y_test[: config.num_test], jnp.int32),
    )
    return data, corrupted


def init_classifier(num_features: int) -> dict[str, jax.Array]:
    dtype = jnp.result_type(float)
    return {"w": jnp.zeros((num_features, NUM_CLASSES), dtype), "b": jnp.zeros(NUM_CLASSES, dtype)}


def per_example_loss(params, x, y) -> jax.Array:
    logits = x @ params["w"] + params["b"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def accuracy(params, x, y) -> jax.Array:
    return jnp.mean(jnp.argmax(x @ params["w"] + params["b"], axis=1) == y)


def make_losses(config: CleaningConfig, data: Data) -> tuple[Callable, Callable]:
    """The inner loss :math:`g` and the outer loss :math:`f`, both ``(params, weight_logits)``."""

    def inner(params, weight_logits):
        weighted = jax.nn.sigmoid(weight_logits) * per_example_loss(
            params, data.x_train, data.y_train
        )
        squares = sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
        return jnp.mean(weighted) + 0.5 * config.l2 * squares

    def outer(params, weight_logits):
        del weight_logits  # the validation loss depends on the weights only through params
        return jnp.mean(per_example_loss(params, data.x_validation, data.y_validation))

    return inner, outer


def make_outer_step(method: str, config: CleaningConfig, optimizer) -> tuple[Callable, Callable]:
    """``(init_state(weight_logits, params), step)`` of one method.

    ``step(weight_logits, outer_state, state, data) -> (weight_logits, outer_state, state,
    validation_loss)`` is one outer step; ``state`` is the warm start of the inner solves (the
    classifier, or F2SA's state).
    """
    inner_optimizer = optax.sgd(config.inner_learning_rate)
    if method == "f2sa":
        f2sa = bilevel.F2SA(
            multiplier=lambda k: (config.multiplier + config.multiplier_growth * k) / config.l2,
            inner_optimizer=inner_optimizer,
            inner_steps=config.inner_steps,
        )

        def step(weight_logits, outer_state, state, data):
            inner, outer = make_losses(config, data)
            hypergradient, state, _ = f2sa.hypergradient(outer, inner, weight_logits, state)
            updates, outer_state = optimizer.update(hypergradient, outer_state, weight_logits)
            loss = outer(state.y, weight_logits)
            return optax.apply_updates(weight_logits, updates), outer_state, state, loss

        return f2sa.init, jax.jit(step)

    if method == "slbamm":
        slbamm = bilevel.SLBAMM(
            learning_rate=config.slbamm_learning_rate,
            inner_learning_rate=config.inner_learning_rate,
            multiplier_learning_rate=config.inner_learning_rate,
        )

        def step(weight_logits, outer_state, state, data):
            inner, outer = make_losses(config, data)

            def iteration(state, _):
                state, info = slbamm.step(outer, inner, state)
                return state, info.outer_loss

            state, losses = jax.lax.scan(
                iteration, state._replace(x=weight_logits), None, length=config.inner_steps
            )
            return state.x, outer_state, state, losses[-1]

        return slbamm.init, jax.jit(step)

    diff = {
        # A fixed budget of warm-started steps (rtol=None): the relative test against the
        # gradient at a warm start that is already close to the solution would fail while the
        # solution is fine. How well the adjoint system is solved is checked (and warned about).
        "implicit_cg": bilevel.Implicit(implicit.CG(tol=config.cg_tol), rtol=None),
        "implicit_neumann": bilevel.Implicit(
            implicit.Neumann(steps=config.neumann_steps, scale=config.inner_learning_rate),
            rtol=None,
        ),
        "unrolled": bilevel.Unrolled(),
        "truncated": bilevel.Truncated(min(config.truncated_steps, config.inner_steps)),
    }[method]

    def step(weight_logits, outer_state, params, data):
        inner, outer = make_losses(config, data)

        def validation_loss(weight_logits):
            solution, _ = bilevel.solve(
                inner,
                params,  # the warm start: a constant here, only the weights are differentiated
                weight_logits,
                optimizer=inner_optimizer,
                steps=config.inner_steps,
                diff=diff,
            )
            return outer(solution, weight_logits), solution

        (loss, params), hypergradient = jax.value_and_grad(validation_loss, has_aux=True)(
            weight_logits
        )
        updates, outer_state = optimizer.update(hypergradient, outer_state, weight_logits)
        return optax.apply_updates(weight_logits, updates), outer_state, params, loss

    return (lambda weight_logits, params: params), jax.jit(step)


def train_classifier(config: CleaningConfig, data: Data, weights: jax.Array):
    """A classifier trained from zero with fixed example weights (how every method is scored)."""
    inner, _ = make_losses(config, data)
    # Logits of the weights; weights of exactly 0 and 1 map to -inf and +inf, which the sigmoid
    # turns back into 0 and 1.
    weight_logits = jnp.log(weights) - jnp.log1p(-weights)
    params, _ = bilevel.solve(
        inner,
        init_classifier(data.x_train.shape[1]),
        weight_logits,
        optimizer=optax.sgd(config.inner_learning_rate, momentum=0.9),
        steps=config.eval_steps,
        diff=bilevel.FirstOrder(),
    )
    return params


def score(config, data, corrupted, weights, step_seconds, compile_seconds, caught):
    """Test accuracy of a classifier trained with ``weights``, and the detection scores."""
    params = jax.jit(train_classifier, static_argnums=0)(config, data, jnp.asarray(weights))
    _, outer = make_losses(config, data)
    flagged = np.asarray(weights) < config.threshold
    hits = int(np.sum(flagged & corrupted))
    return MethodResult(
        test_accuracy=float(accuracy(params, data.x_test, data.y_test)),
        precision=hits / flagged.sum() if flagged.any() else float("nan"),
        recall=hits / corrupted.sum() if corrupted.any() else float("nan"),
        flagged=int(flagged.sum()),
        validation_loss=float(outer(params, None)),
        step_seconds=step_seconds,
        compile_seconds=compile_seconds,
        warnings=caught,
        weights=np.asarray(weights),
    )


def run_method(method, config, data, corrupted, *, progress=True, time_budget=None) -> MethodResult:
    """Tunes the weights with one method (or sets them, for the fixed ones) and scores them.

    With ``time_budget`` (seconds), the outer loop stops once its compiled steps have taken
    that long in all (compilation not counted), or after ``config.outer_steps`` steps.
    """
    if method == "no_weights":
        return score(config, data, corrupted, np.ones(len(corrupted)), np.nan, np.nan, 0)
    if method == "clean_only":
        return score(config, data, corrupted, (~corrupted).astype(float), np.nan, np.nan, 0)
    optimizer = optax.adam(config.outer_learning_rate)
    weight_logits = jnp.zeros(data.x_train.shape[0], jnp.result_type(float))  # weights 1/2
    init_state, step = make_outer_step(method, config, optimizer)
    outer_state = optimizer.init(weight_logits)
    state = init_state(weight_logits, init_classifier(data.x_train.shape[1]))
    with warnings.catch_warnings(record=True) as caught:
        # Every failed solve is counted, not only the first from each place in the code.
        warnings.simplefilter("always")
        start = time.perf_counter()
        step = step.lower(weight_logits, outer_state, state, data).compile()
        compile_seconds = time.perf_counter() - start
        seconds = []
        bar = tqdm(range(config.outer_steps), desc=f"{method:>16}", disable=not progress)
        for _ in bar:
            start = time.perf_counter()
            weight_logits, outer_state, state, loss = jax.block_until_ready(
                step(weight_logits, outer_state, state, data)
            )
            seconds.append(time.perf_counter() - start)
            bar.set_postfix(val_loss=f"{float(loss):.4f}")
            if time_budget is not None and sum(seconds) >= time_budget:
                break
        weights = jax.nn.sigmoid(weight_logits)
    result = score(
        config, data, corrupted, weights, float(np.median(seconds)), compile_seconds, len(caught)
    )
    return result._replace(outer_steps=len(seconds))


def compare(
    config: CleaningConfig, methods: Sequence[str] = METHODS, *, progress: bool = True
) -> dict[str, MethodResult]:
    """Every method in ``methods`` on the same corrupted data, in that order."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got unknown {unknown}.")
    data, corrupted = load_corrupted_digits(config)
    return {m: run_method(m, config, data, corrupted, progress=progress) for m in methods}


def markdown_table(results: dict[str, MethodResult]) -> str:
    """The results as a markdown table (a row per method)."""
    lines = [
        "| method | test accuracy | precision | recall | flagged | validation loss "
        "| outer step (ms) | warnings |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def number(value, fmt, unit=""):
        return "-" if np.isnan(value) else format(value, fmt) + unit

    for name, r in results.items():
        lines.append(
            f"| {name} | {100 * r.test_accuracy:.1f}% | {number(100 * r.precision, '.1f', '%')} | "
            f"{number(100 * r.recall, '.1f', '%')} | {r.flagged} | {r.validation_loss:.4f} | "
            f"{number(1e3 * r.step_seconds, '.2f')} | {r.warnings} |"
        )
    return "\n".join(lines)


def define_flags() -> None:
    """The script's flags (defined when run as a script, not on import)."""
    d = CleaningConfig()
    flags.DEFINE_list("methods", list(METHODS), f"Comma-separated, among {', '.join(METHODS)}.")
    flags.DEFINE_integer("seed", d.seed, "Seed of the split and of the corruption.")
    flags.DEFINE_integer("num_train", d.num_train, "Training examples.", lower_bound=1)
    flags.DEFINE_integer(
        "num_validation", d.num_validation, "Clean validation examples.", lower_bound=1
    )
    flags.DEFINE_integer("num_test", d.num_test, "Test examples (at most 359).", lower_bound=1)
    flags.DEFINE_float("corruption", d.corruption, "Fraction of training labels corrupted.")
    flags.DEFINE_float("l2", d.l2, "L2 penalty mu of the inner problem (> 0).", lower_bound=0.0)
    flags.DEFINE_float(
        "inner_learning_rate", d.inner_learning_rate, "Inner gradient-descent step.", lower_bound=0
    )
    flags.DEFINE_integer(
        "inner_steps", d.inner_steps, "Inner steps per outer step (each F2SA solve).", lower_bound=1
    )
    flags.DEFINE_integer("outer_steps", d.outer_steps, "Outer Adam steps.", lower_bound=1)
    flags.DEFINE_float(
        "outer_learning_rate", d.outer_learning_rate, "Outer Adam learning rate.", lower_bound=0
    )
    flags.DEFINE_float(
        "multiplier", d.multiplier, "F2SA's first multiplier, times --l2.", lower_bound=0
    )
    flags.DEFINE_float(
        "multiplier_growth",
        d.multiplier_growth,
        "F2SA's multiplier growth per outer step, times --l2.",
        lower_bound=0,
    )
    flags.DEFINE_integer(
        "neumann_steps", d.neumann_steps, "Terms of the Neumann series.", lower_bound=1
    )
    flags.DEFINE_integer(
        "truncated_steps", d.truncated_steps, "Inner steps differentiated.", lower_bound=1
    )
    flags.DEFINE_float(
        "slbamm_learning_rate", d.slbamm_learning_rate, "sl-BAMM's step on w.", lower_bound=0
    )
    flags.DEFINE_float("cg_tol", d.cg_tol, "Relative residual of the CG adjoint solve.")
    flags.DEFINE_integer(
        "eval_steps", d.eval_steps, "Steps of the final training with fixed weights.", lower_bound=1
    )
    flags.DEFINE_float("threshold", d.threshold, "A weight below it flags its example.")
    flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # no JAX INFO lines
    values = flags.FLAGS
    config = CleaningConfig(**{name: values[name].value for name in CleaningConfig._fields})
    if not config.l2 > 0:
        raise app.UsageError(f"--l2 must be positive (strong convexity), got {config.l2}.")
    unknown = sorted(set(values.methods) - set(METHODS))
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; choose among {', '.join(METHODS)}.")
    start = time.perf_counter()
    print(
        f"digits: {config.num_train} train ({100 * config.corruption:.0f}% corrupted) / "
        f"{config.num_validation} validation / {config.num_test} test; {config.outer_steps} "
        f"outer Adam steps (learning rate {config.outer_learning_rate}), {config.inner_steps} "
        f"warm-started inner steps each; device: {jax.devices()[0].platform}"
    )
    results = compare(config, values.methods, progress=values.progress)
    print(
        f"\nflagged: weight sigmoid(w_i) < {config.threshold}; precision and recall against "
        "the truly corrupted examples.\n"
    )
    print(markdown_table(results))
    print(f"\nTotal wall time (after imports): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)
