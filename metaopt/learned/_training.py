"""A learned optimizer training a task, as an inner problem; saving and loading meta-parameters."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.learned._per_parameter_mlp import PerParameterMLP
from metaopt.learned._truncation import InnerProblem


class TrainingState(NamedTuple):
    """Inner state of :func:`training_problem`: the task's parameters and the optimizer state.

    Example:
      >>> import jax
      >>> from metaopt import learned, tasks
      >>> lopt = learned.PerParameterMLP(hidden_size=4)
      >>> problem = learned.training_problem(lopt, tasks.mlp_task("blobs", (8,)), horizon=50)
      >>> state = problem.init(jax.random.key(0))
      >>> [layer["w"].shape for layer in state.params], int(state.opt_state.count)
      ([(16, 8), (8, 4)], 0)

    Attributes:
      params: the task's parameters.
      opt_state: the learned optimizer's state (:class:`PerParameterMLPState`).
    """

    params: Any
    opt_state: Any


def training_problem(optimizer: PerParameterMLP, task: Any, horizon: int) -> InnerProblem:
    r"""The inner problem of meta-training: ``optimizer`` training ``task`` for ``horizon`` steps.

    Each inner step draws a minibatch, takes the gradient of the task's loss and applies the
    learned optimizer's update with the meta-parameters ``theta``; the step's loss is the
    minibatch loss at the parameters before the update. With
    ``optimizer.parameterization == "mulo"`` the task's ``update_multipliers`` scale the update
    (muLO); the task should then be built in muP (``parameterization="mup"``).

    Example:
      >>> import jax
      >>> from metaopt import learned, tasks
      >>> lopt = learned.PerParameterMLP(hidden_size=4)
      >>> problem = learned.training_problem(lopt, tasks.mlp_task("blobs", (8,)), horizon=50)
      >>> state = problem.init(jax.random.key(0))
      >>> state, loss = problem.step(lopt.init(jax.random.key(1)), state, jax.random.key(2))
      >>> bool(loss > 0), int(state.opt_state.count)
      (True, 1)

    Args:
      optimizer: the learned optimizer's description.
      task: a :class:`metaopt.tasks.TrainingTask` (anything with ``init``, ``loss``,
        ``sample_batch`` and ``update_multipliers``).
      horizon: inner steps of one task before a fresh one starts.

    Returns:
      An :class:`InnerProblem` whose state is a :class:`TrainingState`.
    """
    if not isinstance(optimizer, PerParameterMLP):
        raise TypeError(
            f"optimizer must be a metaopt.learned.PerParameterMLP, got {optimizer!r} of type "
            f"{type(optimizer).__name__}."
        )
    for name in ("init", "loss", "sample_batch", "update_multipliers"):
        if not callable(getattr(task, name, None)):
            raise TypeError(
                f"task must have a callable {name!r} (a metaopt.tasks.TrainingTask), got "
                f"task={task!r}."
            )
    mulo = optimizer.parameterization == "mulo"

    def transform(theta, params):
        multipliers = task.update_multipliers(params) if mulo else None
        return optimizer.transform(theta, update_multipliers=multipliers)

    def init(key):
        params = task.init(key)
        # The optimizer state does not depend on the meta-parameters; any valid ones build it.
        tx = transform(jax.eval_shape(optimizer.init, key), params)
        return TrainingState(params, tx.init(params))

    def step(theta, state, key):
        loss, grads = jax.value_and_grad(task.loss)(state.params, task.sample_batch(key))
        updates, opt_state = transform(theta, state.params).update(
            grads, state.opt_state, state.params
        )
        return TrainingState(optax.apply_updates(state.params, updates), opt_state), loss

    return InnerProblem(init=init, step=step, horizon=horizon)


_FORMAT = "metaopt.learned.PerParameterMLP/1"


def save_meta_params(
    path: str | os.PathLike, optimizer: PerParameterMLP, meta_params: Any, **metadata: Any
) -> None:
    """Writes a learned optimizer (description, meta-parameters, metadata) to one ``.npz`` file.

    The file holds the meta-parameters as float32 arrays named by their paths, the description
    and ``metadata`` (JSON-serializable values: the command, seed, wall time, final meta-loss,
    ...) as JSON. :func:`load_meta_params` reads it back bit for bit.

    Example:
      >>> import jax, os, tempfile
      >>> from metaopt import learned
      >>> lopt = learned.PerParameterMLP(hidden_size=4)
      >>> theta = lopt.init(jax.random.key(0))
      >>> path = os.path.join(tempfile.mkdtemp(), "lopt.npz")
      >>> learned.save_meta_params(path, lopt, theta, seed=0)
      >>> lopt2, theta2, metadata = learned.load_meta_params(path)
      >>> lopt2 == lopt, metadata["seed"]
      (True, 0)

    Args:
      path: the file to write.
      optimizer: the description the meta-parameters belong to.
      meta_params: the meta-parameters (checked against the description).
      **metadata: JSON-serializable facts to store beside them.
    """
    optimizer.check_meta_params(meta_params)
    arrays = {
        jax.tree_util.keystr(path_): np.asarray(leaf, np.float32)
        for path_, leaf in jax.tree_util.tree_leaves_with_path(meta_params)
    }
    header = {
        "format": _FORMAT,
        "description": dataclasses.asdict(optimizer),
        "metadata": metadata,
    }
    with open(path, "wb") as file:
        np.savez(file, __header__=np.asarray(json.dumps(header, sort_keys=True)), **arrays)


def load_meta_params(path: str | os.PathLike) -> tuple[PerParameterMLP, Any, dict]:
    """Reads a file written by :func:`save_meta_params`.

    Example:
      >>> import jax, os, tempfile
      >>> from metaopt import learned
      >>> lopt = learned.PerParameterMLP(hidden_size=4, parameterization="mulo")
      >>> theta = lopt.init(jax.random.key(0))
      >>> path = os.path.join(tempfile.mkdtemp(), "lopt.npz")
      >>> learned.save_meta_params(path, lopt, theta, final_meta_loss=-1.5)
      >>> lopt2, theta2, metadata = learned.load_meta_params(path)
      >>> lopt2.parameterization, metadata
      ('mulo', {'final_meta_loss': -1.5})
      >>> all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(theta2)))
      True

    Args:
      path: the ``.npz`` file.

    Returns:
      ``(optimizer, meta_params, metadata)``: the description, the meta-parameters (float32
      JAX arrays, the structure of ``optimizer.init``) and the stored metadata.
    """
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(str(data["__header__"]))
        if header.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not a learned optimizer saved by metaopt.learned.save_meta_params "
                f"(format {header.get('format')!r}, expected {_FORMAT!r})."
            )
        optimizer = PerParameterMLP(**header["description"])
        template = jax.eval_shape(optimizer.init, jax.random.key(0))
        leaves = []
        for path_, leaf in jax.tree_util.tree_leaves_with_path(template):
            name = jax.tree_util.keystr(path_)
            if name not in data.files:
                raise ValueError(f"{path} has no meta-parameter {name} that {optimizer!r} needs.")
            leaves.append(jnp.asarray(data[name], leaf.dtype))
    meta_params = jax.tree.unflatten(jax.tree.structure(template), leaves)
    optimizer.check_meta_params(meta_params)
    return optimizer, meta_params, header["metadata"]
