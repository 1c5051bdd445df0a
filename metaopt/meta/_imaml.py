"""iMAML and Reptile: the MAML relatives that need no backpropagation through the inner loop."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from metaopt.bilevel import FirstOrder, Implicit, solve
from metaopt.implicit import CG, LinearSolver
from metaopt.meta._adapt import InnerLoop, LossFn, MetaDiagnostics, adapt, over_tasks
from metaopt.meta._maml import _mean


def imaml_loss(
    meta_params: Any,
    tasks: Any,
    loss_fn: LossFn,
    inner: InnerLoop,
    *,
    regularization: float | jax.Array,
    cg_steps: int | None = None,
    linear_solver: LinearSolver | None = None,
    on_failure: str = "warn",
) -> tuple[jax.Array, MetaDiagnostics]:
    r"""Implicit MAML's meta-loss: tasks solve a proximally regularized problem.

    .. math::  \phi_i(\theta) = \arg\min_\phi\ \ell(\phi, \mathcal{D}^s_i)
       + \frac{\lambda}{2}\lVert\phi - \theta\rVert^2, \qquad
       \mathcal{L}(\theta) = \frac1T\sum_i \ell(\phi_i(\theta), \mathcal{D}^q_i)

    The inner problem is solved by ``inner`` from :math:`\theta`, and ``jax.grad`` gives the
    implicit meta-gradient
    :math:`\frac1T\sum_i (I + H_i/\lambda)^{-1}\nabla\ell(\phi_i, \mathcal{D}^q_i)`, with
    :math:`H_i` the support loss's Hessian at :math:`\phi_i`, by ``cg_steps`` iterations of
    conjugate gradient (Hessian-vector products only), as in the paper. Memory does not grow
    with ``inner.steps``. ``regularization`` may be a traced array and is differentiated too.

    The formula is exact at an exact inner solution of a smooth loss. Two things spoil it:

    - An unsolved inner problem: give the inner loop enough steps, or a ``tol``, with a step
      size stable for the proximal problem (the paper: :math:`\lambda = 2`, 16 steps of
      gradient descent for 5-way Omniglot). The diagnostics' ``inner`` field reports the
      final inner-gradient norms. Without ``inner.tol`` the ``inner.steps`` steps are a fixed
      budget, as in the paper, whose remaining gradient is not reported as a failure
      (:class:`metaopt.bilevel.Implicit` with ``rtol=None``: ``converged`` means a finite
      gradient); with ``inner.tol`` a task that stops short of it is a failure that
      ``on_failure`` reports. (:func:`metaopt.bilevel.solve` with ``Implicit()`` checks a
      fixed budget by default, relative to the initial gradient; iMAML does not, because
      a few steps per task is the method, and on ReLU networks the inner gradient stalls
      above any relative tolerance, see below.)
    - ReLU networks: the inner loss has kinks, gradient descent stalls at an inner-gradient
      norm that more steps do not reduce, and :math:`H_i` is the Hessian on one side of
      the kinks. The meta-gradient is then an approximation (as in the paper, whose networks
      are ReLU); a smooth activation (tanh, GELU) makes it exact.

    When :math:`H_i + \lambda I` is indefinite (a non-convex support loss and a small
    :math:`\lambda`), CG stops at the first direction of negative curvature and returns the
    truncated solve (the truncated-Newton convention); ``on_failure`` decides what is said
    about it. Pass ``linear_solver=MINRES(...)`` to solve an indefinite system instead.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import meta
      >>> from metaopt.tasks import linear_regression_tasks
      >>> tasks = linear_regression_tasks(jax.random.key(0), 4, dim=3, shots=5)
      >>> loss = lambda w, batch: 0.5 * jnp.mean((batch[0] @ w - batch[1]) ** 2)
      >>> inner = meta.InnerLoop(optax.sgd(0.2), steps=200)
      >>> grads, info = jax.grad(meta.imaml_loss, has_aux=True)(
      ...     jnp.zeros(3), tasks, loss, inner, regularization=1.0)
      >>> bool(jnp.all(info.inner.gradient_norm < 1e-4))
      True

    References:
      Rajeswaran, Finn, Kakade and Levine, "Meta-Learning with Implicit Gradients",
      NeurIPS 2019.

    Args:
      meta_params: the meta-parameters :math:`\theta`.
      tasks: a batch of tasks (see :func:`maml_loss`).
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner: the :class:`InnerLoop` that solves the regularized problem.
      regularization: :math:`\lambda > 0`.
      cg_steps: conjugate-gradient iterations for the implicit meta-gradient, 5 if None (a
        fixed budget, as in the paper: the remaining residual is not an error; CG stops
        earlier only once its relative residual is below 1e-6).
      linear_solver: the solver of the adjoint system :math:`(I + H_i/\lambda)\,v = g`
        instead of ``cg_steps`` of CG, for example ``CG(tol=1e-10, maxiter=100)`` to solve it
        exactly or :class:`metaopt.implicit.MINRES` for an indefinite one.
      on_failure: what a failed adjoint solve (negative curvature; for a solver without a
        fixed budget also non-convergence), or an inner solve short of ``inner.tol``, does:
        ``"warn"``, ``"nan"``, ``"raise"`` or ``"ignore"``, as in
        :class:`metaopt.bilevel.Implicit`. Checking costs little when nothing fails (see
        ``docs/benchmarks.md``, meta suite: "warn" against "ignore").

    Returns:
      ``(meta_loss, diagnostics)``.
    """
    if isinstance(regularization, int | float) and not regularization > 0:
        raise ValueError(
            f"regularization must be > 0 (the proximal term's weight lambda), got "
            f"regularization={regularization!r}."
        )
    if cg_steps is not None and (
        isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1
    ):
        raise ValueError(f"cg_steps must be a positive int, got cg_steps={cg_steps!r}.")
    if linear_solver is None:
        linear_solver = CG(maxiter=5 if cg_steps is None else cg_steps, fixed_iterations=True)
    elif cg_steps is not None:
        raise ValueError(
            f"give cg_steps or linear_solver, not both (got cg_steps={cg_steps!r} and "
            f"linear_solver={linear_solver!r}); set the iterations on the solver."
        )
    # A fixed number of CG steps leaves a residual by design; Implicit reports only negative
    # curvature for such a solver. Likewise a fixed number of inner steps (tol None) is the
    # paper's approximate inner solve, not a failure (rtol=None); a tol makes it checked.
    diff = Implicit(linear_solver, on_failure=on_failure, rtol=None)

    def per_task(theta, task):
        def proximal(phi, theta, weight):
            distance = optax.tree.norm(optax.tree.sub(phi, theta), squared=True)
            return loss_fn(phi, task.support) + 0.5 * weight * distance

        phi, info = solve(
            proximal,
            jax.lax.stop_gradient(theta),
            theta,
            regularization,
            optimizer=inner.optimizer,
            steps=inner.steps,
            tol=inner.tol,
            diff=diff,
        )
        return loss_fn(phi, task.query), (loss_fn(theta, task.support), info)

    return _mean(over_tasks(per_task, meta_params, tasks))


def reptile_direction(
    meta_params: Any, tasks: Any, loss_fn: LossFn, inner: InnerLoop
) -> tuple[Any, MetaDiagnostics]:
    r"""Reptile's meta-update direction :math:`\theta - \frac1T\sum_i \phi_i`.

    Each task adapts :math:`\theta` on its support set to :math:`\phi_i`; nothing is
    differentiated. Feed the direction to any optax optimizer as if it were a gradient:
    ``optax.sgd(epsilon)`` gives Reptile's update
    :math:`\theta \leftarrow \theta + \epsilon(\bar\phi - \theta)`, and Adam on it is the
    variant the paper also uses.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import meta
      >>> from metaopt.tasks import linear_regression_tasks
      >>> tasks = linear_regression_tasks(jax.random.key(0), 4, dim=3, shots=5)
      >>> loss = lambda w, batch: 0.5 * jnp.mean((batch[0] @ w - batch[1]) ** 2)
      >>> direction, info = meta.reptile_direction(
      ...     jnp.zeros(3), tasks, loss, meta.InnerLoop(optax.sgd(0.1), steps=5))
      >>> direction.shape
      (3,)

    References:
      Nichol, Achiam and Schulman, "On First-Order Meta-Learning Algorithms", 2018.

    Args:
      meta_params: the meta-parameters :math:`\theta`.
      tasks: a batch of tasks (see :func:`maml_loss`); only their support sets adapt, the
        query losses after adaptation are reported in the diagnostics.
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner: the :class:`InnerLoop`.

    Returns:
      ``(direction, diagnostics)``: a pytree like ``meta_params`` and
      :class:`MetaDiagnostics`.
    """
    meta_params = jax.lax.stop_gradient(meta_params)

    def per_task(theta, task):
        phi, info = adapt(loss_fn, theta, task.support, inner, diff=FirstOrder())
        direction = jax.tree.map(jnp.subtract, theta, phi)
        return (loss_fn(phi, task.query), direction), (loss_fn(theta, task.support), info)

    (query_loss, directions), rest = over_tasks(per_task, meta_params, tasks)
    _, diagnostics = _mean((query_loss, rest))
    return jax.tree.map(lambda d: jnp.mean(d, axis=0), directions), diagnostics
