r"""A three-level problem: tuning a hyperparameter of meta-learning through meta-training.

Three nested optimizations, each built from :mod:`metaopt` solves, on synthetic linear-regression
tasks (:func:`metaopt.tasks.linear_regression_tasks`: few support points, more dimensions than
points, label noise):

.. math::

   \text{level 1:}\quad & \phi_i(\theta, h) = \mathrm{Adapt}_h(\theta;\ \mathcal{D}^s_i)
   \qquad\text{(each task adapts from the shared initialization } \theta\text{)} \\
   \text{level 2:}\quad & \theta^\star(h) = \arg\min_\theta\ \mathcal{L}_{\mathrm{train}}(\theta, h)
   = \tfrac1T \textstyle\sum_{i \in \mathrm{train}} \ell(\phi_i(\theta, h);\ \mathcal{D}^q_i) \\
   \text{level 3:}\quad & \min_h\ \mathcal{L}_{\mathrm{val}}(\theta^\star(h), h)
   = \tfrac1V \textstyle\sum_{j \in \mathrm{val}} \ell(\phi_j(\theta^\star(h), h);\ \mathcal{D}^q_j)

with :math:`\ell` the half mean squared error. Level 3 tunes one hyperparameter of the
meta-learning problem, through an unconstrained variable :math:`h`, on validation tasks that
meta-training never sees. Two choices of level 1 (``--level1``):

- ``maml``: ``--adapt_steps`` steps of gradient descent with learning rate :math:`\alpha =
  \sigma(h) / L` (MAML; :func:`metaopt.meta.maml_loss`), with :math:`\sigma` the logistic
  sigmoid and :math:`L` the largest support-loss curvature over all tasks: any :math:`h` keeps
  adaptation stable (past :math:`2/L` it diverges, a cliff a gradient step could jump over).
  Differentiated by unrolling (:class:`~metaopt.bilevel.Unrolled`): a few steps, not a
  solution, so the implicit function theorem does not apply; unrolling is exact for the
  iterate actually used, and cheap.
- ``imaml``: the proximal problem :math:`\arg\min_\phi \ell(\phi; \mathcal{D}^s_i) +
  \tfrac{\lambda}{2}\lVert\phi - \theta\rVert^2` with :math:`\lambda = e^h`, solved to a
  tolerance (iMAML; :func:`metaopt.meta.imaml_loss`) and differentiated implicitly.

Level 2 is :func:`metaopt.bilevel.solve` of gradient descent on :math:`\mathcal{L}_{\mathrm{train}}`
to a tolerance, differentiated **implicitly** (:class:`~metaopt.bilevel.Implicit`):
meta-training runs for tens to hundreds of steps, each through every training task's level 1,
and unrolling it would keep all of them in memory; the implicit derivative costs one linear
solve with the level-2 Hessian, whatever the number of steps. That Hessian's products
differentiate the level-1 derivative once more (third derivatives through MAML's unrolled steps;
with iMAML, ``custom_root`` inside ``custom_root``), which JAX does because metaopt's implicit
rule is itself differentiable. The linear systems are small (the dimension), so both levels use
:class:`metaopt.implicit.Dense`.

Level 3 is ``jax.grad`` of the validation meta-loss through both solves and ``--outer_steps``
Adam steps on :math:`h`. By the chain rule the gradient has two parts,
:math:`\partial_h \mathcal{L}_{\mathrm{val}} + \nabla_\theta \mathcal{L}_{\mathrm{val}}
\cdot d\theta^\star/dh`; the script checks the whole against a central finite difference
(each evaluation re-solves both lower levels), and shows that the first part alone (level 2
treated first order, :class:`~metaopt.bilevel.FirstOrder`) is not it (6% to 17% off in the
default runs, against 2e-9 for the full gradient in float64; see ``docs/three-level.md``).

The script prints the level-3 objective (and the loss on fresh test tasks) before and after,
the hyperparameter, the gradient check, the objective at each level-3 step and the time of one
compiled level-3 step. Run it
from the repository root (``pip install "metaopt-jax[examples]"``)::

  python examples/three_level.py                       # MAML's learning rate, about 25 s on a CPU
  python examples/three_level.py --level1=imaml        # iMAML's proximal strength, about 45 s
  python examples/three_level.py --x64                 # float64: a tight gradient check
  python examples/three_level.py --helpfull            # every flag
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from tqdm import tqdm

from metaopt import bilevel, implicit, meta
from metaopt.tasks import Task, linear_regression_tasks

LEVEL1 = ("maml", "imaml")
# The hyperparameter each level 1 has, and where level 3 starts it.
HYPERPARAMETER = {"maml": "inner learning rate alpha", "imaml": "proximal strength lambda"}
PARAMETRIZATION = {"maml": "sigmoid(h) / L", "imaml": "e^h"}
DEFAULT_START = {"maml": 0.01, "imaml": 5.0}


class ThreeLevelConfig(NamedTuple):
    """Everything a run depends on (the script fills it from its flags)."""

    seed: int = 0
    level1: str = "maml"
    dim: int = 8
    shots: int = 5
    query_shots: int = 20
    noise: float = 0.5
    spread: float = 0.5
    train_tasks: int = 8
    validation_tasks: int = 16
    test_tasks: int = 200
    start: float | None = None  # the hyperparameter at the start; None: DEFAULT_START[level1]
    adapt_steps: int = 20  # maml's adaptation steps
    proximal_steps: int = 1000  # imaml's cap on level-1 steps
    adapt_tol: float | None = None  # imaml's level-1 tolerance; None: by dtype
    meta_steps: int = 2000
    meta_learning_rate: float = 1.0
    meta_tol: float | None = None  # level 2's tolerance; None: by dtype
    outer_steps: int = 15
    outer_learning_rate: float = 0.3
    fd_step: float | None = None  # the central difference's step in h; None: by dtype


class Data(NamedTuple):
    """The three task batches (a pytree passed to jitted code) and the level-1 step bound."""

    train: Task
    validation: Task
    test: Task
    curvature: Any  # the largest support-loss Hessian eigenvalue over all tasks (imaml's step)


class GradientCheck(NamedTuple):
    """The level-3 gradient at one h against a central finite difference."""

    h: float
    value: float  # the level-3 objective at h
    gradient: float
    finite_difference: float
    relative_error: float
    first_order_gradient: float  # level 2 treated first order: d theta*/dh = 0
    first_order_relative_error: float


class Results(NamedTuple):
    """What a run measured."""

    config: ThreeLevelConfig
    hyperparameter_before: float  # alpha or lambda
    hyperparameter_after: float
    validation_before: float  # the level-3 objective
    validation_after: float
    test_before: float  # the same meta-loss on fresh tasks
    test_after: float
    check: GradientCheck | None
    gradient_seconds: float  # median of one compiled level-3 step (both solves, gradient)
    compile_seconds: float
    meta_steps: list[int]  # level-2 steps of each level-3 step (warm-started)
    history: list[float]  # the level-3 objective at each level-3 step


def _tolerances(config: ThreeLevelConfig) -> tuple[float, float, float]:
    """(adapt_tol, meta_tol, fd_step): the given ones, or defaults for the float dtype."""
    x64 = _x64()
    adapt_tol = config.adapt_tol or (1e-11 if x64 else 1e-5)
    meta_tol = config.meta_tol or (1e-10 if x64 else 1e-5)
    fd_step = config.fd_step or (1e-4 if x64 else 2e-2)
    return adapt_tol, meta_tol, fd_step


def _x64() -> bool:
    return jnp.result_type(float) == jnp.float64


def _dense() -> implicit.Dense:
    """The adjoint solver of both levels; its residual test at the dtype's round-off."""
    return implicit.Dense(tol=1e-10 if _x64() else 1e-4)


