"""Synthetic regression task families for meta-learning: MAML's sinusoids and linear tasks.

A sampler is a pure function of a PRNG key that returns a batch of tasks as one :class:`Task`
whose leaves carry a leading task axis. Sizes (numbers of tasks, shots, dimensions) and the
ranges of the task distribution are static Python values, checked when the sampler is called;
everything that depends on the key is traced, so ``jax.jit`` of a sampler with its sizes fixed
compiles once and draws a fresh batch for every key.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# A dtype instance, not the jnp.float32 class: its repr, dtype('float32'), keeps the rendered
# signature valid Python, which Sphinx needs to parse the other annotations.
_FLOAT32 = jnp.dtype("float32")


class Task(NamedTuple):
    """One task, or a batch of tasks, of a meta-learning problem (a pytree).

    A *batch* of tasks is a ``Task`` whose leaves all carry a leading task axis of the same
    length, which is what every sampler of :mod:`metaopt.tasks` returns. So
    ``jax.vmap(f)(tasks)`` calls ``f`` once per task, on a ``Task`` without that axis, and
    ``jax.tree.map(lambda x: x[i], tasks)`` picks task ``i``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt.tasks import Task, sinusoid_tasks
      >>> tasks = sinusoid_tasks(jax.random.key(0), 8, shots=5)
      >>> isinstance(tasks, Task), tasks.support[0].shape
      (True, (8, 5, 1))
      >>> first = jax.tree.map(lambda x: x[0], tasks)  # task 0, without the task axis
      >>> first.support[0].shape
      (5, 1)
      >>> jax.vmap(lambda task: jnp.mean(task.query[1] ** 2))(tasks).shape  # one value per task
      (8,)

    Attributes:
      support: ``(inputs, targets)`` the learner adapts on (the "training set" of the task).
      query: ``(inputs, targets)`` the adapted learner is evaluated on (the "test set").
      info: the task's ground truth (a pytree of arrays, documented by each sampler), for
        analysis and plots only: a learner must not see it. ``None`` when there is none.
    """

    support: tuple[jax.Array, jax.Array]
    query: tuple[jax.Array, jax.Array]
    info: Any = None


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    """Returns ``value`` as an int after checking that it is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {name}={value!r}. Pass a Python int "
            f"such as {name}={max(minimum, 1) * 5}; sizes fix array shapes and cannot be traced."
        )
    return int(value)


