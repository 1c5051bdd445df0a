"""Helpers shared by the optimizer modules: hyperparameter handling, checks, safe norms."""

from __future__ import annotations

import functools
import numbers
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.optimizers._tree_checks import check_matching

# A hyperparameter: a float, a (possibly traced) array, or a schedule of the step count.
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


def _is_number_like(value: Any) -> bool:
    """True for a real number, a real-valued array (concrete or traced) or a schedule."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Real):
        return True
    if isinstance(value, np.ndarray | np.generic):
        return value.dtype.kind in "iuf"
    if isinstance(value, jax.Array):  # concrete arrays and tracers alike
        return bool(
            jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)
        )
    return callable(value) and not isinstance(value, type)


def check_number(
    name: str, value: Any, *, optional: bool = False, integer: bool = False, fix: str = ""
) -> None:
    """Raises TypeError unless ``value`` is a real number, a real array or a schedule.

    Accepted: Python ``int``/``float``, NumPy and JAX scalars and arrays of integer or floating
    dtype (traced ones included, as ``optax.inject_hyperparams`` and ``jax.grad`` pass them) and
    callables (schedules of the step count). Rejected with a message that names the argument:
    strings, ``bool``, complex numbers, ``None`` (unless ``optional``) and anything else, which
    would otherwise only fail at the first update with an error that does not name it.
    ``integer`` only words the message for whole-number arguments (step counts, sizes), whose
    values are checked by their own functions.
    """
    if value is None and optional:
        return
    if _is_number_like(value):
        return
    hint = ""
    if isinstance(value, str):
        for parse in (int, float):
            try:
                hint = f" Pass the number itself, {name}={parse(value)!r}, not a string."
                break
            except ValueError:
                hint = " Pass a number, not a string."
    elif isinstance(value, bool):
        hint = " A bool is not a valid value here; pass a number."
    elif value is None:
        hint = " None is not allowed for this argument; pass a number."
    extra = f" {fix}" if fix else ""
    expected = (
        "a whole number"
        if integer
        else "a real number, a real-valued array or a schedule (a function of the step count)"
    )
    raise TypeError(
        f"{name} must be {expected}, got {name}={value!r} of type {type(value).__name__}."
        f"{hint}{extra}"
    )


def check_number_or_numbers(name: str, value: Any) -> None:
    """Like :func:`check_number` (None allowed) for whole-number arguments that may also be a
    sequence (Shampoo's ``exponent_override``)."""
    if isinstance(value, list | tuple):
        for entry in value:
            check_number(name, entry, integer=True)
    else:
        check_number(name, value, optional=True, integer=True)


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

    Raises TypeError (see :func:`check_number`) when ``value`` is not a number, an array or a
    schedule. Traced arrays and schedules are not range-checked here: their values are only
    known at run time.
    """
    check_number(name, value, fix=fix)
    v = _concrete(value)
    if v is None:
        return
    ok = low <= v <= high if high_inclusive else low <= v < high
    if not ok or np.isnan(v):
        bracket = "]" if high_inclusive else ")"
        hint = f" {fix}" if fix else ""
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {name}={value!r}.{hint}")


def check_nonnegative(name: str, value: Any, fix: str = "") -> None:
    """Raises ValueError when a concrete ``value`` is negative, infinite or NaN.

    Raises TypeError when it is not a number, an array or a schedule (see :func:`check_number`).
    """
    check_number(name, value, fix=fix)
    v = _concrete(value)
    if v is not None and not 0.0 <= v < float("inf"):
        hint = f" {fix}" if fix else ""
        raise ValueError(f"{name} must be finite and >= 0, got {name}={value!r}.{hint}")


def check_positive(name: str, value: Any, fix: str = "") -> None:
    """Raises ValueError when a concrete ``value`` is not strictly positive and finite.

    Raises TypeError when it is not a number, an array or a schedule (see :func:`check_number`).
    """
    check_number(name, value, fix=fix)
    v = _concrete(value)
    if v is not None and not 0.0 < v < float("inf"):
        hint = f" {fix}" if fix else ""
        raise ValueError(f"{name} must be finite and > 0, got {name}={value!r}.{hint}")


def check_transform(name: str, value: Any) -> None:
    """Raises TypeError unless ``value`` is an optax transform (has ``init`` and ``update``)."""
    if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
        return
    instead = f", not {value!r}" if isinstance(value, str) else ""
    raise TypeError(
        f"{name} must be an optax GradientTransformation, got {name}={value!r} of type "
        f"{type(value).__name__}. Pass the optimizer itself, for example "
        f"{name}=optax.adam(1e-3){instead}."
    )


def check_steps(name: str, value: Any) -> None:
    """Raises when ``value`` is neither None nor a positive whole number of steps.

    A traced array (for example injected by ``optax.inject_hyperparams``) is accepted unchecked.
    """
    if value is None:
        return
    if isinstance(value, str) or callable(value):
        raise TypeError(
            f"{name} must be None or a positive integer number of steps, got {name}={value!r} "
            f"of type {type(value).__name__}."
        )
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
    differentiated at a zero gradient; here the derivative there is zero instead
    (:func:`safe_sqrt`). A NaN in any leaf gives a NaN norm and an infinity an infinite one: the
    norm is a diagnostic, and a non-finite gradient must show in it. Leaves are summed in at
    least float32, after division by the largest magnitude, so the squares of large finite
    entries do not overflow (float32 squares overflow above about 1.8e19).
    """
    leaves = [x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros([], jnp.float32)
    # The scale is a constant for differentiation: the norm does not depend on it.
    scale = jax.lax.stop_gradient(
        functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), initial=0.0) for x in leaves])
    )
    safe_scale = jnp.where((scale > 0) & (scale < jnp.inf), scale, 1.0)
    squared = sum(jnp.sum(jnp.square(x / safe_scale.astype(x.dtype))) for x in leaves)
    return jnp.where(scale == jnp.inf, scale, safe_scale * safe_sqrt(squared))


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


