"""The ``grad_fn`` of the sharpness-aware transforms for a flax NNX module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def nnx_grad_fn(
    model: Any,
    loss: Callable[..., Any],
    *args: Any,
    wrt: Any = None,
    has_aux: bool = False,
) -> Callable[[Any], Any]:
    r"""Turns a flax NNX module and its loss into the ``grad_fn`` of SAM, ASAM, GAM and the rest.

    ``nnx.Optimizer.update(model, grads, grad_fn=...)`` hands the transform the parameters as an
    ``nnx.State`` of plain arrays, and the sharpness-aware transforms call ``grad_fn`` on
    perturbed copies of that tree. A ``grad_fn`` written with ``nnx.grad`` returns ``nnx.Param``
    variables instead of arrays, and updating the model in place would move the real weights.
    The returned function instead evaluates ``loss(model, *args)`` on a copy of the module that
    carries the given parameters, and returns the gradient with respect to them as a tree shaped
    like its argument.

    The module's other variables (batch-norm statistics, dropout RNG counters) are read when
    ``nnx_grad_fn`` is called, and every evaluation starts from those values; what a forward
    pass writes to them is dropped, so the second pass of a SAM step does not touch the model.
    Call ``nnx_grad_fn`` **before** the first gradient of the step: both passes then see the
    same dropout masks, as SAM asks (the first pass advances the RNG counters).

    Example:
      >>> import jax, jax.numpy as jnp, optax, metaopt
      >>> from flax import nnx
      >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, metaopt.sam(optax.sgd(0.1), rho=0.05), wrt=nnx.Param)
      >>> def loss_fn(model, x, y):
      ...     return jnp.mean((model(x) - y) ** 2)
      >>> @nnx.jit
      ... def train_step(model, optimizer, x, y):
      ...     grad_fn = metaopt.nnx_grad_fn(model, loss_fn, x, y)
      ...     loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
      ...     optimizer.update(model, grads, grad_fn=grad_fn)
      ...     return loss
      >>> x = jax.random.normal(jax.random.key(0), (32, 3))
      >>> y = x @ jnp.array([[1.0], [-2.0], [0.5]])
      >>> losses = [float(train_step(model, optimizer, x, y)) for _ in range(100)]
      >>> print(f"{losses[0]:.2f} -> {losses[-1]:.2f}")
      3.64 -> 0.00

    Args:
      model: an ``flax.nnx.Module``.
      loss: ``loss(model, *args)``, a scalar (or ``(scalar, aux)`` with ``has_aux=True``): the
        function whose gradient the step takes, usually the one given to ``nnx.value_and_grad``.
      *args: the arguments after the model, usually the batch: the same ones as for the first
        gradient.
      wrt: the filter of the variables being trained, the ``wrt`` of ``nnx.Optimizer``
        (default ``nnx.Param``).
      has_aux: whether ``loss`` returns ``(value, aux)``; ``aux`` is dropped.

    Returns:
      ``grad_fn(params)``: the gradient of ``loss`` at ``params`` (an ``nnx.State`` of the
      ``wrt`` variables, as arrays or as variables), shaped like ``params``.
    """
    nnx = nnx_module_check(
        "nnx_grad_fn",
        model,
        "outside NNX, write grad_fn = lambda params: jax.grad(loss)(params, batch).",
    )
    graphdef, _, rest = nnx.split(model, nnx.Param if wrt is None else wrt, ...)
    # split shares the module's Variables; a copy keeps today's values (RNG counters, batch
    # statistics) when the first gradient pass later writes new ones into the module.
    rest = jax.tree.map(lambda leaf: leaf, rest)

    def loss_at(params: Any) -> Any:
        # copy=True: fresh Variables in the current trace, which a forward pass may write to
        # (batch statistics, RNG counters) without touching the module.
        value = loss(nnx.merge(graphdef, params, rest, copy=True), *args)
        return value[0] if has_aux else value

    return jax.grad(loss_at)


def nnx_module_check(caller: str, model: Any, otherwise: str) -> Any:
    """Imports ``flax.nnx`` (an optional dependency) and checks that ``model`` is a module.

    Returns the ``nnx`` module; ``otherwise`` tells the user what to write without NNX.
    """
    try:
        from flax import nnx
    except ImportError as error:  # pragma: no cover - flax is an optional dependency
        raise ImportError(f'{caller} needs flax: pip install "metaopt-jax[flax]".') from error
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}; {otherwise}")
    return nnx
