"""metaopt: optimizers as optax transforms, and optimization through optimization, in JAX.

Every public name is listed in ``__all__`` and documented in the API reference. The optimizers
(layer 1) live at the top level; the other layers are sub-packages, each an attribute of
``metaopt`` after ``import metaopt``: ``metaopt.optimizers`` (the same optimizers),
``metaopt.implicit`` (implicit differentiation and linear solvers), ``metaopt.bilevel`` (inner
solves), ``metaopt.meta`` (the MAML family) and ``metaopt.tasks`` (small problems). Those not
imported here are imported on first access (PEP 562), so ``import metaopt`` stays as cheap as
the optimizers.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from metaopt import bilevel as bilevel  # sub-packages: metaopt.bilevel.solve, ...
from metaopt import implicit as implicit
from metaopt import meta as meta
from metaopt import optimizers as optimizers
from metaopt.optimizers import *  # noqa: F403  (the optimizers' __all__ is the public API)
from metaopt.optimizers import __all__ as _optimizer_names

__version__ = "0.1.0"

__all__ = list(_optimizer_names)

# Every public sub-package, found on disk so that a new one (say metaopt.learned) is reachable
# without an edit here.
_SUBPACKAGES = tuple(
    sorted(
        module.name
        for module in _pkgutil.iter_modules(__path__)  # noqa: F405 (the package's own)
        if module.ispkg and not module.name.startswith("_")
    )
)


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"{__name__}.{name}")  # also sets the attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))
