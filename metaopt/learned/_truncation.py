"""Truncated unrolls of an inner training run: the pieces the meta-gradient estimators share.

An :class:`InnerProblem` is one inner training run written as pure functions; the estimators in
:mod:`metaopt.learned._estimators` run it in windows of a few steps, carry its state from one
window to the next, and restart it when it reaches its horizon or produces a non-finite number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

_OBJECTIVES = ("log", "mean")


@dataclasses.dataclass(frozen=True)
class InnerProblem:
    """One inner training run, as pure functions of the meta-parameters ``theta``.

    ``init(key)`` builds the inner state of a fresh task (for a learned optimizer: a sampled
    task's parameters, optimizer state and data stream), ``step(theta, state, key)`` takes one
    inner step with the meta-parameters ``theta`` and returns the next state and the loss of
    that step (a scalar), and after ``horizon`` steps the task ends and a fresh one starts.
    ``step`` must keep the state's structure, shapes and dtypes (it is the body of a
    ``lax.scan``). Both functions are traced, never called eagerly per task.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt import learned
      >>> def step(log_lr, x, key):  # gradient descent on 0.5 * x^2 with a learned step size
      ...     x = x - jnp.exp(log_lr) * x
      ...     return x, 0.5 * x**2
      >>> problem = learned.InnerProblem(init=lambda key: jnp.array(1.0), step=step, horizon=20)
      >>> problem.horizon
      20

    Attributes:
      init: ``key -> state`` of a fresh task.
      step: ``(theta, state, key) -> (next_state, loss)``, with ``loss`` a scalar.
      horizon: inner steps of one task; after them the task restarts fresh.
    """

    init: Callable[[jax.Array], Any]
    step: Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]
    horizon: int

    def __post_init__(self):
        for name in ("init", "step"):
            value = getattr(self, name)
            if not callable(value):
                raise TypeError(
                    f"InnerProblem.{name} must be a function, got {name}={value!r}; pass "
                    f"init=lambda key: state and step=lambda theta, state, key: (state, loss)."
                )
        if not _is_int(self.horizon) or self.horizon < 1:
            raise ValueError(
                f"InnerProblem.horizon must be a positive int (inner steps of one task), got "
                f"horizon={self.horizon!r}."
            )


class EstimatorInfo(NamedTuple):
    """What one meta-gradient estimate saw; scalars.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt import learned
      >>> def step(log_lr, x, key):  # gradient descent on 0.5 * x^2
      ...     x = x - jnp.exp(log_lr) * x
      ...     return x, 0.5 * x**2
      >>> problem = learned.InnerProblem(lambda key: jnp.array(1.0), step, horizon=20)
      >>> estimator = learned.TruncatedBackprop(problem, 5)  # objective="log"
      >>> theta = jnp.array(0.0)  # step size 1: the loss is 0 after one step, its log -inf
      >>> state = estimator.init(theta, jax.random.key(0), num_tasks=4)
      >>> grad, state, info = estimator.gradient(theta, state, jax.random.key(1))
      >>> float(info.meta_loss), int(info.num_nonfinite), int(info.num_restarted), float(grad)
      (nan, 4, 4, 0.0)
      >>> state.step.tolist()  # every task starts afresh
      [0, 0, 0, 0]

    Attributes:
      meta_loss: the mean window meta-loss over the tasks whose window stayed finite (for
        :class:`~metaopt.learned.PES`, the mean of its two particles'); NaN if none did.
      num_nonfinite: tasks whose window produced a non-finite loss, state or estimate; they
        are left out of the meta-gradient and restarted.
      num_restarted: tasks restarted after this window: those that reached the problem's
        horizon and the non-finite ones.
    """

    meta_loss: jax.Array
    num_nonfinite: jax.Array
    num_restarted: jax.Array


class UnrollState(NamedTuple):
    """Carried state of :class:`~metaopt.learned.TruncatedBackprop` and
    :class:`~metaopt.learned.AntitheticES`; every leaf has a leading task axis.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt import learned
      >>> step = lambda log_lr, x, key: (x - jnp.exp(log_lr) * x, 0.5 * x**2)
      >>> problem = learned.InnerProblem(lambda key: jnp.array(1.0), step, horizon=20)
      >>> estimator = learned.TruncatedBackprop(problem, 5)
      >>> state = estimator.init(jnp.log(0.1), jax.random.key(0), num_tasks=3)
      >>> state.inner.shape, state.step.dtype
      ((3,), dtype('int32'))
      >>> bool(jnp.all(state.step % 5 == 0))  # staggered on window boundaries
      True

    Attributes:
      inner: the tasks' inner states (the problem's state with a leading task axis).
      step: int32 of shape ``(num_tasks,)``: inner steps each task has taken since it started.
    """

    inner: Any
    step: jax.Array


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_configuration(problem: Any, truncation_length: Any, objective: Any) -> None:
    """Raises for a configuration no estimator accepts, naming the argument and the fix."""
    if not isinstance(problem, InnerProblem):
        raise TypeError(
            f"problem must be a metaopt.learned.InnerProblem(init=..., step=..., horizon=...), "
            f"got problem={problem!r}."
        )
    if not _is_int(truncation_length) or truncation_length < 1:
        raise ValueError(
            f"truncation_length must be a positive int (inner steps per meta-gradient), got "
            f"truncation_length={truncation_length!r}."
        )
    if problem.horizon % truncation_length:
        divisors = [d for d in range(1, problem.horizon + 1) if problem.horizon % d == 0]
        raise ValueError(
            f"truncation_length={truncation_length} does not divide the problem's "
            f"horizon={problem.horizon}: windows must not straddle a task's restart. Use a "
            f"divisor of the horizon (one of {divisors}) or change the horizon."
        )
    if objective not in _OBJECTIVES:
        raise ValueError(
            f"objective must be 'log' (mean log training loss, the literature's choice) or "
            f"'mean' (mean training loss), got objective={objective!r}."
        )


def check_std(std: Any) -> None:
    if isinstance(std, bool) or not isinstance(std, int | float | np.floating | np.integer):
        raise TypeError(f"std must be a positive float, got std={std!r}.")
    if not (np.isfinite(std) and std > 0):
        raise ValueError(
            f"std must be a positive finite float (the perturbation's standard deviation), got "
            f"std={std!r}; try 0.01."
        )


def check_num_tasks(num_tasks: Any) -> None:
    if not _is_int(num_tasks) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got num_tasks={num_tasks!r}.")


def fresh_tasks(problem: InnerProblem, key: jax.Array, num_tasks: int) -> Any:
    """Inner states of ``num_tasks`` fresh tasks, stacked on a leading axis."""
    return jax.vmap(problem.init)(jax.random.split(key, num_tasks))


def initial_steps(
    problem: InnerProblem, truncation_length: int, key: jax.Array, num_tasks: int, stagger: bool
) -> jax.Array:
    """Each task's starting step: 0, or a random multiple of the window (``stagger``)."""
    if not stagger:
        return jnp.zeros(num_tasks, jnp.int32)
    windows = problem.horizon // truncation_length
    return truncation_length * jax.random.randint(key, (num_tasks,), 0, windows, jnp.int32)


