"""metaopt: optimizers as optax transforms, and optimization through optimization, in JAX.

Every public name is listed in ``__all__`` and documented in the API reference. The optimizers
(layer 1) live at the top level; the other layers are sub-packages: ``metaopt.implicit``
(implicit differentiation and linear solvers), ``metaopt.bilevel`` (inner solves),
``metaopt.meta`` (the MAML family) and
``metaopt.tasks`` (small problems).
"""

from metaopt import bilevel as bilevel  # sub-packages: metaopt.bilevel.solve, ...
from metaopt import implicit as implicit
from metaopt import meta as meta
from metaopt.optimizers import *  # noqa: F403  (the optimizers' __all__ is the public API)
from metaopt.optimizers import __all__ as _optimizer_names

__version__ = "0.1.0"

__all__ = list(_optimizer_names)
