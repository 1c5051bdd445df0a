"""Shampoo's configuration: the grafted step size, whole step counts, the root exponent."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from metaopt.optimizers import _common

_GRAFTING_KINDS = ("none", "sgd", "adagrad", "rmsprop", "adam")


@dataclasses.dataclass(frozen=True)
class Grafting:
    """The diagonal method whose step size Shampoo borrows, block by block.

    Shampoo's direction is rescaled in every block to the norm the grafted method's step would
    have there (Agarwal et al., "Disentangling Adaptive Gradient Methods from Learning Rates",
    2020), so learning rates and schedules tuned for the grafted method carry over. Before
    ``start_preconditioning_step``, and for tensors with no preconditioned axis, the grafted
    method's step is taken as it is.

    Example:
      >>> import jax.numpy as jnp, metaopt
      >>> # SGD grafting: Shampoo's direction takes the norm of the momentum step, block by block,
      >>> # and keeps no second moment of its own (Adam grafting keeps one like the parameters).
      >>> sgd = metaopt.scale_by_shampoo(grafting=metaopt.Grafting(kind="sgd"))
      >>> adam = metaopt.scale_by_shampoo(grafting=metaopt.Grafting(kind="adam"))
      >>> sgd.init(jnp.zeros(3)).graft, adam.init(jnp.zeros(3)).graft.shape
      ((), (3,))

    Attributes:
      kind: ``"adam"`` (default; with Shampoo's ``b1`` as Adam's beta1), ``"rmsprop"`` (no bias
        correction), ``"adagrad"`` (sum of squares), ``"sgd"`` (the first moment) or ``"none"``
        (Shampoo's own step size; then the first moment is the step where Shampoo has none).
      b2: second-moment rate of ``"adam"`` and ``"rmsprop"``.
      eps: added to the square root of the second moment.
    """

    kind: Literal["none", "sgd", "adagrad", "rmsprop", "adam"] = "adam"
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.kind not in _GRAFTING_KINDS:
            raise ValueError(
                f"Grafting kind must be one of {_GRAFTING_KINDS}, got kind={self.kind!r}."
            )
        _common.check_range("Grafting b2", self.b2, 0.0, 1.0, fix="Use a rate in [0, 1).")
        _common.check_nonnegative("Grafting eps", self.eps)

    @property
    def has_accumulator(self) -> bool:
        return self.kind in ("adagrad", "rmsprop", "adam")


def check_whole(name: str, value: Any) -> None:
    """A positive whole number of steps; an integer array from inject_hyperparams passes."""
    _common.check_number(name, value, integer=True)  # a string: TypeError naming it
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.integer):
        if isinstance(value, jax.core.Tracer) or value.ndim:
            return
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive int (a number of steps), got {name}={value!r}."
        )


def exponent_rule(override: int | Sequence[int] | None) -> Callable[[int], int]:
    """Maps the number of preconditioned axes c to the root p (default 2c)."""
    if override is None:
        return lambda c: 2 * c
    if isinstance(override, jax.Array):
        raise TypeError(
            "exponent_override sets the program's structure and cannot be an array; with "
            "optax.inject_hyperparams list it in static_args."
        )
    if isinstance(override, int) and not isinstance(override, bool):
        if override < 1:
            raise ValueError(
                f"exponent_override must be a positive int, got exponent_override={override}."
            )
        return lambda c: override
    try:
        entries = [int(e) for e in override]
    except TypeError:
        raise TypeError(
            f"exponent_override must be None, an int or a sequence of ints, got "
            f"exponent_override={override!r}."
        ) from None
    if any(e < 0 for e in entries):
        raise ValueError(
            f"exponent_override entries must be >= 0 (0 keeps the default), got {entries}."
        )
    return lambda c: entries[c - 1] if c <= len(entries) and entries[c - 1] > 0 else 2 * c