def all_finite(tree: Any) -> jax.Array:
    """True if every inexact entry of ``tree`` is finite (integer leaves always are)."""
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def window(
    problem: InnerProblem,
    truncation_length: int,
    objective: str,
    theta: Any,
    inner: Any,
    key: jax.Array,
) -> tuple[jax.Array, tuple[Any, jax.Array]]:
    r"""The window meta-loss :math:`\frac1T\sum_{t<T}\phi(L_t)` of one task, from ``inner``.

    Returns ``(meta_loss, (inner_after, finite))`` (the ``has_aux`` form of ``jax.grad``);
    ``finite`` says every loss and the final state are finite. Step ``t`` of the window gets
    the key ``fold_in(key, t)``, so two calls with one key see the same data.
    """
    phi = jnp.log if objective == "log" else (lambda loss: loss)

    def body(state, t):
        state, loss = problem.step(theta, state, jax.random.fold_in(key, t))
        if jnp.shape(loss) != ():
            raise ValueError(
                f"InnerProblem.step must return (state, loss) with a scalar loss, got a loss of "
                f"shape {jnp.shape(loss)}; reduce it (for example with jnp.mean)."
            )
        return state, phi(loss)

    inner, values = jax.lax.scan(body, inner, jnp.arange(truncation_length))
    meta_loss = jnp.mean(values)
    return meta_loss, (inner, jnp.all(jnp.isfinite(values)) & all_finite(inner))


def _task_mask(mask: jax.Array, x: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (jnp.ndim(x) - 1))


def task_keys(key: jax.Array, num_tasks: int) -> jax.Array:
    """Keys of shape ``(num_tasks, 3)``: per task, its window's key, its perturbation's key and
    its restart's key (one split, so one hash on the device)."""
    return jax.random.split(key, (num_tasks, 3))


def restart(
    problem: InnerProblem,
    keys: jax.Array,
    inner: Any,
    step: jax.Array,
    truncation_length: int,
    finite: jax.Array,
) -> tuple[Any, jax.Array, jax.Array]:
    """Advances the step counters; tasks at the horizon or non-finite start fresh.

    A restarted task's inner state is ``problem.init(keys[i])``, its step 0. Returns ``(inner,
    step, restarted)``, with ``restarted`` the boolean mask of the tasks replaced.
    """
    step = step + truncation_length
    restarted = (step >= problem.horizon) | ~finite
    fresh = jax.vmap(problem.init)(keys)
    inner = jax.tree.map(lambda f, c: jnp.where(_task_mask(restarted, c), f, c), fresh, inner)
    return inner, jnp.where(restarted, 0, step), restarted


def mean_over_finite(values: Any, finite: jax.Array) -> Any:
    """Mean over the task axis of the tasks where ``finite``; zero if there is none.

    A select, never ``finite * value``: an excluded task's NaN times 0 would still be NaN.
    """
    count = jnp.maximum(jnp.sum(finite), 1)

    def mean(x):
        return jnp.sum(jnp.where(_task_mask(finite, x), x, 0), axis=0) / count.astype(x.dtype)

    return jax.tree.map(mean, values)


def summarize(meta_loss: jax.Array, finite: jax.Array, restarted: jax.Array) -> EstimatorInfo:
    """The :class:`EstimatorInfo` of one window over all tasks."""
    any_finite = jnp.any(finite)
    loss = jnp.where(any_finite, mean_over_finite(meta_loss, finite), jnp.nan)
    return EstimatorInfo(
        meta_loss=loss,
        num_nonfinite=jnp.sum(~finite, dtype=jnp.int32),
        num_restarted=jnp.sum(restarted, dtype=jnp.int32),
    )


def perturbation(key: jax.Array, theta: Any, std: float) -> Any:
    """A Gaussian perturbation ``N(0, std^2 I)`` with the structure and dtypes of ``theta``."""
    for leaf in jax.tree.leaves(theta):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"evolution strategies perturb every leaf of theta, which must be floating "
                f"point; got a leaf of dtype {dtype} and shape {jnp.shape(leaf)}."
            )
    flat, unravel = ravel_pytree(theta)  # one draw for all leaves, cast back to their dtypes
    return unravel(std * jax.random.normal(key, flat.shape, flat.dtype))


def num_tasks_of(step: jax.Array) -> int:
    return step.shape[0]
