"""Layer 1: optimizers as optax gradient transformations."""

from metaopt.optimizers._ademamix import (
    ScaleByAdEMAMixState,
    ademamix,
    ademamix_alpha_warmup,
    ademamix_b3_warmup,
    scale_by_ademamix,
)
from metaopt.optimizers._asam import asam, scale_by_asam
from metaopt.optimizers._blocking import Blocking
from metaopt.optimizers._common import ScalarOrSchedule, prepare_cpu_environment
from metaopt.optimizers._flax import nnx_grad_fn
from metaopt.optimizers._gam import gam, scale_by_gam
from metaopt.optimizers._gradient_regularization import (
    gradient_regularization,
    scale_by_gradient_regularization,
)
from metaopt.optimizers._matrix_root import (
    MatrixRootInfo,
    eigenbasis,
    matrix_inverse_pth_root,
    refresh_eigenbasis,
)
from metaopt.optimizers._sam import SharpnessAwareState, sam, scale_by_sam
from metaopt.optimizers._shampoo import Grafting, ScaleByShampooState, scale_by_shampoo, shampoo
from metaopt.optimizers._simplified_ademamix import (
    ScaleBySimplifiedAdEMAMixState,
    scale_by_simplified_ademamix,
    simplified_ademamix,
)
from metaopt.optimizers._soap import ScaleBySOAPState, scale_by_soap, soap

__all__ = [
    "Blocking",
    "Grafting",
    "MatrixRootInfo",
    "ScalarOrSchedule",
    "ScaleByAdEMAMixState",
    "ScaleBySOAPState",
    "ScaleByShampooState",
    "ScaleBySimplifiedAdEMAMixState",
    "SharpnessAwareState",
    "ademamix",
    "ademamix_alpha_warmup",
    "ademamix_b3_warmup",
    "asam",
    "eigenbasis",
    "gam",
    "gradient_regularization",
    "matrix_inverse_pth_root",
    "nnx_grad_fn",
    "prepare_cpu_environment",
    "refresh_eigenbasis",
    "sam",
    "scale_by_ademamix",
    "scale_by_asam",
    "scale_by_gam",
    "scale_by_gradient_regularization",
    "scale_by_sam",
    "scale_by_shampoo",
    "scale_by_simplified_ademamix",
    "scale_by_soap",
    "shampoo",
    "simplified_ademamix",
    "soap",
]