def make_tasks(config: ThreeLevelConfig) -> Data:
    """Training, validation and test tasks from one distribution (seeded)."""
    if config.level1 not in LEVEL1:
        raise ValueError(f"level1 must be one of {LEVEL1}, got level1={config.level1!r}.")
    dtype = jnp.result_type(float)  # float32, or float64 under jax_enable_x64
    center = jnp.linspace(-1.0, 1.0, config.dim, dtype=dtype)
    sizes = (config.train_tasks, config.validation_tasks, config.test_tasks)
    # One batch, split three ways: one compiled sampler instead of one per batch size.
    tasks = linear_regression_tasks(
        jax.random.key(config.seed),
        sum(sizes),
        dim=config.dim,
        shots=config.shots,
        query_shots=config.query_shots,
        noise=config.noise,
        spread=config.spread,
        center=center,
        dtype=dtype,
    )
    tasks = jax.tree.map(np.asarray, tasks)  # sliced in NumPy: no compiled slice per shape
    ends = np.cumsum(sizes)
    train, validation, test = (
        jax.tree.map(lambda x, a=a, b=b: jnp.asarray(x[a:b]), tasks)
        for a, b in zip((0, *ends[:-1]), ends, strict=True)
    )
    x = tasks.support[0].astype(np.float64)
    curvature = float(np.linalg.eigvalsh(np.einsum("tni,tnj->tij", x, x) / config.shots).max())
    return Data(train, validation, test, jnp.asarray(curvature, dtype))


