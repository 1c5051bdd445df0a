r"""A weight decay per weight of an MLP on scikit-learn's digits, tuned by hypergradient.

"Millions of hyperparameters" (Lorraine, Vicol and Duvenaud, "Optimizing Millions of
Hyperparameters by Implicit Differentiation", AISTATS 2020): every parameter :math:`w_i` of an
MLP classifier gets its own weight decay :math:`e^{\theta_i}`, and the decays are tuned on a
validation set,

.. math::

   w^\star(\theta) = \arg\min_w \tfrac1n \textstyle\sum_{j=1}^n \ell(w; x_j, y_j)
   + \tfrac12 \textstyle\sum_i e^{\theta_i} w_i^2, \qquad
   \min_\theta \tfrac1m \textstyle\sum_{j=1}^m \ell(w^\star(\theta); x^{\mathrm{val}}_j,
   y^{\mathrm{val}}_j),

with :math:`\ell` the cross-entropy. There are as many hyperparameters as parameters (biases
included). The decays are parameterized by their logarithm: every :math:`\theta` gives a
positive decay, no projection is needed, and an Adam step on :math:`\theta` changes a decay by a
factor, which suits a quantity whose useful values span orders of magnitude. The training split
is small (``--num_train``, 10 examples per class by default), so that the MLP overfits without
regularization and the decays have something to do.

The paper's algorithm alternates a few warm-started training steps with one hyperparameter
step whose hypergradient :math:`-\partial_\theta\nabla_w g\,^\top H^{-1}\nabla_w f` uses a
truncated Neumann series for the inverse Hessian; its claim is that the whole run costs a few
times ordinary training. Each outer step here runs ``--inner_steps`` gradient-descent steps on
the inner problem from the previous outer step's weights, computes the hypergradient and takes
an Adam step on :math:`\theta`. The methods (``--methods``) differ in the hypergradient:

- ``neumann``: implicit differentiation with a truncated Neumann series (the paper's choice:
  ``--neumann_steps`` Hessian-vector products, scaled by the inner learning rate);
- ``cg``: implicit differentiation, adjoint system solved by conjugate gradient (at most
  ``--cg_maxiter`` products; CG stops at the first direction of negative curvature, which a
  non-convex MLP can have, and says so);
- ``cg_ridge``: the same CG on the damped system :math:`(H + \rho I)^{-1}`, ``--cg_ridge``
  :math:`\rho`, the fix the warning suggests;
- ``unrolled``: backpropagation through the outer step's inner steps;
- ``no_decay`` and ``global_decay``: the baselines, plain training with no decay and with the
  single decay of ``--decay_grid`` that reaches the lowest validation loss, for the same number
  of inner steps (``--outer_steps`` times ``--inner_steps``) from the same initialization.

Reported for each: the validation loss, test loss and test accuracy of the network trained by
the run, the median wall time of one compiled outer step (inner steps, hypergradient and
update; ``block_until_ready``), and the **cost ratio**: the outer step's time over that of the
same number of steps of ordinary training, the two timed alternately ``--timing_repeats`` times
at the end of the run, fastest over fastest (the runs least disturbed by other work). The
warnings columns count the adjoint solves that did not reach their tolerance and those that
met negative curvature, parsed from metaopt's
:class:`~metaopt.implicit.ImplicitDifferentiationWarning`; residual and iterations are their
medians over the solves that warned.

Run it from the repository root (it needs the ``examples`` extra: ``pip install
"metaopt-jax[examples]"``)::

  python examples/per_parameter_weight_decay.py                 # 64-128-10, 9,610 decays
  python examples/per_parameter_weight_decay.py --hidden=1024,1024 --outer_steps=20
  python examples/per_parameter_weight_decay.py --helpfull      # every flag

The default took 41 s on a 2-core CPU at a load average of 2.5 (about 170 s at 10).
``--hidden=1024,1024`` is the 64-1024-1024-10 MLP: 1,126,410 parameters, as many decays; 20
outer steps took 88 s there.
"""

from __future__ import annotations

import itertools
import re
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
from metaopt.tasks import init_mlp, load_digits, mlp_apply

