"""MAML, first-order MAML, ANIL and Meta-SGD: meta-losses whose gradient is the meta-gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.bilevel import FirstOrder, Unrolled
from metaopt.meta._adapt import InnerLoop, LossFn, MetaDiagnostics, adapt, over_tasks


def maml_loss(
    meta_params: Any,
    tasks: Any,
    loss_fn: LossFn,
    inner: InnerLoop,
    *,
    first_order: bool = False,
    checkpoint: bool | int = False,
    adapted: Callable[[Any], Any] | None = None,
) -> tuple[jax.Array, MetaDiagnostics]:
    r"""MAML's meta-loss: the mean query loss after each task adapts the meta-parameters.

    .. math::  \mathcal{L}(\theta) = \frac{1}{T}\sum_{i=1}^{T}
       \ell\big(\phi_i(\theta), \mathcal{D}^{q}_i\big), \qquad
       \phi_i(\theta) = \mathrm{Adapt}\big(\theta, \mathcal{D}^{s}_i\big)

    with the adaptation ``inner.steps`` steps of ``inner.optimizer`` on the support set
    :math:`\mathcal{D}^s_i` (gradient descent in the paper). ``jax.grad`` of this function is
    the meta-gradient: exact, second order, by backpropagation through the inner steps (the
    :class:`~metaopt.bilevel.Unrolled` mode of :func:`metaopt.bilevel.solve`); with
    ``first_order=True`` the Jacobian :math:`\partial\phi_i/\partial\theta` is replaced by the
    identity (first-order MAML, :func:`fomaml_loss`). Tasks are ``vmap``-ped.

    Example: one step of MAML on two linear tasks.

      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import meta
      >>> from metaopt.tasks import linear_regression_tasks
      >>> tasks = linear_regression_tasks(jax.random.key(0), 4, dim=3, shots=5)
      >>> loss = lambda w, batch: 0.5 * jnp.mean((batch[0] @ w - batch[1]) ** 2)
      >>> inner = meta.InnerLoop(optax.sgd(0.1), steps=3)
      >>> grads, info = jax.grad(meta.maml_loss, has_aux=True)(jnp.zeros(3), tasks, loss, inner)
      >>> grads.shape, info.query_loss.shape
      ((3,), (4,))

    References:
      Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
      Networks", ICML 2017.

    Args:
      meta_params: the meta-parameters :math:`\theta` (the shared initialization).
      tasks: a batch of tasks with ``support`` and ``query`` fields (a
        :class:`metaopt.tasks.Task` whose arrays have a leading task axis).
      loss_fn: ``loss_fn(params, batch) -> scalar`` on a support or query set.
      inner: the :class:`InnerLoop`.
      first_order: drop the second-order term (FOMAML).
      checkpoint: with second order, recompute the inner steps in the backward pass instead of
        storing them: True for segments of about :math:`\sqrt{K}` steps, or a segment length.
      adapted: which leaves of ``meta_params`` the inner loop adapts (see :func:`adapt`);
        None adapts all of them.

    Returns:
      ``(meta_loss, diagnostics)``: a scalar and :class:`MetaDiagnostics`.
    """
    if first_order and checkpoint:
        raise ValueError(
            "checkpoint applies to second-order MAML only (first order stores nothing to "
            "recompute); drop checkpoint or set first_order=False."
        )
    diff = FirstOrder() if first_order else Unrolled(checkpoint)

    def per_task(params, task):
        adapted_params, info = adapt(
            loss_fn, params, task.support, inner, diff=diff, adapted=adapted
        )
        return loss_fn(adapted_params, task.query), (loss_fn(params, task.support), info)

    return _mean(over_tasks(per_task, meta_params, tasks))


def fomaml_loss(
    meta_params: Any,
    tasks: Any,
    loss_fn: LossFn,
    inner: InnerLoop,
    *,
    adapted: Callable[[Any], Any] | None = None,
) -> tuple[jax.Array, MetaDiagnostics]:
    r"""First-order MAML: :func:`maml_loss` with :math:`\partial\phi_i/\partial\theta = I`.

    Its gradient is :math:`\frac1T\sum_i \nabla\ell(\phi_i, \mathcal{D}^q_i)`, the query
    gradient at the adapted parameters: no second derivatives, and backward memory that does
    not grow with the number of inner steps.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import meta
      >>> from metaopt.tasks import sinusoid_tasks
      >>> tasks = sinusoid_tasks(jax.random.key(0), 2, shots=5)
      >>> loss = lambda w, batch: jnp.mean((batch[0] * w - batch[1]) ** 2)
      >>> inner = meta.InnerLoop(optax.sgd(0.01), steps=2)
      >>> value, info = meta.fomaml_loss(jnp.ones(1), tasks, loss, inner)
      >>> value.shape, info.inner.steps.tolist()
      ((), [2, 2])

    References:
      Finn, Abbeel and Levine, ICML 2017, section 5.2 (the first-order approximation).

    Args:
      meta_params: the meta-parameters.
      tasks: a batch of tasks (see :func:`maml_loss`).
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner: the :class:`InnerLoop`.
      adapted: which leaves the inner loop adapts (see :func:`adapt`).

    Returns:
      ``(meta_loss, diagnostics)``.
    """
    return maml_loss(meta_params, tasks, loss_fn, inner, first_order=True, adapted=adapted)


def anil_loss(
    meta_params: Any,
    tasks: Any,
    loss_fn: LossFn,
    inner: InnerLoop,
    *,
    head: Callable[[Any], Any],
    first_order: bool = False,
) -> tuple[jax.Array, MetaDiagnostics]:
    r"""ANIL (almost no inner loop): MAML in which tasks adapt only the head.

    The body (feature extractor) is fixed during adaptation and learned by the meta-gradient
    alone, which flows to it through the adapted head (second order) or only through the query
    loss (``first_order=True``).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import meta
      >>> from metaopt.tasks import linear_regression_tasks
      >>> tasks = linear_regression_tasks(jax.random.key(0), 4, dim=3, shots=5)
      >>> def loss(p, batch):
      ...     return 0.5 * jnp.mean(((batch[0] @ p["body"]) @ p["head"] - batch[1]) ** 2)
      >>> params = {"body": jnp.eye(3), "head": jnp.zeros(3)}
      >>> head = lambda p: {"body": False, "head": True}
      >>> grads, _ = jax.grad(meta.anil_loss, has_aux=True)(
      ...     params, tasks, loss, meta.InnerLoop(optax.sgd(0.1), 2), head=head)
      >>> sorted(grads)
      ['body', 'head']

    References:
      Raghu, Raghu, Bengio and Vinyals, "Rapid Learning or Feature Reuse? Towards
      Understanding the Effectiveness of MAML", ICLR 2020.

    Args:
      meta_params: the meta-parameters, body and head.
      tasks: a batch of tasks (see :func:`maml_loss`).
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner: the :class:`InnerLoop`.
      head: a function of ``meta_params`` returning a pytree of booleans with its structure,
        True on the head's leaves.
      first_order: drop the second-order term.

    Returns:
      ``(meta_loss, diagnostics)``.
    """
    return maml_loss(meta_params, tasks, loss_fn, inner, first_order=first_order, adapted=head)


class MetaSGDParams(NamedTuple):
    """Meta-SGD's meta-parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt import meta
      >>> from metaopt.tasks import linear_regression_tasks
      >>> tasks = linear_regression_tasks(jax.random.key(0), 4, dim=3, shots=5)
      >>> loss = lambda w, batch: 0.5 * jnp.mean((batch[0] @ w - batch[1]) ** 2)
      >>> theta = meta.MetaSGDParams(params=jnp.zeros(3), learning_rates=jnp.full(3, 0.1))
      >>> # A pytree: its meta-gradient has the same two fields, so one optax step updates both.
      >>> grads, _ = jax.grad(meta.metasgd_loss, has_aux=True)(theta, tasks, loss)
      >>> type(grads).__name__, grads.params.shape, grads.learning_rates.shape
      ('MetaSGDParams', (3,), (3,))

    Attributes:
      params: the initialization :math:`\\theta`.
      learning_rates: per-parameter inner learning rates :math:`\\alpha`, the structure and
        shapes of ``params``.
    """

    params: Any
    learning_rates: Any


def metasgd_init(params: Any, learning_rate: float) -> MetaSGDParams:
    """Meta-SGD's meta-parameters: ``params`` and every inner learning rate at ``learning_rate``.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt import meta
      >>> print(meta.metasgd_init(jnp.zeros(2), 0.01).learning_rates)
      [0.01 0.01]

    Args:
      params: the initial parameters.
      learning_rate: the initial inner learning rate of every parameter.

    Returns:
      :class:`MetaSGDParams`.
    """
    return MetaSGDParams(params, jax.tree.map(lambda p: jnp.full_like(p, learning_rate), params))


def metasgd_loss(
    meta_params: MetaSGDParams,
    tasks: Any,
    loss_fn: LossFn,
    *,
    steps: int = 1,
) -> tuple[jax.Array, MetaDiagnostics]:
    r"""Meta-SGD's meta-loss: MAML with a learned inner learning rate per parameter.

    .. math::  \phi_i = \theta - \alpha \odot \nabla_\theta\,\ell(\theta, \mathcal{D}^s_i)

    (repeated ``steps`` times), and the gradient with respect to both :math:`\theta` and
    :math:`\alpha` is exact, second order. The learning rates may go negative, as in the
    paper; nothing constrains them.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt import meta
      >>> from metaopt.tasks import linear_regression_tasks
      >>> tasks = linear_regression_tasks(jax.random.key(0), 4, dim=3, shots=5)
      >>> loss = lambda w, batch: 0.5 * jnp.mean((batch[0] @ w - batch[1]) ** 2)
      >>> grads, _ = jax.grad(meta.metasgd_loss, has_aux=True)(
      ...     meta.metasgd_init(jnp.zeros(3), 0.1), tasks, loss)
      >>> grads.learning_rates.shape
      (3,)

    References:
      Li, Zhou, Chen and Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017.

    Args:
      meta_params: :class:`MetaSGDParams` (see :func:`metasgd_init`).
      tasks: a batch of tasks (see :func:`maml_loss`).
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      steps: inner steps.

    Returns:
      ``(meta_loss, diagnostics)``.
    """
    if not isinstance(meta_params, MetaSGDParams):
        raise TypeError(
            f"meta_params must be a MetaSGDParams (see meta.metasgd_init(params, "
            f"learning_rate)), got {type(meta_params).__name__}."
        )

    def per_task(meta, task):
        inner = InnerLoop(_scale_by_learned_rates(meta.learning_rates), steps)
        adapted_params, info = adapt(loss_fn, meta.params, task.support, inner)
        return loss_fn(adapted_params, task.query), (loss_fn(meta.params, task.support), info)

    return _mean(over_tasks(per_task, meta_params, tasks))


def _scale_by_learned_rates(learning_rates: Any) -> optax.GradientTransformation:
    """``-learning_rates * gradient`` leaf by leaf: an SGD step with one rate per parameter."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda rate, g: -rate * g, learning_rates, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _mean(mapped) -> tuple[jax.Array, MetaDiagnostics]:
    query_loss, (support_loss, info) = mapped
    return jnp.mean(query_loss), MetaDiagnostics(query_loss, support_loss, info)
