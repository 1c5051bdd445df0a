"""muLO's per-tensor multipliers on a learned optimizer's update.

Therien, Joseph, Knyazev, Oyallon, Rish and Belilovsky, "muLO: Compute-Efficient
Meta-Generalization of Learned Optimizers", 2024.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import jax
import numpy as np


def mulo_update_multipliers(
    params: Any, input_layers: Collection[str] | Callable[[str], bool] = ()
) -> Any:
    r"""One multiplier per parameter tensor: muLO's width scaling of a learned update.

    A learned optimizer's update has entries of order one, like Adam's. Under the maximal
    update parameterization (muP, Yang et al., Tensor Programs V, Table 3) such an update keeps
    every layer's feature updates of the same size at every width when it is multiplied by

    - 1 for the input layer's weights (its fan-in, the data dimension, does not grow) and for
      every vector and scalar (biases, gains);
    - :math:`1/\text{fan-in}` for every other matrix (hidden and output layers), with
      :math:`\text{fan-in} = \prod` of all axes but the last (``x @ w`` layout, as in flax's
      ``Dense`` and ``Conv`` kernels).

    muLO pairs these multipliers with muP initialization of the target network (see
    :func:`metaopt.tasks.mlp_task` with ``parameterization="mup"``).

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt import learned
      >>> params = {"in": {"w": jnp.zeros((8, 64)), "b": jnp.zeros(64)},
      ...           "out": {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}}
      >>> learned.mulo_update_multipliers(params, input_layers=["['in']"])
      {'in': {'b': 1.0, 'w': 1.0}, 'out': {'b': 1.0, 'w': 0.015625}}

    Args:
      params: the parameters (a pytree of arrays or shape-dtype structs).
      input_layers: which tensors take the data as input: either strings, and a tensor is an
        input tensor when one of them occurs in its path as ``jax.tree_util.keystr`` prints it
        (``"['in']"`` above), or a function of that path string returning True for them.

    Returns:
      A pytree of Python floats with the structure of ``params``.
    """
    if isinstance(input_layers, str):
        raise TypeError(
            "input_layers must be a collection of path strings or a function, got the string "
            f"{input_layers!r}; wrap it in a list: input_layers=[{input_layers!r}]."
        )
    if callable(input_layers):
        is_input = input_layers
    else:
        patterns = tuple(input_layers)
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(
                    f"input_layers entries must be strings, got {pattern!r} of type "
                    f"{type(pattern).__name__}."
                )

        def is_input(path: str) -> bool:
            return any(pattern in path for pattern in patterns)

    def multiplier(path, leaf):
        shape = np.shape(leaf)
        fan_in = int(np.prod(shape[:-1])) if len(shape) >= 2 else 0
        if fan_in == 0 or is_input(jax.tree_util.keystr(path)):
            return 1.0  # vectors, scalars, input layers, and empty tensors (nothing to scale)
        return 1.0 / fan_in

    return jax.tree_util.tree_map_with_path(multiplier, params)
