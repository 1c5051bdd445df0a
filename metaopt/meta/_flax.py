"""A thin adapter from a flax NNX module to the plain functions of :mod:`metaopt.meta`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from metaopt.optimizers._flax import nnx_module_check


def nnx_loss(
    model: Any, loss: Callable[[Any, Any], jax.Array]
) -> tuple[Any, Callable[[Any, Any], jax.Array]]:
    r"""Splits a flax NNX module into meta-parameters and a pure ``loss_fn(params, batch)``.

    The module's ``nnx.Param`` variables become the meta-parameters (an ``nnx.State``, a
    pytree that optax and :mod:`metaopt.meta` handle like any other). Its other variables
    (batch-norm running statistics, counters, RNG state) are captured as constants: every
    evaluation starts from them, and changes a forward pass makes to them are dropped, so
    ``loss_fn`` is a pure function that can be differentiated, vmapped over tasks and
    differentiated again. Normalization layers therefore behave as their mode says: in
    training mode (``use_running_average=False``) batch norm normalizes with the statistics of
    the batch it is given — the support set during adaptation and the query set for the
    meta-loss, which is what the MAML paper's implementation does — and its running averages
    are not updated; put the module in evaluation mode (``model.eval()``) before the split to
    use fixed statistics instead. Rebuild the module from trained parameters with
    ``nnx.update(model, params)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from metaopt import meta
      >>> from metaopt.tasks import sinusoid_tasks
      >>> model = nnx.Sequential(nnx.Linear(1, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 1, rngs=nnx.Rngs(1)))
      >>> params, loss_fn = meta.nnx_loss(
      ...     model, lambda m, batch: jnp.mean((m(batch[0]) - batch[1]) ** 2))
      >>> tasks = sinusoid_tasks(jax.random.key(0), 4, shots=5)
      >>> grads, info = jax.grad(meta.maml_loss, has_aux=True)(
      ...     params, tasks, loss_fn, meta.InnerLoop(optax.sgd(0.01)))
      >>> jax.tree.structure(grads) == jax.tree.structure(params)
      True

    Args:
      model: an ``flax.nnx.Module``.
      loss: ``loss(model, batch) -> scalar``, called on a copy of the module that carries the
        parameters being evaluated.

    Returns:
      ``(params, loss_fn)``: the module's parameters and ``loss_fn(params, batch)``.
    """
    nnx = nnx_module_check(
        "meta.nnx_loss",
        model,
        "for a linen module write loss_fn(params, batch) around "
        "module.apply({'params': params}, ...).",
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
        # copy=True: fresh Variables in the current trace, so batch norm may write its
        # statistics (without it flax refuses the write under jax.grad and vmap).
        return loss(nnx.merge(graphdef, params, rest, copy=True), batch)

    return params, loss_fn
