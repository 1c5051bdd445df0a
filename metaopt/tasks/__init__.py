"""Small real and synthetic problems used by examples, tests and benchmarks.

The digits task: :func:`load_digits` gives a deterministic, standardized train/test split of
scikit-learn's 8x8 digits, and :func:`init_mlp`, :func:`mlp_apply`, :func:`cross_entropy_loss`
and :func:`accuracy` are a plain-function MLP classifier for it.
"""

from metaopt.tasks._digits import ClassificationData, load_digits
from metaopt.tasks._mlp import MLPParams, accuracy, cross_entropy_loss, init_mlp, mlp_apply

__all__ = [
    "ClassificationData",
    "MLPParams",
    "accuracy",
    "cross_entropy_loss",
    "init_mlp",
    "load_digits",
    "mlp_apply",
]
