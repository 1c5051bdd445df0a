"""Trace-time checks that two pytrees line up, with errors that name the leaf and both shapes.

Optimizers call :func:`check_matching` at the top of ``update``: it runs while JAX traces the
function (shapes and tree structures are static), so it costs nothing in the compiled step.
Without it, a gradient tree that does not match the parameters fails deep inside the update
with messages such as ``Expected tuple, got {...}``, or, worse, a broadcastable wrong shape
(``(3, 1)`` for ``(3, 4)``) is accepted silently.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

try:  # The placeholder optax.tree_map_params passes to init to find parameter-shaped fields.
    from optax.tree_utils._state_utils import _ParamsPlaceholder
except ImportError:  # pragma: no cover - depends on optax's private layout
    _ParamsPlaceholder = None


STATE_FOR_OTHER_PARAMS = (
    "the state was built by init for other parameters; call init with these parameters"
)


def check_matching(name_a: str, tree_a: Any, name_b: str, tree_b: Any, *, hint: str = "") -> None:
    """Raises a ``ValueError`` unless two pytrees have the same structure and leaf shapes.

    The message names the first leaf path (``jax.tree_util.keystr``) where the trees differ,
    both shapes, and for a structure mismatch both tree structures.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.optimizers._tree_checks import check_matching
      >>> params = {"w": jnp.zeros((3, 4))}
      >>> check_matching("updates", {"w": jnp.ones((3, 4))}, "params", params)  # fine
      >>> check_matching("updates", {"w": jnp.ones((3, 1))}, "params", params)
      Traceback (most recent call last):
      ...
      ValueError: updates['w'] has shape (3, 1) but params['w'] has shape (3, 4); ...

    Args:
      name_a: what ``tree_a`` is, for the message (for example ``"updates"``).
      tree_a: a pytree of arrays (or anything with a shape, Python scalars included).
      name_b: what ``tree_b`` is (for example ``"params"``).
      tree_b: the pytree ``tree_a`` must match.
      hint: a likely cause, added to the message (for example that a state was initialized
        for other parameters).
    """
    hint = f" ({hint})" if hint else ""
    paths_a, treedef_a = jax.tree_util.tree_flatten_with_path(tree_a)
    paths_b, treedef_b = jax.tree_util.tree_flatten_with_path(tree_b)
    if treedef_a != treedef_b:
        keys_a = [jax.tree_util.keystr(path) for path, _ in paths_a]
        keys_b = [jax.tree_util.keystr(path) for path, _ in paths_b]
        set_a, set_b = set(keys_a), set(keys_b)
        only_a = [k for k in keys_a if k not in set_b]
        only_b = [k for k in keys_b if k not in set_a]
        if only_a or only_b:
            where = (
                f"leaves only in {name_a}: {_listing(name_a, only_a)}; "
                f"leaves only in {name_b}: {_listing(name_b, only_b)}"
            )
        else:
            where = "the same leaf paths, but different container types or None positions"
        raise ValueError(
            f"{name_a} and {name_b} have different tree structures{hint} ({where}).\n"
            f"  {name_a}: {treedef_a}\n  {name_b}: {treedef_b}\n"
            f"Pass {name_a} with exactly the tree structure of {name_b} (same keys, same "
            "container types)."
        )
    for (path, a), (_, b) in zip(paths_a, paths_b, strict=True):
        shape_a, shape_b = np.shape(a), np.shape(b)
        if shape_a != shape_b:
            key = jax.tree_util.keystr(path)
            raise ValueError(
                f"{name_a}{key} has shape {shape_a} but {name_b}{key} has shape {shape_b}{hint}; "
                f"every leaf of {name_a} must have the shape of the matching leaf of {name_b} "
                "(no broadcasting)."
            )


def _listing(name: str, keys: list[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(f"{name}{k}" for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def is_params_placeholder(params: Any) -> bool:
    """True when ``init`` is being called by ``optax.tree_map_params`` to find the state fields
    that are copies of the parameter tree (it passes a leafless placeholder instead of
    parameters)."""
    return _ParamsPlaceholder is not None and isinstance(params, _ParamsPlaceholder)


class NotParameterShaped:
    """Stands, in the state ``init`` returns for ``optax.tree_map_params``'s placeholder, for a
    per-parameter field whose arrays do not have the parameters' shapes (block statistics,
    preconditioners, eigenbases). It is a pytree leaf, so ``tree_map_params`` passes that whole
    field to ``transform_non_params`` (or leaves it unchanged) instead of mapping ``f`` over its
    arrays."""

    def __repr__(self) -> str:
        return "NotParameterShaped()"
