"""Layer 2: implicit differentiation and the linear solvers of its adjoint systems."""

from metaopt.implicit._bicgstab import BiCGSTAB
from metaopt.implicit._cg import CG, NormalCG
from metaopt.implicit._custom_root import custom_fixed_point, custom_root
from metaopt.implicit._factorized import Factorized
from metaopt.implicit._failure import ImplicitDifferentiationWarning
from metaopt.implicit._gmres import GMRES
from metaopt.implicit._linear_solve_info import LinearSolveInfo, LinearSolver
from metaopt.implicit._minres import MINRES
from metaopt.implicit._neumann import Dense, Neumann
from metaopt.implicit._root_products import root_jvp, root_vjp

__all__ = [
    "CG",
    "GMRES",
    "MINRES",
    "BiCGSTAB",
    "Dense",
    "Factorized",
    "ImplicitDifferentiationWarning",
    "LinearSolveInfo",
    "LinearSolver",
    "Neumann",
    "NormalCG",
    "custom_fixed_point",
    "custom_root",
    "root_jvp",
    "root_vjp",
]
