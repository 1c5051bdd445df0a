"""Learned optimizers (layer 4): optax transforms whose behaviour is a pytree of meta-parameters.

:class:`PerParameterMLP` describes a per-parameter MLP learned optimizer: ``init(key)`` creates
its meta-parameters and ``transform(meta_params)`` turns them into an
``optax.GradientTransformation``. :func:`mulo_update_multipliers` gives muLO's per-tensor
multipliers on the learned update.
"""

from metaopt.learned._estimators import (
    PES,
    AntitheticES,
    PESState,
    TruncatedBackprop,
    meta_train_step,
)
from metaopt.learned._mulo import mulo_update_multipliers
from metaopt.learned._per_parameter_mlp import PerParameterMLP, PerParameterMLPState
from metaopt.learned._pretrained import (
    PRETRAINED,
    load_pretrained,
    pretrained,
    pretrained_metadata,
)
from metaopt.learned._training import (
    TrainingState,
    load_meta_params,
    save_meta_params,
    training_problem,
)
from metaopt.learned._truncation import EstimatorInfo, InnerProblem, UnrollState

__all__ = [
    "PES",
    "PRETRAINED",
    "AntitheticES",
    "EstimatorInfo",
    "InnerProblem",
    "PESState",
    "PerParameterMLP",
    "PerParameterMLPState",
    "TrainingState",
    "TruncatedBackprop",
    "UnrollState",
    "load_meta_params",
    "load_pretrained",
    "meta_train_step",
    "mulo_update_multipliers",
    "pretrained",
    "pretrained_metadata",
    "save_meta_params",
    "training_problem",
]
