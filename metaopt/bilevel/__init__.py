"""Layer 3: inner solves with a choice of how to differentiate them."""

from metaopt.bilevel._bamm import SLBAMM, SLBAMMInfo, SLBAMMState
from metaopt.bilevel._diff import FirstOrder, Implicit, Truncated, Unrolled
from metaopt.bilevel._f2sa import F2SA, F2SADiagnostics, F2SAState, F2SAWarning
from metaopt.bilevel._hypergradient import HypergradientDiagnostics, value_and_hypergradient
from metaopt.bilevel._solve import InnerSolveWarning, SolveDiagnostics, solve

__all__ = [
    "F2SA",
    "SLBAMM",
    "F2SADiagnostics",
    "F2SAState",
    "F2SAWarning",
    "FirstOrder",
    "HypergradientDiagnostics",
    "Implicit",
    "InnerSolveWarning",
    "SLBAMMInfo",
    "SLBAMMState",
    "SolveDiagnostics",
    "Truncated",
    "Unrolled",
    "solve",
    "value_and_hypergradient",
]
