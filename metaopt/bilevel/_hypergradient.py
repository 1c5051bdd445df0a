"""``value_and_hypergradient``: the implicit hypergradient with the adjoint solve as data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from metaopt.bilevel._diff import Implicit
from metaopt.bilevel._solve import SolveDiagnostics, _InnerLoop
from metaopt.implicit import CG, LinearSolveInfo, LinearSolver


class HypergradientDiagnostics(NamedTuple):
    """Both solves behind one implicit hypergradient.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from metaopt import bilevel, implicit
      >>> def inner(w, lam):
      ...     return 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w**2)
      >>> _, _, info = bilevel.value_and_hypergradient(
      ...     lambda w, lam: jnp.sum(w), inner, jnp.zeros(3), 1.0, optimizer=optax.sgd(0.2),
      ...     steps=500, tol=1e-6, linear_solver=implicit.CG(tol=1e-8))
      >>> # The inner Hessian is 2 I: CG solves the adjoint system in one iteration.
      >>> bool(info.inner.converged), int(info.adjoint.iterations), bool(info.adjoint.converged)
      (True, 1, True)

    Attributes:
      inner: the inner solve's :class:`SolveDiagnostics`.
      adjoint: the adjoint linear solve's :class:`metaopt.implicit.LinearSolveInfo`
        (iterations, verified relative residual, converged, negative curvature).
    """

    inner: SolveDiagnostics
    adjoint: LinearSolveInfo


def value_and_hypergradient(
    outer_loss: Callable[..., jax.Array],
    inner_loss: Callable[..., jax.Array],
    init: Any,
    *hparams: Any,
    optimizer: optax.GradientTransformation,
    steps: int,
    tol: float | None = None,
    linear_solver: LinearSolver | None = None,
) -> tuple[jax.Array, tuple[Any, ...], HypergradientDiagnostics]:
    r"""The outer loss at the inner solution, its implicit hypergradient, and both solves' reports.

    With :math:`x^\star` the minimizer of ``inner_loss(x, *hparams)`` found by ``optimizer``
    (as in :func:`solve`), :math:`g(x, \theta) = \nabla_x f_{\mathrm{inner}}` and
    :math:`L = ` ``outer_loss(x, *hparams)``:

    .. math::

       H u = \nabla_x L(x^\star, \theta), \qquad
       \frac{dL}{d\theta} = \nabla_\theta L(x^\star, \theta)
       - \left(\partial_\theta g(x^\star, \theta)\right)^{\!\top} u,

    with :math:`H = \partial_x g` the inner Hessian. This is the hypergradient that ``jax.grad``
    through ``solve(..., diff=Implicit(linear_solver))`` gives; computed here explicitly, the
    adjoint solve's :class:`~metaopt.implicit.LinearSolveInfo` comes back as data (``jax.grad``
    can only report it through the failure policy, because it lives in the backward pass).
    Nothing here warns: inspect the diagnostics, for example to skip an outer step whose
    ``adjoint.converged`` is False.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from metaopt import bilevel
      >>> def inner(w, lam):
      ...     return 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w**2)
      >>> def outer(w, lam):
      ...     return jnp.sum(w)
      >>> value, (grad,), info = bilevel.value_and_hypergradient(
      ...     outer, inner, jnp.zeros(2), 1.0, optimizer=optax.sgd(0.2), steps=500, tol=1e-9)
      >>> print(f"{value:.4f} {grad:.4f}")  # w* = 1/(1+lam): 2/(1+lam), -2/(1+lam)^2
      1.0000 -0.5000
      >>> bool(info.inner.converged), bool(info.adjoint.converged)
      (True, True)

    Args:
      outer_loss: ``outer_loss(params, *hparams) -> scalar``.
      inner_loss: ``inner_loss(params, *hparams) -> scalar``.
      init: starting parameters of the inner solve.
      *hparams: the hyperparameters.
      optimizer: the inner optax transform.
      steps: maximum number of inner steps.
      tol: inner gradient-norm tolerance, or None to run all ``steps`` (the inner solve is
        then reported converged by :class:`Implicit`'s default relative test).
      linear_solver: solver for the adjoint system; :class:`metaopt.implicit.CG` if None.

    Returns:
      ``(value, hypergradients, diagnostics)``; ``hypergradients`` is a tuple with one entry
      per hyperparameter.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got steps={steps!r}.")
    linear_solver = CG() if linear_solver is None else linear_solver
    optimizer = optax.with_extra_args_support(optimizer)
    inner = _InnerLoop(inner_loss, optimizer, tol, relative=True)
    frozen_init, frozen_hparams = jax.lax.stop_gradient((init, hparams))
    end = inner.run(frozen_hparams, inner.start(frozen_init), steps)
    params = end.params

    argnums = tuple(range(len(hparams) + 1))
    value, (outer_x, *outer_theta) = jax.value_and_grad(outer_loss, argnums=argnums)(
        params, *hparams
    )

    def inner_gradient(x, hparams):
        return jax.grad(inner_loss)(x, *hparams)

    def hessian_vector_product(v):
        return jax.jvp(lambda x: inner_gradient(x, hparams), (params,), (v,))[1]

    adjoint, adjoint_info = linear_solver(hessian_vector_product, outer_x)
    _, transpose = jax.vjp(lambda theta: inner_gradient(params, theta), hparams)
    (indirect,) = transpose(adjoint)
    hypergradients = tuple(
        jax.tree.map(lambda d, i: d - i, direct, ind)
        for direct, ind in zip(outer_theta, indirect, strict=True)
    )
    # The inner convergence test is Implicit()'s: tol if given, else relative (rtol 1e-3).
    default = Implicit()
    inner_info = inner.diagnostics(end, frozen_hparams, (default.rtol, default.atol))
    return value, hypergradients, HypergradientDiagnostics(inner_info, adjoint_info)
