"""iMAML and Reptile: the MAML relatives that need no backpropagation through the inner loop."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from metaopt.bilevel import FirstOrder, Implicit, solve
from metaopt.implicit import CG
from metaopt.meta._adapt import InnerLoop, LossFn, MetaDiagnostics, adapt, over_tasks
from metaopt.meta._maml import _mean


def imaml_loss(
    meta_params: Any,
    tasks: Any,
    loss_fn: LossFn,
    inner: InnerLoop,
    *,
    regularization: float | jax.Array,
    cg_steps: int = 5,
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
    with ``inner.steps``. The formula is exact at an exact inner solution: give the inner loop
    enough steps (or a ``tol``) to converge; the diagnostics' ``inner`` field reports the final
    inner-gradient norms. ``regularization`` may be a traced array and is differentiated too.

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
      cg_steps: conjugate-gradient iterations for the implicit meta-gradient (run in full,
        as in the paper; the remaining residual is not an error).

    Returns:
      ``(meta_loss, diagnostics)``.
    """
    if isinstance(regularization, int | float) and not regularization > 0:
        raise ValueError(
            f"regularization must be > 0 (the proximal term's weight lambda), got "
            f"regularization={regularization!r}."
        )
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
        raise ValueError(f"cg_steps must be a positive int, got cg_steps={cg_steps!r}.")
    # A fixed number of CG steps leaves a residual by design; it is not a failure to report.
    diff = Implicit(CG(maxiter=cg_steps, fixed_iterations=True), on_failure="ignore")

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
