"""Helpers shared by the optimizer modules: hyperparameter handling, checks, safe norms."""

from __future__ import annotations

import ctypes
import functools
import inspect
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


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``jnp.sqrt`` whose derivatives of every order are finite at 0, for second moments.

    The second moment of an optimizer is zero only while every gradient seen so far was zero,
    and then its derivative is zero too; the true product ``0 * inf`` is taken as 0, where
    ``jnp.sqrt`` gives NaN. This keeps Adam-type updates differentiable (meta-gradients through
    an inner loop, and their Hessians) without an ``eps_root``. Values are exactly
    ``jnp.sqrt``'s.

    Plain autodiff, not a ``custom_jvp``: the root is taken only of positive values, and the
    other branch has no derivative. A ``custom_jvp`` rule lost its protection in second
    derivatives through ``lax.scan`` (JAX evaluates the rule's own primal as a plain ``sqrt``
    when it partially evaluates the loop body), which made ``jax.hessian`` of a meta-objective
    NaN.
    """
    positive = x > 0
    return jnp.where(
        positive, jnp.sqrt(jnp.where(positive, x, 1.0)), jnp.sqrt(jax.lax.stop_gradient(x))
    )


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
# SOAP's root steps are; metaopt handles both where the matrix functions are traced
# (_matrix_root.map_matrices), never at import or construction. (1) Batched LAPACK calls (eigh,
# qr of a stack of blocks) spread the batch over XLA's intra-op threads and wait for it; two in
# flight at once can wait on each other forever. On a single CPU device metaopt computes the
# blocks one at a time, which never queues work (_matrix_root.sequential_by_default); with
# several CPU devices the blocks stay batched, and turning off XLA's concurrency-optimized
# scheduler (this flag, which must be set before the backend starts) makes the deadlock rare.
# (2) jaxlib's LAPACK is scipy's OpenBLAS, whose threads spin while they wait: beside XLA's own
# threads on a busy machine, steps with roots were 20 to 200 times slower. use_one_lapack_thread
# runs that OpenBLAS on one thread (see BUILD_NOTES for the measurements and the choice).
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

# A thread count the user chose, which metaopt leaves alone (OpenBLAS reads them in this order).
THREAD_COUNT_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def prepare_cpu_environment() -> None:
    """Sets the XLA flag that several simulated CPU devices need for Shampoo and SOAP.

    Not needed on a single CPU device (the default), on GPU or on TPU: there metaopt needs
    nothing from the environment. With several CPU devices
    (``--xla_force_host_platform_device_count``, as in tests of sharded code) the blocks'
    eigendecompositions run as batches, and two batches in flight at once can deadlock in
    jaxlib 0.10's LAPACK loop. This appends
    ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` to ``XLA_FLAGS``, which made
    that rare (no hang in 13 stress runs, against 5 of 9 without it), and sets
    ``OPENBLAS_NUM_THREADS=1`` for processes started from this one (metaopt already runs
    jaxlib's OpenBLAS on one thread in this process). It changes nothing that is already set,
    and XLA reads its flags only when the backend starts: call it after importing metaopt and
    before the first JAX computation, or set both variables in the shell.

    Example:
      >>> import metaopt
      >>> metaopt.prepare_cpu_environment()  # first thing in a script that simulates devices
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_SCHEDULER_FLAG.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@functools.cache
def use_one_lapack_thread() -> bool:
    """Runs the OpenBLAS behind jaxlib's CPU LAPACK on one thread; once per process.

    Called when a matrix function is traced for the CPU backend, never at import or
    construction. Leaves the library alone when the user chose a thread count
    (``OPENBLAS_NUM_THREADS``, ``GOTO_NUM_THREADS`` or ``OMP_NUM_THREADS`` set) and when
    jaxlib's LAPACK is not an OpenBLAS that can be found (then one of these variables is the
    remedy). The change is process-wide but reaches only that library, scipy's: NumPy has its
    own. Returns whether the count was set.
    """
    if any(name in os.environ for name in THREAD_COUNT_VARIABLES):
        return False
    try:
        # jaxlib takes its LAPACK from here; dlsym on this module also searches the libraries
        # it links, which is where the OpenBLAS functions are.
        from scipy.linalg import cython_lapack

        library = ctypes.CDLL(cython_lapack.__file__)
    except (ImportError, OSError):
        return False
    for name in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
        set_num_threads = getattr(library, name, None)
        if set_num_threads is not None:
            set_num_threads.argtypes, set_num_threads.restype = [ctypes.c_int], None
            set_num_threads(1)
            return True
    return False


def warn_if_batched_cpu_roots_may_deadlock() -> None:
    """Warns, when batched matrix functions are traced on several CPU devices, without the flag.

    Only there can jaxlib 0.10's batched LAPACK calls deadlock (see
    :func:`prepare_cpu_environment`); a single device, GPU and TPU need nothing.
    """
    if CPU_SCHEDULER_FLAG.split("=")[0] in os.environ.get("XLA_FLAGS", ""):
        return
    warnings.warn(
        f"Batched eigendecompositions on the CPU backend ({jax.device_count()} devices) without "
        f"XLA_FLAGS={CPU_SCHEDULER_FLAG}: jaxlib's batched LAPACK calls can deadlock there. "
        f"Call metaopt.prepare_cpu_environment() before the first JAX computation (see the "
        f"Shampoo guide, 'Known problems on CPU').",
        RuntimeWarning,
        stacklevel=2,
    )


def renamed_arguments(
    renamed: dict[str, str], *, keyword_only: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorates a factory so that arguments it no longer accepts fail with the fix in the message.

    ``renamed`` maps an old keyword to its new name; ``keyword_only`` lists arguments that used
    to be positional. Either raises a ``TypeError`` naming the new form instead of Python's
    "unexpected keyword argument" or "takes at most n positional arguments", and nothing old is
    accepted silently. The signature (``inspect.signature``, ``optax.inject_hyperparams``,
    the docs) is the factory's own.
    """

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        name = factory.__name__
        positional = [
            p.name
            for p in inspect.signature(factory).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ]

        @functools.wraps(factory)
        def checked(*args: Any, **kwargs: Any) -> Any:
            for old, new in renamed.items():
                if old in kwargs:
                    raise TypeError(
                        f"{name}() has no argument {old!r}: it is called {new!r} now "
                        f"(pass {new}={kwargs[old]!r})."
                    )
            if keyword_only and len(args) > len(positional):
                raise TypeError(
                    f"{name}() takes at most {len(positional)} positional arguments "
                    f"({', '.join(positional)}), got {len(args)}; "
                    f"{' and '.join(keyword_only)} are keyword-only now "
                    f"(for example {keyword_only[0]}=...)."
                )
            return factory(*args, **kwargs)

        return checked

    return decorate
