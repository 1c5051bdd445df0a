"""The inner loop shared by the MAML family: adapting parameters to one task's support set."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.bilevel import FirstOrder, Implicit, SolveDiagnostics, Truncated, Unrolled, solve

# loss_fn(params, batch) -> scalar, with batch a task's support or query set.
LossFn = Callable[[Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class InnerLoop:
    """How a task adapts the meta-parameters: an optax optimizer run for a number of steps.

    Example:
      >>> import optax
      >>> from metaopt import meta
      >>> inner = meta.InnerLoop(optax.sgd(0.01), steps=5)
      >>> inner.steps
      5

    Attributes:
      optimizer: any optax transform (SGD as in MAML, or Adam, SAM, a metaopt optimizer, ...).
        Its hyperparameters may be traced arrays closed over by the transform; with second-order
        meta-gradients they are differentiated too.
      steps: inner steps per task (the exact number; ``tol`` may stop earlier).
      tol: stop a task's adaptation once its support-gradient norm is at most this; None runs
        every step (MAML's fixed budget).
    """

    optimizer: optax.GradientTransformation
    steps: int = 1
    tol: float | None = None

    def __post_init__(self):
        if not isinstance(self.optimizer, optax.GradientTransformation):
            raise TypeError(
                f"optimizer must be an optax GradientTransformation such as optax.sgd(0.01), "
                f"got optimizer={self.optimizer!r}."
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got steps={self.steps!r}.")
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f"tol must be None or >= 0, got tol={self.tol!r}.")


class MetaDiagnostics(NamedTuple):
    """Per-task record of a meta-batch; every field has a leading task axis.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import meta
      >>> from metaopt.tasks import linear_regression_tasks
      >>> tasks = linear_regression_tasks(jax.random.key(0), 4, dim=3, shots=5)
      >>> loss = lambda w, batch: 0.5 * jnp.mean((batch[0] @ w - batch[1]) ** 2)
      >>> inner = meta.InnerLoop(optax.sgd(0.1), steps=3)
      >>> meta_loss, info = meta.maml_loss(jnp.zeros(3), tasks, loss, inner)
      >>> info.query_loss.shape, info.inner.steps.tolist()  # one entry per task
      ((4,), [3, 3, 3, 3])
      >>> bool(jnp.isclose(meta_loss, info.query_loss.mean()))  # the meta-loss is their mean
      True

    Attributes:
      query_loss: each task's loss on its query set after adaptation.
      support_loss: each task's loss on its support set before adaptation.
      inner: the inner solves' :class:`metaopt.bilevel.SolveDiagnostics` (steps taken, final
        support-gradient norm, converged).
    """

    query_loss: jax.Array
    support_loss: jax.Array
    inner: SolveDiagnostics


def adapt(
    loss_fn: LossFn,
    params: Any,
    support: Any,
    inner: InnerLoop,
    *,
    diff: Unrolled | Truncated | FirstOrder | Implicit | None = None,
    adapted: Callable[[Any], Any] | None = None,
) -> tuple[Any, SolveDiagnostics]:
    """Adapts ``params`` to one task: ``inner.steps`` steps of ``inner.optimizer`` on the support.

    This is the inner loop of every algorithm in :mod:`metaopt.meta`, and what a meta-trained
    model runs at test time on a new task. Derivatives flow back to ``params`` as ``diff``
    says (default :class:`~metaopt.bilevel.Unrolled`, exact second order).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from metaopt import meta
      >>> loss = lambda w, batch: jnp.mean((batch[0] * w - batch[1]) ** 2)
      >>> support = (jnp.array([1.0, 2.0]), jnp.array([2.0, 4.0]))
      >>> w, info = meta.adapt(loss, jnp.array(0.0), support, meta.InnerLoop(optax.sgd(0.1), 50))
      >>> print(f"{w:.4f}", int(info.steps))
      2.0000 50

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the starting point (the meta-parameters).
      support: the task's support set, passed to ``loss_fn`` as ``batch``.
      inner: the :class:`InnerLoop`.
      diff: how the result is differentiated with respect to ``params``.
      adapted: optional function of ``params`` returning a pytree of booleans with the
        structure of ``params``: only the True leaves are adapted (ANIL adapts the head); the
        others stay fixed in the inner loop and receive their meta-gradient through it.

    Returns:
      ``(adapted_params, diagnostics)``.
    """
    diff = Unrolled() if diff is None else diff
    kwargs = dict(optimizer=inner.optimizer, steps=inner.steps, tol=inner.tol, diff=diff)
    if adapted is None:
        return solve(lambda p: loss_fn(p, support), params, **kwargs)
    inner_part, outer_part, merge = _partition(params, adapted(params))

    def inner_loss(inner_params, outer_params):
        return loss_fn(merge(inner_params, outer_params), support)

    result, info = solve(inner_loss, inner_part, outer_part, **kwargs)
    return merge(result, outer_part), info


def _partition(params, mask):
    """Splits ``params`` into the leaves where ``mask`` is True and the rest, and a merge."""
    leaves, treedef = jax.tree.flatten(params)
    try:
        flags = treedef.flatten_up_to(mask)
    except ValueError as error:
        raise ValueError(
            f"adapted(params) must return a pytree of booleans with the structure of params "
            f"({treedef}); {error}"
        ) from None
    flags = [bool(f) for f in flags]
    if not any(flags):
        raise ValueError("adapted(params) marks no leaf as adapted; mark at least one True.")
    inner = [leaf for leaf, f in zip(leaves, flags, strict=True) if f]
    outer = [leaf for leaf, f in zip(leaves, flags, strict=True) if not f]

    def merge(inner_leaves, outer_leaves):
        inner_iter, outer_iter = iter(inner_leaves), iter(outer_leaves)
        return treedef.unflatten([next(inner_iter if f else outer_iter) for f in flags])

    return inner, outer, merge


def over_tasks(per_task: Callable[[Any, Any], tuple[Any, Any]], meta_params: Any, tasks: Any):
    """Maps ``per_task(meta_params, task)`` over the leading task axis of ``tasks``.

    A ``jax.vmap``: on a device mesh, tasks sharded along their leading axis (see
    :func:`shard_tasks`) are adapted on their own devices and only the averages cross devices.
    """
    sizes = {x.shape[0] for x in jax.tree.leaves(tasks) if jnp.ndim(x) > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"tasks must be a batch: every array with the same leading task axis, got leading "
            f"sizes {sorted(sizes)}. For a single task add the axis, e.g. "
            f"jax.tree.map(lambda x: x[None], task)."
        )
    return jax.vmap(per_task, in_axes=(None, 0))(meta_params, tasks)


def shard_tasks(tasks: Any, mesh: jax.sharding.Mesh, axis: str = "tasks") -> Any:
    """Places a batch of tasks on ``mesh``, split along its leading task axis over ``axis``.

    The meta-objectives of :mod:`metaopt.meta` then run each device's tasks on that device
    (they ``vmap`` over tasks, and ``jit`` keeps the split); the meta-gradient is the same as on
    one device.

    Example:
      >>> import jax, numpy as np
      >>> from metaopt import meta
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tasks",))
      >>> tasks = (np.zeros((4, 10, 1)), np.zeros((4, 10, 1)))
      >>> meta.shard_tasks(tasks, mesh)[0].sharding.spec == jax.sharding.PartitionSpec("tasks")
      True

    Args:
      tasks: a pytree of arrays with a leading task axis.
      mesh: a ``jax.sharding.Mesh`` with an axis named ``axis``.
      axis: the mesh axis to split tasks over.

    Returns:
      The same pytree, each array placed with ``NamedSharding(mesh, PartitionSpec(axis))``.
    """
    if axis not in mesh.axis_names:
        raise ValueError(
            f"axis={axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}; "
            f"build the mesh with a {axis!r} axis or pass axis=<one of them>."
        )
    devices = mesh.shape[axis]
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))

    def place(x):
        if jnp.ndim(x) == 0 or x.shape[0] % devices:
            raise ValueError(
                f"the number of tasks ({jnp.shape(x)[:1]}) must be a multiple of the {devices} "
                f"devices on mesh axis {axis!r}; sample a multiple of {devices} tasks."
            )
        return jax.device_put(x, sharding)

    return jax.tree.map(place, tasks)