def hyperparameter(config: ThreeLevelConfig, h, curvature) -> jax.Array:
    """Level 1's hyperparameter from the level-3 variable ``h``: ``sigmoid(h) / L`` or ``e^h``."""
    if config.level1 == "maml":
        return jax.nn.sigmoid(h) / curvature
    return jnp.exp(h)


def h_of(config: ThreeLevelConfig, value: float, curvature: float) -> float:
    """The inverse of :func:`hyperparameter`."""
    if config.level1 == "maml":
        if not 0 < value * curvature < 1:
            raise ValueError(
                f"start must be in (0, 1/L) = (0, {1 / curvature:.4g}) for level1='maml' (L: the "
                f"largest support curvature), got start={value!r}."
            )
        return float(np.log(value * curvature) - np.log1p(-value * curvature))
    if not value > 0:
        raise ValueError(f"start must be > 0 for level1='imaml', got start={value!r}.")
    return float(np.log(value))


def task_loss(w: jax.Array, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Half the mean squared error of the linear model ``w`` on ``(inputs, targets)``."""
    x, y = batch
    return 0.5 * jnp.mean((x @ w - y) ** 2)


def meta_loss(config: ThreeLevelConfig, theta, h, tasks: Task, curvature) -> jax.Array:
    """Level 1 on every task of ``tasks`` from ``theta``, averaged query loss (levels 1+2)."""
    if config.level1 == "maml":
        inner = meta.InnerLoop(optax.sgd(hyperparameter(config, h, curvature)), config.adapt_steps)
        return meta.maml_loss(theta, tasks, task_loss, inner)[0]
    adapt_tol, _, _ = _tolerances(config)
    strength = hyperparameter(config, h, curvature)
    # The proximal problem's Hessian has eigenvalues in [lambda, lambda + curvature]: the heavy
    # ball with Polyak's step and momentum for that range converges in about sqrt(condition)
    # times fewer steps than gradient descent. They do not change the solution, so they are not
    # differentiated.
    low, high = jax.lax.stop_gradient((strength, strength + curvature))
    step = 4.0 / (jnp.sqrt(low) + jnp.sqrt(high)) ** 2
    momentum = ((jnp.sqrt(high) - jnp.sqrt(low)) / (jnp.sqrt(high) + jnp.sqrt(low))) ** 2
    optimizer = optax.sgd(step, momentum=momentum)
    inner = meta.InnerLoop(optimizer, steps=config.proximal_steps, tol=adapt_tol)
    return meta.imaml_loss(
        theta, tasks, task_loss, inner, regularization=strength, linear_solver=_dense()
    )[0]


def meta_train(config: ThreeLevelConfig, h, data: Data, init, *, first_order: bool = False):
    """Level 2: meta-training's solution :math:`\\theta^\\star(h)` and its diagnostics."""
    _, meta_tol, _ = _tolerances(config)
    return bilevel.solve(
        lambda theta, h: meta_loss(config, theta, h, data.train, data.curvature),
        init,
        h,
        optimizer=optax.sgd(config.meta_learning_rate),
        steps=config.meta_steps,
        tol=meta_tol,
        diff=bilevel.FirstOrder() if first_order else bilevel.Implicit(_dense()),
    )


def objective(config: ThreeLevelConfig, h, data: Data, init, *, first_order: bool = False):
    """Level 3: the validation meta-loss at :math:`\\theta^\\star(h)`, and ``(theta*, info)``."""
    theta, info = meta_train(config, h, data, init, first_order=first_order)
    return meta_loss(config, theta, h, data.validation, data.curvature), (theta, info)


def _value_and_gradients(config, h, data, init):
    """Value, level-3 gradient, first-order gradient, theta* and level-2 diagnostics."""
    (value, (theta, info)), gradient = jax.value_and_grad(objective, 1, has_aux=True)(
        config, h, data, init
    )
    # Level 2 first order: theta* a constant, only the direct dependence on h is left.
    first_order = jax.grad(meta_loss, 2)(
        config, jax.lax.stop_gradient(theta), h, data.validation, data.curvature
    )
    return value, gradient, first_order, theta, info


value_and_gradients = jax.jit(_value_and_gradients, static_argnums=0)


def gradient_check(config: ThreeLevelConfig, data: Data, h: float, init) -> GradientCheck:
    """The level-3 gradient at ``h`` against a central finite difference of the objective.

    Every evaluation re-solves level 2 (from ``init``) and level 1 to their tolerances.
    """
    _, _, fd_step = _tolerances(config)
    h = jnp.asarray(h, jnp.result_type(float))
    value, gradient, first_order, _, _ = value_and_gradients(config, h, data, init)
    plus = value_and_gradients(config, h + fd_step, data, init)[0]
    minus = value_and_gradients(config, h - fd_step, data, init)[0]
    fd = float(plus - minus) / (2 * fd_step)
    gradient, first_order = float(gradient), float(first_order)
    return GradientCheck(
        h=float(h),
        value=float(value),
        gradient=gradient,
        finite_difference=fd,
        relative_error=abs(gradient - fd) / abs(fd),
        first_order_gradient=first_order,
        first_order_relative_error=abs(first_order - fd) / abs(fd),
    )


test_loss = jax.jit(meta_loss, static_argnums=0)


def run(config: ThreeLevelConfig, *, check_gradient: bool = True, progress: bool = True) -> Results:
    """Tunes ``h`` by ``config.outer_steps`` Adam steps on the level-3 gradient.

    One compiled function (:data:`value_and_gradients`) serves the gradient check, the scores
    and every level-3 step; level 2 is warm-started from the previous step's solution.
    """
    data = make_tasks(config)
    dtype = jnp.result_type(float)
    start = DEFAULT_START[config.level1] if config.start is None else config.start
    h = jnp.asarray(h_of(config, start, float(data.curvature)), dtype)
    theta0 = jnp.zeros(config.dim, dtype)
    begin = time.perf_counter()
    value_and_gradients.lower(config, h, data, theta0).compile()
    compile_seconds = time.perf_counter() - begin

    def score(h):
        """The level-3 objective and the test meta-loss, level 2 solved from zero."""
        value, _, _, theta, _ = value_and_gradients(config, h, data, theta0)
        return float(value), float(test_loss(config, theta, h, data.test, data.curvature))

    check = gradient_check(config, data, float(h), theta0) if check_gradient else None
    validation_before, test_before = score(h)
    optimizer = optax.adam(config.outer_learning_rate)
    opt_state = optimizer.init(h)
    update = jax.jit(optimizer.update)
    theta, seconds, history, meta_steps = theta0, [], [], []
    bar = tqdm(range(config.outer_steps), desc="level 3", disable=not progress)
    for _ in bar:
        begin = time.perf_counter()
        value, gradient, _, theta, info = jax.block_until_ready(
            value_and_gradients(config, h, data, theta)
        )
        seconds.append(time.perf_counter() - begin)
        updates, opt_state = update(gradient, opt_state, h)
        h = optax.apply_updates(h, updates)
        history.append(float(value))
        meta_steps.append(int(info.steps))
        bar.set_postfix(
            objective=f"{float(value):.4f}",
            hparam=f"{float(hyperparameter(config, h, data.curvature)):.4g}",
        )
    validation_after, test_after = score(h)
    return Results(
        config=config,
        hyperparameter_before=float(start),
        hyperparameter_after=float(hyperparameter(config, h, data.curvature)),
        validation_before=validation_before,
        validation_after=validation_after,
        test_before=test_before,
        test_after=test_after,
        check=check,
        gradient_seconds=float(np.median(seconds)) if seconds else float("nan"),
        compile_seconds=compile_seconds,
        meta_steps=meta_steps,
        history=history,
    )


def markdown_table(results: Results) -> str:
    """The before/after table and the gradient check, as markdown."""
    name = HYPERPARAMETER[results.config.level1]
    lines = [
        f"| | {name} | level-3 objective (validation) | test meta-loss |",
        "| --- | ---: | ---: | ---: |",
        f"| before | {results.hyperparameter_before:.4g} | {results.validation_before:.4f} "
        f"| {results.test_before:.4f} |",
        f"| after {len(results.history)} level-3 steps | {results.hyperparameter_after:.4g} "
        f"| {results.validation_after:.4f} | {results.test_after:.4f} |",
    ]
    c = results.check
    if c is not None:
        lines += [
            "",
            "| level-3 gradient at the start | value | relative error against FD |",
            "| --- | ---: | ---: |",
            f"| central finite difference | {c.finite_difference:.6g} | - |",
            f"| through both solves (level 2 implicit) | {c.gradient:.6g} "
            f"| {c.relative_error:.1e} |",
            f"| level 2 first order (d theta*/dh = 0) | {c.first_order_gradient:.6g} "
            f"| {c.first_order_relative_error:.2f} |",
        ]
    return "\n".join(lines)


def benchmark_row(config: ThreeLevelConfig | None = None) -> dict[str, str]:
    """The headline figures of a small run (the benchmark suite's row), formatted."""
    config = ThreeLevelConfig(outer_steps=5) if config is None else config
    r = run(config, progress=False)
    dtype = jnp.dtype(jnp.result_type(float)).name
    return {
        "application": "three-level (meta-learning hyperparameter)",
        "method": f"level 1 {config.level1}, level 2 implicit (Dense), level 3 Adam",
        "top-level gradient (ms)": f"{1e3 * r.gradient_seconds:.1f}",
        "FD relative error": f"{r.check.relative_error:.1e} ({dtype})",
        "level-3 objective": f"{r.validation_before:.4f} -> {r.validation_after:.4f}",
    }


def define_flags() -> None:
    """The script's flags (defined when run as a script, not on import)."""
    d = ThreeLevelConfig()
    flags.DEFINE_enum("level1", d.level1, LEVEL1, "maml (unrolled) or imaml (implicit).")
    flags.DEFINE_integer("seed", d.seed, "Seed of the tasks.")
    flags.DEFINE_integer("dim", d.dim, "Input dimension of the tasks.", lower_bound=1)
    flags.DEFINE_integer("shots", d.shots, "Support points per task.", lower_bound=1)
    flags.DEFINE_integer("query_shots", d.query_shots, "Query points per task.", lower_bound=1)
    flags.DEFINE_float("noise", d.noise, "Label noise.", lower_bound=0)
    flags.DEFINE_float("spread", d.spread, "Spread of the task weights.", lower_bound=0)
    flags.DEFINE_integer("train_tasks", d.train_tasks, "Meta-training tasks.", lower_bound=1)
    flags.DEFINE_integer(
        "validation_tasks", d.validation_tasks, "Tasks of the level-3 objective.", lower_bound=1
    )
    flags.DEFINE_integer("test_tasks", d.test_tasks, "Fresh tasks for scoring.", lower_bound=1)
    flags.DEFINE_float(
        "start",
        None,
        "The hyperparameter at the start; default 0.01 for maml, 5 for imaml.",
        lower_bound=0,
    )
    flags.DEFINE_integer("adapt_steps", d.adapt_steps, "maml's adaptation steps.", lower_bound=1)
    flags.DEFINE_integer(
        "proximal_steps", d.proximal_steps, "imaml's cap on level-1 steps.", lower_bound=1
    )
    flags.DEFINE_float("adapt_tol", None, "imaml's level-1 gradient tolerance (default by dtype).")
    flags.DEFINE_integer("meta_steps", d.meta_steps, "Level-2 step cap.", lower_bound=1)
    flags.DEFINE_float(
        "meta_learning_rate", d.meta_learning_rate, "Level-2 gradient-descent step.", lower_bound=0
    )
    flags.DEFINE_float("meta_tol", None, "Level-2 gradient tolerance (default by dtype).")
    flags.DEFINE_integer("outer_steps", d.outer_steps, "Level-3 Adam steps.", lower_bound=0)
    flags.DEFINE_float(
        "outer_learning_rate", d.outer_learning_rate, "Level-3 Adam step on h.", lower_bound=0
    )
    flags.DEFINE_float("fd_step", None, "Finite-difference step in h (default by dtype).")
    flags.DEFINE_bool("check_gradient", True, "Check the level-3 gradient against FD.")
    flags.DEFINE_bool("x64", False, "Run in float64 (a tight gradient check).")
    flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # no JAX INFO lines
    values = flags.FLAGS
    if values.x64:
        jax.config.update("jax_enable_x64", True)
    config = ThreeLevelConfig(**{name: values[name].value for name in ThreeLevelConfig._fields})
    begin = time.perf_counter()
    print(
        f"level 1: {config.level1} ({HYPERPARAMETER[config.level1]} = "
        f"{PARAMETRIZATION[config.level1]}), level 2: "
        f"meta-training on {config.train_tasks} tasks (implicit), level 3: Adam on h over "
        f"{config.validation_tasks} validation tasks; {config.dim}-dimensional linear tasks, "
        f"{config.shots} shots; {jnp.dtype(jnp.result_type(float)).name} on "
        f"{jax.devices()[0].platform}"
    )
    results = run(config, check_gradient=values.check_gradient, progress=values.progress)
    print()
    print(markdown_table(results))
    if results.history:
        trace = " ".join(f"{v:.3f}" for v in results.history)
        print(f"\nLevel-3 objective before each level-3 step: {trace}")
        print(
            f"One compiled level-3 step (level 2 warm-started, {min(results.meta_steps)} to "
            f"{max(results.meta_steps)} level-2 steps): {1e3 * results.gradient_seconds:.1f} ms "
            f"median (compiled in {results.compile_seconds:.1f} s)."
        )
    print(f"Total wall time (after imports): {time.perf_counter() - begin:.1f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)
