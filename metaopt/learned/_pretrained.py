"""Meta-trained learned optimizers shipped as package data (examples/train_learned_optimizer.py).

Each is a small ``.npz`` file under ``metaopt/learned/pretrained/`` (written by
:func:`~metaopt.learned.save_meta_params`) holding the description, the meta-parameters and the
exact command, seed, wall time and final meta-loss of the run that produced it; the README beside
them lists the same facts. Loading reads the installed package only, never the network.
"""

from __future__ import annotations

import importlib.resources
from typing import Any

import optax

from metaopt.learned._per_parameter_mlp import PerParameterMLP
from metaopt.learned._training import load_meta_params

PRETRAINED = ("default", "mulo")
"""Names of the shipped learned optimizers: ``"default"`` (standard parameterization) and
``"mulo"`` (muLO: for networks in muP, with update multipliers)."""


def _path(name: Any):
    if name not in PRETRAINED:
        raise ValueError(
            f"name must be one of {PRETRAINED}, got name={name!r}. Use 'default' for ordinary "
            "networks and 'mulo' for networks initialized in muP (with update_multipliers)."
        )
    return importlib.resources.files("metaopt.learned") / "pretrained" / f"{name}.npz"


def load_pretrained(name: str = "default") -> tuple[PerParameterMLP, Any]:
    """The description and meta-parameters of a shipped learned optimizer.

    Example:
      >>> from metaopt import learned
      >>> optimizer, meta_params = learned.load_pretrained()
      >>> optimizer.parameterization
      'standard'

    Args:
      name: one of :data:`PRETRAINED`.

    Returns:
      ``(optimizer, meta_params)``; ``optimizer.transform(meta_params)`` is :func:`pretrained`.
    """
    with importlib.resources.as_file(_path(name)) as path:
        optimizer, meta_params, _ = load_meta_params(path)
    return optimizer, meta_params


def pretrained_metadata(name: str = "default") -> dict:
    """How a shipped learned optimizer was made: command, seed, wall time, final meta-loss, tasks.

    Example:
      >>> from metaopt import learned
      >>> learned.pretrained_metadata()["seed"]
      0
    """
    with importlib.resources.as_file(_path(name)) as path:
        return load_meta_params(path)[2]


def pretrained(
    name: str = "default", *, update_multipliers: Any = None
) -> optax.GradientTransformation:
    """A meta-trained learned optimizer, ready to use: no hyperparameter to set.

    ``"default"`` was meta-trained on small MLPs (widths 8 to 32, the digits, blobs, diabetes and
    teacher tasks of :func:`metaopt.tasks.sample_training_task`) over 200-step runs; see
    ``docs/learned-optimizers.md`` for where it beats Adam with a tuned rate and where it loses
    (much wider networks, much longer runs). ``"mulo"`` is its muLO counterpart for networks in
    muP; it generalizes to wider networks and longer runs better, and needs the networks'
    ``update_multipliers`` (:func:`mulo_update_multipliers`).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import learned
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), learned.pretrained())
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
      >>> updates["w"].shape
      (3,)

    Args:
      name: one of :data:`PRETRAINED`.
      update_multipliers: for ``"mulo"``, one multiplier per parameter tensor.

    Returns:
      An ``optax.GradientTransformation`` (it needs ``params`` in ``update``).
    """
    optimizer, meta_params = load_pretrained(name)
    return optimizer.transform(meta_params, update_multipliers=update_multipliers)
