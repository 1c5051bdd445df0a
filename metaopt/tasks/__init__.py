"""Small real and synthetic problems used by meta-learning, examples, tests and benchmarks.

The digits task: :func:`load_digits` gives a deterministic, standardized train/test split of
scikit-learn's 8x8 digits, and :func:`init_mlp`, :func:`mlp_apply`, :func:`cross_entropy_loss`
and :func:`accuracy` are a plain-function MLP classifier for it.

Meta-learning task samplers are pure functions of a PRNG key that return a batch of tasks as
one :class:`Task` whose leaves carry a leading task axis: :func:`sinusoid_tasks` (MAML's
sinusoid regression, with the true function :func:`sinusoid`), :func:`linear_regression_tasks`
(linear tasks of controllable spread, conditioning and noise) and :func:`fewshot_tasks`
(N-way K-shot episodes from the rotated-digit class pools of :func:`digits_fewshot_pools`, each
a :class:`FewShotPool`).

Learned optimizers train on :class:`TrainingTask` objects, one inner training problem as pure
functions of keys and parameters: :func:`mlp_task` (MLPs on :data:`DATASETS`, in the standard or
the muP parameterization), :func:`transformer_task` (a small decoder on a synthetic Markov chain)
and :func:`sample_training_task`, which draws one from the meta-training distribution, over
:data:`TRAINING_DATASETS`, leaving :data:`HELD_OUT_DATASETS` for evaluation.
"""

from metaopt.tasks._digits import ClassificationData, load_digits
from metaopt.tasks._fewshot import FewShotPool, digits_fewshot_pools, fewshot_tasks
from metaopt.tasks._mlp import MLPParams, accuracy, cross_entropy_loss, init_mlp, mlp_apply
from metaopt.tasks._regression import Task, linear_regression_tasks, sinusoid, sinusoid_tasks
from metaopt.tasks._task_distribution import (
    HELD_OUT_DATASETS,
    TRAINING_DATASETS,
    sample_training_task,
)
from metaopt.tasks._training_tasks import (
    ACTIVATIONS,
    DATASETS,
    TrainingTask,
    mlp_task,
)
from metaopt.tasks._transformer import transformer_task

__all__ = [
    "ACTIVATIONS",
    "DATASETS",
    "HELD_OUT_DATASETS",
    "TRAINING_DATASETS",
    "ClassificationData",
    "FewShotPool",
    "MLPParams",
    "Task",
    "TrainingTask",
    "accuracy",
    "cross_entropy_loss",
    "digits_fewshot_pools",
    "fewshot_tasks",
    "init_mlp",
    "linear_regression_tasks",
    "load_digits",
    "mlp_apply",
    "mlp_task",
    "sample_training_task",
    "sinusoid",
    "sinusoid_tasks",
    "transformer_task",
]
