"""metaopt: optimizers as optax transforms, and optimization through optimization, in JAX.

Every public name is listed in ``__all__`` and documented in the API reference.
"""

from metaopt.optimizers import *  # noqa: F403  (the optimizers' __all__ is the public API)
from metaopt.optimizers import __all__ as _optimizer_names

__version__ = "0.1.0"

__all__ = list(_optimizer_names)