NUM_CLASSES = 10
# The hidden layers' nonlinearity. ReLU is the usual choice; a smooth one makes the inner loss
# twice differentiable everywhere, as the implicit function theorem assumes (the tests check
# hypergradients against finite differences with tanh).
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "softplus": jax.nn.softplus}
HYPERGRADIENT_METHODS = ("neumann", "cg", "cg_ridge", "unrolled")
FIXED_METHODS = ("no_decay", "global_decay")  # no outer loop
METHODS = HYPERGRADIENT_METHODS + FIXED_METHODS


class DecayConfig(NamedTuple):
    """Everything a run depends on (the script fills it from its flags)."""

    seed: int = 0
    hidden: tuple[int, ...] = (128,)
    activation: str = "relu"
    num_train: int = 100
    num_validation: int = 300
    num_test: int = 359
    inner_learning_rate: float = 0.1
    inner_steps: int = 20
    outer_steps: int = 100
    outer_learning_rate: float = 0.05
    initial_decay: float = 1e-3
    neumann_steps: int = 20
    cg_maxiter: int = 20
    cg_tol: float = 1e-3
    cg_ridge: float = 0.1
    decay_grid: tuple[float, ...] = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    timing_repeats: int = 20


class Data(NamedTuple):
    """Arrays passed to jitted code (a pytree): inputs float, labels int32."""

    x_train: Any
    y_train: Any
    x_validation: Any
    y_validation: Any
    x_test: Any
    y_test: Any


class MethodResult(NamedTuple):
    """One row of the table."""

    validation_loss: float  # of the network at the end of the run
    test_loss: float
    test_accuracy: float
    train_loss: float  # cross-entropy only, without the decay
    step_seconds: float  # median of one compiled outer step (or training chunk)
    ratio: float  # fastest outer step over the fastest chunk of ordinary training (paired)
    compile_seconds: float
    not_converged: int  # adjoint solves short of their tolerance (warnings)
    negative_curvature: int  # adjoint solves that met negative curvature (CG only)
    median_residual: float  # of the adjoint solves that warned; nan when none did
    median_iterations: float  # of the adjoint solves that warned (products); nan when none did
    decay: float  # the global decay; nan for the tuned ones
    decays: np.ndarray  # every learned decay (flattened), or the global one


def num_parameters(config: DecayConfig) -> int:
    """Parameters of the MLP, and so hyperparameters (one decay each)."""
    sizes = [64, *config.hidden, NUM_CLASSES]
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def load_data(config: DecayConfig) -> Data:
    """Digits split three ways: a small training set, a validation set and the test set."""
    digits = load_digits(seed=config.seed)  # 1438 standardized training images, 359 test
    pool = len(digits.y_train)
    if config.num_train + config.num_validation > pool or config.num_test > len(digits.y_test):
        raise ValueError(
            f"num_train={config.num_train} plus num_validation={config.num_validation} must be "
            f"at most {pool}, and num_test={config.num_test} at most {len(digits.y_test)}."
        )
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


def init_params(config: DecayConfig):
    """The MLP's initialization (the same for every method)."""
    sizes = [64, *config.hidden, NUM_CLASSES]
    return init_mlp(jax.random.key(config.seed), sizes, jnp.result_type(float))


def cross_entropy(config: DecayConfig, params, x, y) -> jax.Array:
    """Mean softmax cross-entropy of the MLP with the configured activation."""
    logits = mlp_apply(params, x, ACTIVATIONS[config.activation])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_losses(config: DecayConfig, data: Data) -> tuple[Callable, Callable]:
    """The inner loss :math:`g(w, \\theta)` and the outer loss :math:`f(w)`."""

    def inner(params, log_decay):
        penalty = sum(
            jnp.sum(jnp.exp(t) * p**2)
            for t, p in zip(jax.tree.leaves(log_decay), jax.tree.leaves(params), strict=True)
        )
        return cross_entropy(config, params, data.x_train, data.y_train) + 0.5 * penalty

    def outer(params):
        return cross_entropy(config, params, data.x_validation, data.y_validation)

    return inner, outer


