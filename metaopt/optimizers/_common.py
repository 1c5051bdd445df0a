"""Helpers shared by the optimizer modules: hyperparameter handling, checks, safe norms."""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


def value_at(hyperparameter: ScalarOrSchedule, count: jax.Array) -> Any:
    """Returns a hyperparameter's value at step ``count``: calls it if it is a schedule."""
    return hyperparameter(count) if callable(hyperparameter) else hyperparameter


def _concrete(value: Any) -> float | None:
    """The value as a Python float when it is known at construction time, else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray | np.generic) and np.ndim(value) == 0:
        return float(value)
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
        if value.ndim == 0:
            return float(value)
    return None


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    high_inclusive: bool = False,
    fix: str = "",
) -> None:
    """Raises ValueError when a concrete ``value`` lies outside ``[low, high)`` (or ``]``).

    Traced arrays and schedules are not checked here: their values are only known at run time.
    """
    v = _concrete(value)
    if v is None:
        return
    ok = low <= v <= high if high_inclusive else low <= v < high
    if not ok or np.isnan(v):
        bracket = "]" if high_inclusive else ")"
        hint = f" {fix}" if fix else ""
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {name}={value!r}.{hint}")


def check_nonnegative(name: str, value: Any, fix: str = "") -> None:
    """Raises ValueError when a concrete ``value`` is negative or NaN."""
    check_range(name, value, 0.0, float("inf"), high_inclusive=True, fix=fix)


def check_positive(name: str, value: Any, fix: str = "") -> None:
    """Raises ValueError when a concrete ``value`` is not strictly positive."""
    v = _concrete(value)
    if v is not None and not v > 0:
        hint = f" {fix}" if fix else ""
        raise ValueError(f"{name} must be positive, got {name}={value!r}.{hint}")


def check_steps(name: str, value: Any) -> None:
    """Raises when ``value`` is neither None nor a positive whole number of steps.

    A traced array (for example injected by ``optax.inject_hyperparams``) is accepted unchecked.
    """
    if value is None:
        return
    v = _concrete(value)
    if (
        isinstance(value, bool)
        or (v is not None and (v < 1 or v != int(v)))
        or (v is None and not isinstance(value, jax.Array))
    ):
        raise ValueError(
            f"{name} must be None or a positive integer number of steps, got {name}={value!r}. "
            f"Pass None to switch the warm-up off."
        )


def global_norm(tree: Any) -> jax.Array:
    """Euclidean norm of all leaves of ``tree`` together, with a finite derivative at zero.

    ``jnp.sqrt`` has an infinite derivative at 0, so the plain norm gives NaN when
    differentiated at a zero gradient; here the derivative there is zero instead.
    """
    leaves = jax.tree.leaves(tree)
    squared = sum(
        jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))) for x in leaves
    )
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


@jax.custom_jvp
def safe_sqrt(x: jax.Array) -> jax.Array:
    """``jnp.sqrt`` whose derivatives are finite at 0, for second moments.

    The second moment of an optimizer is zero only while every gradient seen so far was zero,
    and then its derivative is zero too; the true product ``0 * inf`` is taken as 0, where
    ``jnp.sqrt`` gives NaN. This keeps Adam-type updates differentiable twice (meta-gradients
    through an inner loop) without an ``eps_root``. Values are exactly ``jnp.sqrt``'s.
    """
    return jnp.sqrt(x)


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = safe_sqrt(x)
    positive = x > 0
    return y, jnp.where(positive, 0.5 * x_dot / jnp.where(positive, y, 1.0), 0.0)


def safe_divide(tree: Any, norm: jax.Array) -> Any:
    """``tree / norm`` leaf by leaf; zeros where ``norm`` is zero (no NaN, also in gradients)."""
    positive = norm > 0
    inverse = jnp.where(positive, 1.0 / jnp.where(positive, norm, 1.0), 0.0)
    return jax.tree.map(lambda x: x * inverse.astype(x.dtype), tree)


def add_scaled(params: Any, direction: Any, scale: Any = 1.0) -> Any:
    """``params + scale * direction`` leaf by leaf, keeping each parameter's dtype."""
    return jax.tree.map(
        lambda p, d: (p + jnp.asarray(scale).astype(d.dtype) * d).astype(p.dtype), params, direction
    )


