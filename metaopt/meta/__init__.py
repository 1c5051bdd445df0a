"""Layer 4: meta-learning on :func:`metaopt.bilevel.solve` (the MAML family).

Every algorithm is a pure function of the meta-parameters and a batch of tasks (a
:class:`metaopt.tasks.Task` whose arrays have a leading task axis) returning a meta-loss whose
``jax.grad`` is the meta-gradient, or, for Reptile, the meta-update direction. Tasks are
``vmap``-ped; :func:`shard_tasks` spreads them over a device mesh.
"""

from metaopt.meta._adapt import InnerLoop, MetaDiagnostics, adapt, shard_tasks
from metaopt.meta._flax import nnx_loss
from metaopt.meta._imaml import imaml_loss, reptile_direction
from metaopt.meta._interpolation import interpolate_tasks
from metaopt.meta._maml import (
    MetaSGDParams,
    anil_loss,
    fomaml_loss,
    maml_loss,
    metasgd_init,
    metasgd_loss,
)

__all__ = [
    "InnerLoop",
    "MetaDiagnostics",
    "MetaSGDParams",
    "adapt",
    "anil_loss",
    "fomaml_loss",
    "imaml_loss",
    "interpolate_tasks",
    "maml_loss",
    "metasgd_init",
    "metasgd_loss",
    "nnx_loss",
    "reptile_direction",
    "shard_tasks",
]