def _check_number(name: str, value: Any, minimum: float | None = None) -> float:
    """Returns ``value`` as a finite float, optionally checking ``value >= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(
            f"{name} must be a finite Python number, got {name}={value!r}. "
            f"Pass a float (the task distribution is static)."
        )
    if minimum is not None and value < minimum:
        raise ValueError(
            f"{name} must be >= {minimum}, got {name}={value!r}. "
            f"Pass a value of at least {minimum}."
        )
    return float(value)


def _check_range(name: str, value: Any, minimum: float | None = None) -> tuple[float, float]:
    """Returns ``value`` as ``(low, high)`` floats with ``minimum <= low <= high``."""
    bound = "" if minimum is None else f"{minimum} <= "
    try:
        low, high = value
        low, high = _check_number(name, low), _check_number(name, high)
        valid = low <= high and (minimum is None or low >= minimum)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            f"{name} must be a pair (low, high) of finite numbers with {bound}low <= high, got "
            f"{name}={value!r}. Pass for example {name}=(0.0, 1.0)."
        )
    return low, high


def _check_float_dtype(dtype: Any) -> Any:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"dtype must be a floating dtype, got dtype={dtype!r}. Use jnp.float32 or jnp.float64."
        )
    return dtype


def sinusoid(x: jax.Array, amplitude: jax.Array, phase: jax.Array) -> jax.Array:
    r"""The sinusoid :math:`y = A \sin(x - \varphi)` of :func:`sinusoid_tasks` (broadcasting).

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.tasks import sinusoid
      >>> print(sinusoid(jnp.array([0.0, 1.5]), 2.0, 1.5))
      [-1.9949... 0.  ]

    Args:
      x: inputs.
      amplitude: the amplitude :math:`A`, broadcast against ``x``.
      phase: the phase :math:`\varphi`, broadcast against ``x``.

    Returns:
      ``amplitude * sin(x - phase)``.
    """
    return amplitude * jnp.sin(x - phase)


def sinusoid_tasks(
    key: jax.Array,
    num_tasks: int,
    *,
    shots: int = 10,
    query_shots: int | None = None,
    amplitude: tuple[float, float] = (0.1, 5.0),
    phase: tuple[float, float] = (0.0, math.pi),
    x_range: tuple[float, float] = (-5.0, 5.0),
    dtype: Any = _FLOAT32,
) -> Task:
    r"""A batch of sinusoid regression tasks, the benchmark of MAML's section 5.1.

    Each task is the function :math:`y = A \sin(x - \varphi)` (see :func:`sinusoid`) with

    .. math::  A \sim \mathcal{U}[a_{\min}, a_{\max}], \quad
               \varphi \sim \mathcal{U}[\varphi_{\min}, \varphi_{\max}], \quad
               x \sim \mathcal{U}[x_{\min}, x_{\max}],

    the inputs drawn independently for the support and the query set, and no noise. The
    defaults are the paper's: :math:`A \in [0.1, 5]`, :math:`\varphi \in [0, \pi]`,
    :math:`x \in [-5, 5]`. The phase enters with a minus sign (the sine is shifted to the right
    by :math:`\varphi`), as in the authors' data generator, ``amp * np.sin(x - phase)``.

    Example:
      >>> import jax
      >>> from metaopt.tasks import sinusoid, sinusoid_tasks
      >>> tasks = sinusoid_tasks(jax.random.key(0), 4, shots=5, query_shots=20)
      >>> (x, y), (x_query, y_query) = tasks.support, tasks.query
      >>> x.shape, y.shape, x_query.shape, tasks.info["amplitude"].shape
      ((4, 5, 1), (4, 5, 1), (4, 20, 1), (4,))
      >>> a, phi = tasks.info["amplitude"][:, None, None], tasks.info["phase"][:, None, None]
      >>> bool((y == sinusoid(x, a, phi)).all())
      True

    References:
      Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
      Networks", ICML 2017, section 5.1.

    Args:
      key: a JAX PRNG key; the same key gives the same tasks.
      num_tasks: number of tasks in the batch (the leading axis of every leaf).
      shots: number of support points per task.
      query_shots: number of query points per task; ``None`` means ``shots``.
      amplitude: range ``(low, high)`` of the amplitude, ``0 <= low <= high``.
      phase: range ``(low, high)`` of the phase, in radians.
      x_range: range ``(low, high)`` of the inputs.
      dtype: floating dtype of the inputs, targets and ground truth.

    Returns:
      A :class:`Task` with support inputs and targets of shape ``(num_tasks, shots, 1)``, query
      inputs and targets of shape ``(num_tasks, query_shots, 1)``, and ``info`` a dict with the
      ``"amplitude"`` and ``"phase"`` of each task, both of shape ``(num_tasks,)``.

    Raises:
      ValueError: if a size is not a positive integer, a range is not ``(low, high)`` with
        ``low <= high`` (and ``low >= 0`` for the amplitude), or ``dtype`` is not floating.
    """
    num_tasks = _check_count("num_tasks", num_tasks)
    shots = _check_count("shots", shots)
    query_shots = shots if query_shots is None else _check_count("query_shots", query_shots)
    amplitude_low, amplitude_high = _check_range("amplitude", amplitude, minimum=0.0)
    phase_low, phase_high = _check_range("phase", phase)
    x_low, x_high = _check_range("x_range", x_range)
    dtype = _check_float_dtype(dtype)

    return _sinusoid_tasks(
        key,
        (amplitude_low, amplitude_high),
        (phase_low, phase_high),
        (x_low, x_high),
        num_tasks=num_tasks,
        shots=shots,
        query_shots=query_shots,
        dtype=dtype,
    )


# The samplers' bodies are compiled, so that a call outside jax.jit runs the same XLA program as
# one inside it and gives the same bits (XLA contracts a multiply and an add into one fused
# operation, which separate eager operations cannot do), and so that eager calls are fast.
_STATIC = ("num_tasks", "shots", "query_shots", "dtype")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sinusoid_tasks(key, amplitude, phase, x_range, *, num_tasks, shots, query_shots, dtype):
    amplitude_key, phase_key, support_key, query_key = jax.random.split(key, 4)
    amplitudes = jax.random.uniform(amplitude_key, (num_tasks,), dtype, *amplitude)
    phases = jax.random.uniform(phase_key, (num_tasks,), dtype, *phase)

    def points(point_key: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
        x = jax.random.uniform(point_key, (num_tasks, count, 1), dtype, *x_range)
        return x, sinusoid(x, amplitudes[:, None, None], phases[:, None, None])

    return Task(
        support=points(support_key, shots),
        query=points(query_key, query_shots),
        info={"amplitude": amplitudes, "phase": phases},
    )


def linear_regression_tasks(
    key: jax.Array,
    num_tasks: int,
    *,
    dim: int = 10,
    shots: int = 10,
    query_shots: int | None = None,
    noise: float = 0.0,
    spread: float = 1.0,
    condition: float = 1.0,
    center: jax.Array | None = None,
    dtype: Any = _FLOAT32,
) -> Task:
    r"""A batch of linear regression tasks whose hardness is set by three numbers.

    Task :math:`t` has ground-truth weights :math:`w_t` and draws its support and query points
    independently:

    .. math::  w_t = c + \sigma_w\, z_t, \quad z_t \sim \mathcal{N}(0, I_d), \qquad
               x \sim \mathcal{N}(0, \mathrm{diag}(s)), \quad
               y = x^\top w_t + \sigma_\epsilon\, \epsilon, \quad \epsilon \sim \mathcal{N}(0, 1),

    with :math:`s_i = \kappa^{-i/(d-1)}`, :math:`i = 0, \dots, d-1`, geometrically spaced from 1
    down to :math:`1/\kappa`. ``spread`` (:math:`\sigma_w`) sets how far tasks lie from each
    other and from the centre :math:`c`, ``condition`` (:math:`\kappa`) is the condition number
    of the input covariance, which is also that of each task's least-squares Hessian (larger
    is harder for a few steps of gradient descent), and ``noise`` (:math:`\sigma_\epsilon`) is
    the label noise, the loss no adaptation can remove. This is the kind of task landscape in
    which Collins et al. compare average-case and worst-case (task-robust) meta-learning.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt.tasks import linear_regression_tasks
      >>> tasks = linear_regression_tasks(jax.random.key(0), 8, dim=3, shots=5, condition=10.0)
      >>> (x, y), w = tasks.support, tasks.info["weights"]
      >>> x.shape, y.shape, w.shape
      ((8, 5, 3), (8, 5), (8, 3))
      >>> bool(jnp.allclose(y, jnp.einsum("tnd,td->tn", x, w), atol=1e-5))
      True

    References:
      Collins, Mokhtari and Shakkottai, "Task-Robust Model-Agnostic Meta-Learning", NeurIPS
      2020.

    Args:
      key: a JAX PRNG key; the same key gives the same tasks.
      num_tasks: number of tasks in the batch (the leading axis of every leaf).
      dim: input dimension :math:`d`.
      shots: number of support points per task.
      query_shots: number of query points per task; ``None`` means ``shots``.
      noise: standard deviation :math:`\sigma_\epsilon \ge 0` of the label noise.
      spread: standard deviation :math:`\sigma_w \ge 0` of the weights around ``center``.
      condition: condition number :math:`\kappa \ge 1` of the input covariance; it must be 1
        when ``dim`` is 1.
      center: mean :math:`c` of the weights, a scalar or an array of shape ``(dim,)`` (it may
        be traced); ``None`` means zero.
      dtype: floating dtype of the inputs, targets and weights.

    Returns:
      A :class:`Task` with support inputs of shape ``(num_tasks, shots, dim)`` and targets of
      shape ``(num_tasks, shots)`` (scalar targets, no trailing axis), the query likewise with
      ``query_shots``, and ``info`` a dict with the ``"weights"`` :math:`w_t`, of shape
      ``(num_tasks, dim)``.

    Raises:
      ValueError: if a size is not a positive integer, ``noise`` or ``spread`` is negative,
        ``condition`` is below 1 (or not 1 with ``dim=1``), ``center`` has the wrong shape, or
        ``dtype`` is not floating.
    """
    num_tasks = _check_count("num_tasks", num_tasks)
    dim = _check_count("dim", dim)
    shots = _check_count("shots", shots)
    query_shots = shots if query_shots is None else _check_count("query_shots", query_shots)
    noise = _check_number("noise", noise, minimum=0.0)
    spread = _check_number("spread", spread, minimum=0.0)
    condition = _check_number("condition", condition, minimum=1.0)
    if dim == 1 and condition != 1.0:
        raise ValueError(
            f"condition must be 1 when dim=1 (one input variance has condition number 1), got "
            f"condition={condition!r}. Use dim >= 2 for an ill-conditioned input covariance."
        )
    dtype = _check_float_dtype(dtype)
    if center is None:
        center = jnp.zeros((dim,), dtype)
    elif jnp.shape(center) not in ((), (dim,)):
        raise ValueError(
            f"center must be a scalar or an array of shape (dim,) = ({dim},), got an array of "
            f"shape {jnp.shape(center)}. Pass one weight vector shared by all tasks."
        )
    center = jnp.asarray(center, dtype)

    return _linear_regression_tasks(
        key,
        center,
        spread,
        noise,
        condition,
        num_tasks=num_tasks,
        dim=dim,
        shots=shots,
        query_shots=query_shots,
        dtype=dtype,
    )


@functools.partial(jax.jit, static_argnames=(*_STATIC, "dim"))
def _linear_regression_tasks(
    key, center, spread, noise, condition, *, num_tasks, dim, shots, query_shots, dtype
):
    exponents = jnp.arange(dim, dtype=dtype) / max(dim - 1, 1)
    scales = jnp.asarray(condition, dtype) ** (-exponents / 2)  # standard deviations sqrt(s_i)

    weight_key, support_key, query_key = jax.random.split(key, 3)
    weights = center + spread * jax.random.normal(weight_key, (num_tasks, dim), dtype)

    def points(point_key: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
        input_key, noise_key = jax.random.split(point_key)
        x = scales * jax.random.normal(input_key, (num_tasks, count, dim), dtype)
        y = jnp.einsum("tnd,td->tn", x, weights)
        return x, y + noise * jax.random.normal(noise_key, (num_tasks, count), dtype)

    return Task(
        support=points(support_key, shots),
        query=points(query_key, query_shots),
        info={"weights": weights},
    )