def make_diff(method: str, config: DecayConfig, on_failure: str = "warn"):
    """The ``diff`` object of a hypergradient method (``on_failure`` of the implicit ones)."""
    # rtol=None: the warm-started inner steps are a fixed budget. A test relative to the
    # gradient at the warm start, which is already near a solution, would fail while the
    # iterate is fine. How well the adjoint system is solved is still checked and warned about.
    if method == "neumann":
        solver = implicit.Neumann(steps=config.neumann_steps, scale=config.inner_learning_rate)
        return bilevel.Implicit(solver, on_failure=on_failure, rtol=None)
    if method in ("cg", "cg_ridge"):
        ridge = config.cg_ridge if method == "cg_ridge" else 0.0
        solver = implicit.CG(tol=config.cg_tol, maxiter=config.cg_maxiter, ridge=ridge)
        return bilevel.Implicit(solver, on_failure=on_failure, rtol=None)
    if method == "unrolled":
        return bilevel.Unrolled()
    raise ValueError(f"method must be among {HYPERGRADIENT_METHODS}, got method={method!r}.")


def make_training(config: DecayConfig) -> Callable:
    """``train(params, log_decay, data) -> params``: ``inner_steps`` steps of ordinary training.

    The reference of the cost ratio, and (repeated) the baselines' training.
    """

    def train(params, log_decay, data):
        inner, _ = make_losses(config, data)
        params, _ = bilevel.solve(
            inner,
            params,
            log_decay,
            optimizer=optax.sgd(config.inner_learning_rate),
            steps=config.inner_steps,
            diff=bilevel.FirstOrder(),
        )
        return params

    return jax.jit(train)


def make_outer_step(
    method: str, config: DecayConfig, optimizer, on_failure: str = "warn"
) -> Callable:
    """``step(log_decay, outer_state, params, data) -> (log_decay, outer_state, params, loss)``.

    One outer step: ``inner_steps`` warm-started steps from ``params``, the hypergradient of the
    validation loss at their end with respect to the log-decays, and one update of those.
    """
    diff = make_diff(method, config, on_failure)
    inner_optimizer = optax.sgd(config.inner_learning_rate)

    def step(log_decay, outer_state, params, data):
        inner, outer = make_losses(config, data)

        def validation_loss(log_decay):
            solution, _ = bilevel.solve(
                inner,
                params,  # the warm start: a constant, only the decays are differentiated
                log_decay,
                optimizer=inner_optimizer,
                steps=config.inner_steps,
                diff=diff,
            )
            return outer(solution), solution

        (loss, params_out), hypergradient = jax.value_and_grad(validation_loss, has_aux=True)(
            log_decay
        )
        updates, outer_state = optimizer.update(hypergradient, outer_state, log_decay)
        return optax.apply_updates(log_decay, updates), outer_state, params_out, loss

    return jax.jit(step)


