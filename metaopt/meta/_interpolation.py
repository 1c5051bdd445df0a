"""MLTI: new tasks by interpolating pairs of tasks, to meta-train on fewer tasks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def interpolate_tasks(
    key: jax.Array, tasks: Any, *, alpha: float = 0.5, classification: bool = False
) -> Any:
    r"""Mixes every task of a batch with another one (MLTI's task interpolation).

    For task :math:`i`, a partner :math:`j \ne i` is drawn from the batch and
    :math:`\lambda_i \sim \mathrm{Beta}(\alpha, \alpha)`; support and query sets are mixed with
    the same :math:`\lambda_i`:

    - regression: :math:`x = \lambda_i x^{(i)} + (1-\lambda_i) x^{(j)}`, and likewise the
      targets, sample by sample;
    - classification (``classification=True``, integer labels): samples are ordered by label in
      both tasks, the inputs of class :math:`c` of task :math:`i` are mixed with those of class
      :math:`c` of task :math:`j` (a random class of :math:`j`, since episodes assign labels at
      random), and the label stays :math:`c`: a new class per label. Both tasks must hold the
      same number of samples of every label (N-way K-shot episodes do).

    The paper mixes hidden features at a random layer; this function mixes inputs (layer 0),
    which keeps it independent of the model. Use the result alongside or instead of the
    original tasks in a meta-batch.

    Example:
      >>> import jax
      >>> from metaopt import meta
      >>> from metaopt.tasks import sinusoid_tasks
      >>> tasks = sinusoid_tasks(jax.random.key(0), 4, shots=5)
      >>> mixed = meta.interpolate_tasks(jax.random.key(1), tasks)
      >>> mixed.support[0].shape
      (4, 5, 1)

    References:
      Yao, Zhang and Finn, "Meta-Learning with Fewer Tasks through Task Interpolation",
      ICLR 2022.

    Args:
      key: a PRNG key.
      tasks: a batch of at least two tasks with ``support`` and ``query`` fields, each
        ``(inputs, targets)`` with a leading task axis (a :class:`metaopt.tasks.Task`).
      alpha: the Beta distribution's parameter (> 0); small values keep tasks nearly intact.
      classification: integer labels, mixed class by class as above.

    Returns:
      A batch of the same structure and shapes (``info`` is dropped: it described the
      original tasks).
    """
    if not alpha > 0:
        raise ValueError(
            f"alpha must be > 0 (a Beta distribution's parameter), got alpha={alpha!r}."
        )
    num_tasks = jnp.shape(tasks.support[0])[0]
    if num_tasks < 2:
        raise ValueError(
            f"interpolation needs at least two tasks in the batch, got {num_tasks}; sample more."
        )
    shift_key, mix_key = jax.random.split(key)
    # A random nonzero shift pairs every task with a different one.
    shift = jax.random.randint(shift_key, (num_tasks,), 1, num_tasks)
    partner = (jnp.arange(num_tasks) + shift) % num_tasks
    weight = jax.random.beta(mix_key, alpha, alpha, (num_tasks,))

    def mix(a, b):
        lam = weight.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
        return lam * a + (1 - lam) * b

    def mix_set(batch):
        x, y = batch
        if classification:
            order = jnp.argsort(y, axis=1, stable=True)
            x = jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
            y = jnp.take_along_axis(y, order, axis=1)
            if not isinstance(y, jax.core.Tracer):
                _check_balanced(y, partner)
            return mix(x, x[partner]), y
        return mix(x, x[partner]), mix(y, y[partner])

    mixed = tasks._replace(support=mix_set(tasks.support), query=mix_set(tasks.query))
    return mixed._replace(info=None) if hasattr(mixed, "info") else mixed


def _check_balanced(sorted_labels, partner):
    if not bool(jnp.all(sorted_labels == sorted_labels[partner])):
        raise ValueError(
            "classification interpolation needs the same number of samples of every label in "
            "every task (N-way K-shot episodes); these tasks' label counts differ."
        )