def mean_over_axis(tree: Any, axis_name: str | None) -> Any:
    """Averages ``tree`` over the named mesh axis (data-parallel replicas); identity for None."""
    if axis_name is None:
        return tree
    return jax.lax.pmean(tree, axis_name)


def cast_like(tree: Any, like: Any) -> Any:
    """Casts every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
    return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def require_grad_fn(algorithm: str, grad_fn: Any, params: Any) -> None:
    """Raises a TypeError that explains the calling convention when grad_fn or params is missing."""
    if grad_fn is None:
        raise TypeError(
            f"{algorithm}.update needs the keyword argument grad_fn: a function that maps "
            f"parameters to the gradient of the loss on the current batch, for example "
            f"update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))."
        )
    if params is None:
        raise ValueError(
            f"{algorithm}.update needs params (the current parameters) to place the perturbed "
            f"point; call update(grads, state, params, grad_fn=...)."
        )


def increment(count: jax.Array) -> jax.Array:
    """Adds one to an int32 step counter without overflowing."""
    return optax.safe_int32_increment(count)


# Two problems of XLA:CPU (jaxlib 0.10) on programs with eigendecompositions, as Shampoo's and
# SOAP's root steps are. (1) Batched LAPACK calls (eigh, qr of a stack of blocks) spread the batch
# over XLA's intra-op threads and wait for it; two in flight at once can wait on each other
# forever. metaopt computes the roots one block at a time on a single CPU device, which never
# queues work (see _matrix_root.sequential_by_default); with several CPU devices the blocks stay
# batched, and turning off XLA's concurrency-optimized scheduler (this flag) makes the deadlock
# rare. (2) LAPACK runs on OpenBLAS, whose threads spin while waiting and, on a busy machine, made
# steps 40 to 200 times slower; one OpenBLAS thread avoids it.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def prepare_cpu_environment() -> None:
    """Sets the environment that Shampoo and SOAP want on the CPU backend (jaxlib 0.10).

    Sets ``OPENBLAS_NUM_THREADS=1`` unless it is set (OpenBLAS's spinning threads made root steps
    40 to 200 times slower on a busy machine) and appends
    ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` to ``XLA_FLAGS``, which matters
    with several CPU devices (``--xla_force_host_platform_device_count``): there the blocks'
    eigendecompositions run as batches, and two batches in flight at once can deadlock in
    jaxlib's LAPACK loop; the flag made that rare (no hang in our stress runs of small problems,
    one in the benchmark's 64-block MLP before metaopt stopped batching on one device). On a
    single CPU device metaopt computes the blocks one at a time, which cannot deadlock. Call it
    after importing metaopt and before the first JAX computation; it changes nothing that is
    already set, and has no effect once the CPU backend has started. On GPU and TPU it is
    harmless and unnecessary.

    Example:
      >>> import metaopt
      >>> metaopt.prepare_cpu_environment()  # first thing in a script that trains on CPU
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_SCHEDULER_FLAG.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def warn_if_cpu_may_deadlock(algorithm: str) -> None:
    """Warns on XLA:CPU when :func:`prepare_cpu_environment`'s settings are missing and matter."""
    if jax.default_backend() != "cpu":
        return
    missing = []
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        missing.append(
            "OPENBLAS_NUM_THREADS=1 (OpenBLAS's threads can slow root steps 40 to 200 "
            "times on a busy machine)"
        )
    several = jax.device_count() > 1
    if several and CPU_SCHEDULER_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        missing.append(
            f"XLA_FLAGS={CPU_SCHEDULER_FLAG} (with {jax.device_count()} CPU devices "
            f"the blocks' eigendecompositions run batched, which can deadlock)"
        )
    if not missing:
        return
    warnings.warn(
        f"{algorithm} on the CPU backend without {' and '.join(missing)}. Call "
        f"metaopt.prepare_cpu_environment() before the first JAX computation (see the Shampoo "
        f"guide, 'Known problems on CPU').",
        RuntimeWarning,
        stacklevel=3,
    )