def _seconds(compiled: Callable, args: tuple) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def median_seconds(function: Callable, args: tuple, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``function`` (jitted) on ``args``, compiled."""
    compiled = function.lower(*args).compile()
    _seconds(compiled, args)  # the first run outside the timing
    return float(np.median([_seconds(compiled, args) for _ in range(repeats)]))


def paired_cost_ratio(
    step: Callable, step_args: tuple, train: Callable, train_args: tuple, repeats: int
) -> tuple[float, float]:
    """``(median seconds of step, its fastest time over train's fastest)``, both compiled.

    The two are timed alternately, ``repeats`` times each, so that both see the same spells
    of load on a shared machine; the ratio is of the fastest runs, the least disturbed by
    other work (on a busy 2-core machine the medians moved by a factor of 2 between runs).
    """
    step, train = step.lower(*step_args).compile(), train.lower(*train_args).compile()
    _seconds(step, step_args), _seconds(train, train_args)
    pairs = np.array(
        [(_seconds(step, step_args), _seconds(train, train_args)) for _ in range(repeats)]
    )
    return float(np.median(pairs[:, 0])), float(pairs[:, 0].min() / pairs[:, 1].min())


def evaluate(config: DecayConfig, params, data: Data) -> tuple[float, float, float, float]:
    """``(validation loss, test loss, test accuracy, training cross-entropy)`` of a network."""
    logits = mlp_apply(params, data.x_test, ACTIVATIONS[config.activation])
    return (
        float(cross_entropy(config, params, data.x_validation, data.y_validation)),
        float(cross_entropy(config, params, data.x_test, data.y_test)),
        float(jnp.mean(jnp.argmax(logits, axis=-1) == data.y_test)),
        float(cross_entropy(config, params, data.x_train, data.y_train)),
    )


def _constant_decay(params, decay: float):
    # log(0) = -inf, and exp(-inf) = 0 exactly: no decay, with the same inner loss.
    value = np.log(decay) if decay > 0 else -np.inf
    return jax.tree.map(lambda p: jnp.full_like(p, value), params)


def train_fixed(config: DecayConfig, data: Data, decay: float, train: Callable):
    """Ordinary training with one decay for ``outer_steps * inner_steps`` steps."""
    params = init_params(config)
    log_decay = _constant_decay(params, decay)
    for _ in range(config.outer_steps):
        params = train(params, log_decay, data)
    return params


def run_fixed(method, config, data, train, reference) -> MethodResult:
    """The baselines: no decay, or the best global decay of the grid (by validation loss)."""
    grid = (0.0,) if method == "no_decay" else config.decay_grid
    best = None
    for decay in grid:
        params = train_fixed(config, data, decay, train)
        scores = evaluate(config, params, data)
        if best is None or scores[0] < best[0][0]:
            best = (scores, decay)
    (validation_loss, test_loss, test_accuracy, train_loss), decay = best
    return MethodResult(
        validation_loss=validation_loss,
        test_loss=test_loss,
        test_accuracy=test_accuracy,
        train_loss=train_loss,
        step_seconds=reference,
        ratio=1.0 if config.timing_repeats else float("nan"),
        compile_seconds=float("nan"),
        not_converged=0,
        negative_curvature=0,
        median_residual=float("nan"),
        median_iterations=float("nan"),
        decay=decay,
        decays=np.array([decay]),
    )


_RESIDUAL = re.compile(r"relative_residual=([-+0-9.eEinfa]+)")
_ITERATIONS = re.compile(r"iterations=([0-9]+)")


def _count_adjoint_warnings(caught) -> tuple[int, int, float, float]:
    """(not converged, negative curvature, median residual, median iterations) of the adjoint
    solves that warned, from the recorded warnings' messages."""
    not_converged = negative = 0
    residuals, iterations = [], []
    for w in caught:
        if not issubclass(w.category, implicit.ImplicitDifferentiationWarning):
            continue
        text = str(w.message)
        if "negative_curvature=True" in text:
            negative += 1
        else:
            not_converged += 1
        for pattern, found in ((_RESIDUAL, residuals), (_ITERATIONS, iterations)):
            match = pattern.search(text)
            if match:
                found.append(float(match.group(1)))

    def median(values):
        return float(np.median(values)) if values else float("nan")

    return not_converged, negative, median(residuals), median(iterations)


def run_method(method, config, data, train, *, progress=True) -> MethodResult:
    """Tunes the decays with one hypergradient method, jointly with the network's training."""
    optimizer = optax.adam(config.outer_learning_rate)
    params = init_params(config)
    log_decay = _constant_decay(params, config.initial_decay)
    outer_state = optimizer.init(log_decay)
    step = make_outer_step(method, config, optimizer)
    with warnings.catch_warnings(record=True) as caught:
        # Every failed adjoint solve is counted, not only the first from each place.
        warnings.simplefilter("always")
        start = time.perf_counter()
        step = step.lower(log_decay, outer_state, params, data).compile()
        compile_seconds = time.perf_counter() - start
        bar = tqdm(range(config.outer_steps), desc=f"{method:>12}", disable=not progress)
        for _ in bar:
            log_decay, outer_state, params, loss = step(log_decay, outer_state, params, data)
            bar.set_postfix(val_loss=f"{float(loss):.4f}")
    # The cost is timed on the same step compiled with on_failure="ignore", at the end of the
    # run: a failed adjoint solve's warning is a host callback (milliseconds on a CPU), which
    # would otherwise count against the method whose diagnostics report the most.
    step_seconds = ratio = float("nan")
    if config.timing_repeats:
        timed = make_outer_step(method, config, optimizer, on_failure="ignore")
        step_seconds, ratio = paired_cost_ratio(
            timed,
            (log_decay, outer_state, params, data),
            train,
            (params, log_decay, data),
            config.timing_repeats,
        )
    validation_loss, test_loss, test_accuracy, train_loss = evaluate(config, params, data)
    not_converged, negative, residual, iterations = _count_adjoint_warnings(caught)
    return MethodResult(
        validation_loss=validation_loss,
        test_loss=test_loss,
        test_accuracy=test_accuracy,
        train_loss=train_loss,
        step_seconds=step_seconds,
        ratio=ratio,
        compile_seconds=compile_seconds,
        not_converged=not_converged,
        negative_curvature=negative,
        median_residual=residual,
        median_iterations=iterations,
        decay=float("nan"),
        decays=np.exp(np.concatenate([np.ravel(x) for x in jax.tree.leaves(log_decay)])),
    )


def compare(
    config: DecayConfig, methods: Sequence[str] = METHODS, *, progress: bool = True
) -> tuple[dict[str, MethodResult], float]:
    """Every method of ``methods`` on the same data and initialization, in that order.

    Returns the results and the reference: the median seconds of ``inner_steps`` steps of
    ordinary training (compiled). Each method's cost ratio is timed against it in pairs.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got unknown {unknown}.")
    data = load_data(config)
    train = make_training(config)
    params = init_params(config)
    args = (params, _constant_decay(params, config.initial_decay), data)
    reference = float("nan")
    if config.timing_repeats:  # 0: no timing (the tests)
        reference = median_seconds(train, args, config.timing_repeats)
    results = {}
    for method in methods:
        if method in FIXED_METHODS:
            results[method] = run_fixed(method, config, data, train, reference)
        else:
            results[method] = run_method(method, config, data, train, progress=progress)
    return results, reference


def markdown_table(results: dict[str, MethodResult]) -> str:
    """The results as a markdown table (a row per method)."""
    lines = [
        "| method | validation loss | test loss | test accuracy | train loss | decay "
        "| outer step (ms) "
        "| cost ratio | adjoint not converged | negative curvature | residual | iterations |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def number(value, fmt):
        return "-" if np.isnan(value) else format(value, fmt)

    for name, r in results.items():
        if np.isnan(r.decay):
            q = np.quantile(r.decays, [0.1, 0.5, 0.9])
            decay = f"{q[0]:.1e} / {q[1]:.1e} / {q[2]:.1e}"
        else:
            decay = f"{r.decay:g}"
        lines.append(
            f"| {name} | {r.validation_loss:.4f} | {r.test_loss:.4f} | "
            f"{100 * r.test_accuracy:.1f}% | "
            f"{r.train_loss:.4f} | {decay} | {number(1e3 * r.step_seconds, '.2f')} | "
            f"{number(r.ratio, '.2f')} | "
            f"{r.not_converged} | {r.negative_curvature} | {number(r.median_residual, '.2g')} | "
            f"{number(r.median_iterations, '.0f')} |"
        )
    return "\n".join(lines)


BENCHMARK_CONFIG = DecayConfig(outer_steps=40, decay_grid=(1e-3, 3e-3, 1e-2), timing_repeats=10)
BENCHMARK_METHODS = ("neumann", "cg", "unrolled", "no_decay", "global_decay")


def benchmark_row(config: DecayConfig | None = None) -> list[dict[str, str]]:
    """The benchmark suite's rows: the cost ratio and validation loss of each method.

    Runs ``config`` (default :data:`BENCHMARK_CONFIG`, the 64-128-10 MLP for 40 outer steps;
    26 s on the shared 2-core CPU at a load average of 1, about 90 s at a load average of 10)
    with :data:`BENCHMARK_METHODS` and returns one row per hypergradient method, its figures
    formatted.
    """
    config = BENCHMARK_CONFIG if config is None else config
    results, reference = compare(config, BENCHMARK_METHODS, progress=False)
    baseline = results["no_decay"].validation_loss
    best_global = results["global_decay"].validation_loss
    return [
        {
            "application": f"per-parameter weight decay ({num_parameters(config)} decays)",
            "method": method,
            "metric": f"validation loss {r.validation_loss:.4f} (no decay {baseline:.4f}, "
            f"best global decay {best_global:.4f})",
            "time per outer step": f"{1e3 * r.step_seconds:.2f} ms",
            "ratio": f"{r.ratio:.2f}x ordinary training ({1e3 * reference:.2f} ms)",
        }
        for method, r in results.items()
        if method in HYPERGRADIENT_METHODS
    ]


def define_flags() -> None:
    """The script's flags (defined when run as a script, not on import)."""
    d = DecayConfig()
    flags.DEFINE_list("methods", list(METHODS), f"Comma-separated, among {', '.join(METHODS)}.")
    flags.DEFINE_integer("seed", d.seed, "Seed of the split and of the initialization.")
    flags.DEFINE_list(
        "hidden",
        [str(n) for n in d.hidden],
        "Hidden widths of the MLP (64 inputs, 10 classes); 1024,1024 gives 1.1M decays.",
    )
    flags.DEFINE_enum(
        "activation", d.activation, list(ACTIVATIONS), "Nonlinearity of the hidden layers."
    )
    flags.DEFINE_integer("num_train", d.num_train, "Training examples.", lower_bound=1)
    flags.DEFINE_integer("num_validation", d.num_validation, "Validation examples.", lower_bound=1)
    flags.DEFINE_integer("num_test", d.num_test, "Test examples (at most 359).", lower_bound=1)
    flags.DEFINE_float(
        "inner_learning_rate", d.inner_learning_rate, "Inner gradient-descent step.", lower_bound=0
    )
    flags.DEFINE_integer(
        "inner_steps", d.inner_steps, "Warm-started inner steps per outer step.", lower_bound=1
    )
    flags.DEFINE_integer("outer_steps", d.outer_steps, "Outer Adam steps.", lower_bound=1)
    flags.DEFINE_float(
        "outer_learning_rate", d.outer_learning_rate, "Outer Adam learning rate (log-decays)."
    )
    flags.DEFINE_float(
        "initial_decay", d.initial_decay, "Every decay's starting value.", lower_bound=0
    )
    flags.DEFINE_integer(
        "neumann_steps", d.neumann_steps, "Terms of the Neumann series.", lower_bound=1
    )
    flags.DEFINE_integer("cg_maxiter", d.cg_maxiter, "CG's iteration cap.", lower_bound=1)
    flags.DEFINE_float("cg_tol", d.cg_tol, "Relative residual of the CG adjoint solve.")
    flags.DEFINE_float(
        "cg_ridge", d.cg_ridge, "cg_ridge's damping, added to the Hessian.", lower_bound=0
    )
    flags.DEFINE_list(
        "decay_grid", [f"{v:g}" for v in d.decay_grid], "Global decays tried by global_decay."
    )
    flags.DEFINE_integer(
        "timing_repeats",
        d.timing_repeats,
        "Timed pairs of an outer step and ordinary training (0: no timing).",
        lower_bound=0,
    )
    flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # no JAX INFO lines
    values = flags.FLAGS
    unknown = sorted(set(values.methods) - set(METHODS))
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; choose among {', '.join(METHODS)}.")
    try:
        fields = {name: values[name].value for name in DecayConfig._fields}
        fields["hidden"] = tuple(int(n) for n in values.hidden)
        fields["decay_grid"] = tuple(float(v) for v in values.decay_grid)
    except ValueError as error:
        raise app.UsageError(f"--hidden and --decay_grid take numbers: {error}") from error
    config = DecayConfig(**fields)
    if any(n < 1 for n in config.hidden) or not config.decay_grid:
        raise app.UsageError("--hidden widths must be positive and --decay_grid non-empty.")
    sizes = "-".join(str(n) for n in (64, *config.hidden, NUM_CLASSES))
    start = time.perf_counter()
    print(
        f"digits: {config.num_train} train / {config.num_validation} validation / "
        f"{config.num_test} test; MLP {sizes}, {num_parameters(config):,} decays; "
        f"{config.outer_steps} outer Adam steps of {config.inner_steps} warm-started inner "
        f"steps; device: {jax.devices()[0].platform}"
    )
    try:
        results, reference = compare(config, values.methods, progress=values.progress)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    print(
        f"\nOrdinary training: {1e3 * reference:.2f} ms per {config.inner_steps} steps (median, "
        "compiled); cost ratio = outer step / that. decay: the global one, or the 10% / 50% / "
        "90% quantiles of the learned ones.\n"
    )
    print(markdown_table(results))
    print(f"\nTotal wall time (after imports): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)