def _is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _checked_gradient_function(grad_fn: Any) -> Any:
    def checked(point: Any) -> Any:
        gradient = grad_fn(point)
        check_matching(
            "grad_fn(params)",
            gradient,
            "params",
            point,
            hint="grad_fn must return the gradient as a tree shaped like its argument; for a "
            "flax NNX module, build it with metaopt.nnx_grad_fn(model, loss_fn, *batch)",
        )
        return gradient

    return checked


def gradient_function(
    algorithm: str, grad_fn: Any, updates: Any, params: Any, all_params: Any
) -> Any:
    """The function a sharpness-aware transform evaluates gradients with.

    First checks that ``updates`` match ``params`` leaf by leaf (a ValueError naming the leaf
    and both shapes; a mismatched shape could otherwise broadcast silently).

    Outside ``optax.masked`` and ``optax.multi_transform`` it is ``grad_fn`` itself, with a
    trace-time check that what it returns is shaped like its argument (a ``grad_fn`` built with
    ``nnx.grad`` returns ``nnx.Param`` variables, which would otherwise fail deep inside the
    update). Inside, the transform sees only its part of the parameters (``optax.MaskedNode``
    elsewhere), while ``grad_fn`` needs the whole tree: the returned function puts the
    (perturbed) visible part into ``all_params``, calls ``grad_fn`` there and keeps the visible
    part of the gradient, so the parameters outside the mask stay at their current values and
    are not perturbed.
    """
    check_matching("updates", updates, "params", params)
    grad_fn = _checked_gradient_function(grad_fn)
    if not any(_is_masked_node(x) for x in jax.tree.leaves(params, is_leaf=_is_masked_node)):
        return grad_fn
    if all_params is None or any(
        _is_masked_node(x) for x in jax.tree.leaves(all_params, is_leaf=_is_masked_node)
    ):
        raise TypeError(
            f"{algorithm} received params with optax.MaskedNode in place of some leaves: it runs "
            f"inside optax.masked or optax.multi_transform, which hide the other parameters from "
            f"it, but grad_fn needs all of them. Pass the whole parameter tree as well: "
            f"update(grads, state, params, grad_fn=grad_fn, all_params=params) (with "
            f"optax.masked, leave mask_compatible_extra_args False so all_params is not masked), "
            f"got all_params={'None' if all_params is None else 'a masked tree'}."
        )

    def visible_part_of_gradient(visible: Any) -> Any:
        merged = jax.tree.map(
            lambda v, a: a if _is_masked_node(v) else v,
            visible,
            all_params,
            is_leaf=_is_masked_node,
        )
        gradient = grad_fn(merged)
        return jax.tree.map(
            lambda v, g: v if _is_masked_node(v) else g, visible, gradient, is_leaf=_is_masked_node
        )

    return visible_part_of_gradient


def tuples_per_leaf(treedef: Any, field: Any) -> Any:
    """A state field that holds a tuple of arrays per parameter, with each tuple rebuilt.

    ``flax.nnx.Optimizer`` keeps the optimizer state in nnx variables; from its second update
    on it hands the state back with every tuple nested inside the parameters' ``nnx.State``
    turned into a mapping ``{0: ..., 1: ...}`` (flax 0.12). Shampoo and SOAP rebuild the tuples
    first, so that their update works and the state keeps one tree structure.
    """
    return treedef.unflatten([tuple(jax.tree.leaves(x)) for x in treedef.flatten_up_to(field)])


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
