r"""Meta-gradient estimators over truncated unrolls: truncated backprop, antithetic ES and PES.

Each estimator runs ``num_tasks`` inner training runs (an :class:`InnerProblem`) in windows of
``truncation_length`` steps and returns, per window, an estimate of the gradient of the
meta-objective with respect to the meta-parameters :math:`\theta`. The window meta-loss of a
task is

.. math:: \ell(\theta) = \frac1T \sum_{t=1}^{T} \phi(L_t), \qquad
   \phi = \log \text{ (objective="log") or the identity (objective="mean")},

the mean log training loss being the literature's meta-objective for learned optimizers. The
carried state (inner states, step counters, PES's perturbation sums) has a leading task axis: the
estimators ``vmap`` over it, and it may be sharded over a device mesh with
``NamedSharding(mesh, PartitionSpec("tasks"))``; only the task means cross devices.

Randomness: a call's ``key`` is split once, ``keys = jax.random.split(key, (num_tasks, 3))``;
step ``t`` of task ``i``'s window gets ``jax.random.fold_in(keys[i, 0], t)`` (the same for both
members of an antithetic pair), its perturbation is drawn from ``keys[i, 1]``, and a restarted
task's fresh state is ``problem.init(keys[i, 2])``.

A task whose window produced a non-finite loss, state or estimate is left out of the mean,
counted in :class:`EstimatorInfo`, and restarted fresh. The meta-gradient is not clipped here:
put ``optax.clip_by_global_norm`` in the meta-optimizer given to :func:`meta_train_step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.learned import _truncation as tr
from metaopt.learned._truncation import EstimatorInfo, InnerProblem, UnrollState


class PESState(NamedTuple):
    """Carried state of :class:`PES`; every leaf has a leading task axis.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt import learned
      >>> def step(theta, x, key):
      ...     x = x - jnp.exp(theta["log_lr"]) * x
      ...     return x, 0.5 * x**2
      >>> problem = learned.InnerProblem(lambda key: jnp.array(1.0), step, horizon=20)
      >>> estimator = learned.PES(problem, 5, std=0.01, objective="mean")
      >>> theta = {"log_lr": jnp.log(0.1)}
      >>> state = estimator.init(theta, jax.random.key(0), num_tasks=3, stagger=False)
      >>> state.perturbation_sum["log_lr"].tolist()  # theta's structure, one entry per task
      [0.0, 0.0, 0.0]
      >>> _, state, _ = estimator.gradient(theta, state, jax.random.key(1))
      >>> state.step.tolist(), bool(jnp.all(state.perturbation_sum["log_lr"] != 0))
      ([5, 5, 5], True)
      >>> bool(jnp.all(state.positive != state.negative))  # the particles have diverged
      True

    Attributes:
      positive: inner states of the particles run with :math:`\\theta + \\epsilon`.
      negative: inner states of their antithetic partners, run with :math:`\\theta - \\epsilon`.
      perturbation_sum: :math:`\\xi`, the sum of the positive particle's perturbations since
        the task started (theta's structure with a leading task axis); zero at a restart.
      step: int32 of shape ``(num_tasks,)``: inner steps each task has taken since it started.
    """

    positive: Any
    negative: Any
    perturbation_sum: Any
    step: jax.Array


def _unroll_init(estimator, key: jax.Array, num_tasks: int, stagger: bool) -> UnrollState:
    tr.check_num_tasks(num_tasks)
    init_key, stagger_key = jax.random.split(key)
    inner = tr.fresh_tasks(estimator.problem, init_key, num_tasks)
    step = tr.initial_steps(
        estimator.problem, estimator.truncation_length, stagger_key, num_tasks, stagger
    )
    return UnrollState(inner=inner, step=step)


_INIT_DOC = """Carried state of ``num_tasks`` fresh tasks.

    With ``stagger=True`` (the default) task ``i`` starts at step :math:`k_i T`, :math:`k_i`
    uniform over the horizon's windows, so the tasks' windows fall at different points of their
    runs and the meta-gradient of one call mixes early and late training (as in the
    literature); a staggered task's first run is then shorter than the horizon (it starts fresh
    at step :math:`k_i T`), later runs are whole. ``stagger=False`` starts every task at step 0.

    Args:
      theta: the meta-parameters (their structure, for the perturbation sums).
      key: a PRNG key.
      num_tasks: the task batch (the leading axis of every leaf of the state).
      stagger: whether to spread the tasks' starting steps over the horizon.

    Returns:
      The carried state.
"""


@dataclasses.dataclass(frozen=True)
class TruncatedBackprop:
    r"""Truncated backpropagation through time over windows of ``truncation_length`` steps.

    .. math:: \hat g = \frac{1}{|F|}\sum_{i\in F} \nabla_\theta\, \ell_i(\theta;\,
       \mathrm{sg}(s_i)),

    the exact gradient of each task's window meta-loss from its carried inner state
    :math:`s_i`, held constant (stop-gradient), averaged over the tasks :math:`F` whose window
    stayed finite; the inner states after the window are carried to the next call. Cost: one
    forward and one backward pass through ``truncation_length`` steps per task, memory for
    their activations. Biased: it ignores how :math:`\theta` shaped the carried state, so short
    windows favour greedy behaviour (Wu, Ren, Liao and Grosse, "Understanding short-horizon
    bias in stochastic meta-optimization", ICLR 2018).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt import learned
      >>> def step(log_lr, x, key):  # gradient descent on 0.5 * x^2
      ...     x = x - jnp.exp(log_lr) * x
      ...     return x, 0.5 * x**2
      >>> problem = learned.InnerProblem(lambda key: jnp.array(1.0), step, horizon=20)
      >>> estimator = learned.TruncatedBackprop(problem, truncation_length=5, objective="mean")
      >>> theta = jnp.log(0.1)
      >>> state = estimator.init(theta, jax.random.key(0), num_tasks=4, stagger=False)
      >>> grad, state, info = jax.jit(estimator.gradient)(theta, state, jax.random.key(1))
      >>> # Closed forms: means over t = 1..5 of -lr t (1 - lr)^(2t - 1) and (1 - lr)^(2t) / 2.
      >>> print(f"{grad:.4f} {info.meta_loss:.4f}", state.step.tolist())
      -0.1596 0.2777 [5, 5, 5, 5]

    Attributes:
      problem: the :class:`InnerProblem`.
      truncation_length: inner steps per window (:math:`T`); must divide ``problem.horizon``
        so that no window straddles a restart.
      objective: ``"log"`` (mean log loss; losses must be positive) or ``"mean"``.
    """

    problem: InnerProblem
    truncation_length: int
    objective: str = "log"

    def __post_init__(self):
        tr.check_configuration(self.problem, self.truncation_length, self.objective)

    def init(
        self, theta: Any, key: jax.Array, num_tasks: int, *, stagger: bool = True
    ) -> UnrollState:
        del theta  # the state does not depend on it
        return _unroll_init(self, key, num_tasks, stagger)

    init.__doc__ = _INIT_DOC

    def gradient(
        self, theta: Any, state: UnrollState, key: jax.Array
    ) -> tuple[Any, UnrollState, EstimatorInfo]:
        """One window of every task: the meta-gradient estimate and the next carried state.

        Args:
          theta: the meta-parameters.
          state: the carried state from :meth:`init` or the previous call.
          key: a PRNG key for this window; ``jax.random.split(key, (num_tasks, 3))[i]`` holds
            task ``i``'s window key (step ``t`` uses ``fold_in(window_key, t)``), perturbation
            key and restart key (``problem.init`` of a restarted task).

        Returns:
          ``(grad, state, info)``: the estimate (theta's structure, mean over finite tasks),
          the next carried state, and an :class:`EstimatorInfo`.
        """
        keys = tr.task_keys(key, tr.num_tasks_of(state.step))

        def per_task(inner, task_key):
            window = jax.value_and_grad(tr.window, argnums=3, has_aux=True)
            (loss, (inner, finite)), grad = window(
                self.problem,
                self.truncation_length,
                self.objective,
                theta,
                jax.lax.stop_gradient(inner),
                task_key,
            )
            return grad, loss, inner, finite & tr.all_finite(grad)

        grads, losses, inner, finite = jax.vmap(per_task)(state.inner, keys[:, 0])
        inner, step, restarted = tr.restart(
            self.problem, keys[:, 2], inner, state.step, self.truncation_length, finite
        )
        info = tr.summarize(losses, finite, restarted)
        return tr.mean_over_finite(grads, finite), UnrollState(inner, step), info


@dataclasses.dataclass(frozen=True)
class AntitheticES:
    r"""Truncated evolution strategies with antithetic pairs, over windows of ``truncation_length``.

    .. math:: \hat g = \frac{1}{|F|}\sum_{i\in F} \frac{\epsilon_i}{2\sigma^2}
       \bigl(\ell_i(\theta+\epsilon_i; s_i) - \ell_i(\theta-\epsilon_i; s_i)\bigr),
       \qquad \epsilon_i \sim \mathcal N(0, \sigma^2 I),

    both members of a pair run from the task's carried state :math:`s_i` with the same data
    (keys), so a loss offset common to both cancels exactly. It estimates the gradient of the
    Gaussian-smoothed window meta-loss, with no backward pass (so it goes through
    non-differentiable or chaotic inner steps), and shares truncated backprop's bias: the
    carried state is treated as fixed. The carried state advances with the unperturbed
    :math:`\theta` (a third run of the window), so the tasks follow the trajectory of the
    meta-parameters being trained: cost three forward passes of ``truncation_length`` steps per
    task (PES needs two), memory of one.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt import learned
      >>> def step(log_lr, x, key):
      ...     x = x - jnp.exp(log_lr) * x
      ...     return x, 0.5 * x**2
      >>> problem = learned.InnerProblem(lambda key: jnp.array(1.0), step, horizon=20)
      >>> estimator = learned.AntitheticES(problem, 5, std=0.01, objective="mean")
      >>> theta = jnp.log(0.1)
      >>> state = estimator.init(theta, jax.random.key(0), num_tasks=1000)
      >>> grad, state, info = jax.jit(estimator.gradient)(theta, state, jax.random.key(1))
      >>> bool(grad < 0), int(info.num_nonfinite)  # a larger step size lowers the loss
      (True, 0)

    Attributes:
      problem: the :class:`InnerProblem`.
      truncation_length: inner steps per window; must divide ``problem.horizon``.
      std: :math:`\sigma`, the perturbations' standard deviation (the smoothing scale).
      objective: ``"log"`` (mean log loss; losses must be positive) or ``"mean"``.

    References:
      Salimans, Ho, Chen, Sidor and Sutskever, "Evolution strategies as a scalable alternative
      to reinforcement learning", 2017.
    """

    problem: InnerProblem
    truncation_length: int
    std: float
    objective: str = "log"

    def __post_init__(self):
        tr.check_configuration(self.problem, self.truncation_length, self.objective)
        tr.check_std(self.std)

    def init(
        self, theta: Any, key: jax.Array, num_tasks: int, *, stagger: bool = True
    ) -> UnrollState:
        del theta
        return _unroll_init(self, key, num_tasks, stagger)

    init.__doc__ = _INIT_DOC

    def gradient(
        self, theta: Any, state: UnrollState, key: jax.Array
    ) -> tuple[Any, UnrollState, EstimatorInfo]:
        """One window of every task: the meta-gradient estimate and the next carried state.

        Args:
          theta: the meta-parameters.
          state: the carried state from :meth:`init` or the previous call.
          key: a PRNG key for this window; ``jax.random.split(key, (num_tasks, 3))[i]`` holds
            task ``i``'s window key (step ``t`` uses ``fold_in(window_key, t)``), perturbation
            key and restart key (``problem.init`` of a restarted task).

        Returns:
          ``(grad, state, info)``; ``info.meta_loss`` is the unperturbed window's.
        """
        keys = tr.task_keys(key, tr.num_tasks_of(state.step))

        def per_task(inner, task_key, noise_key):
            eps = tr.perturbation(noise_key, theta, self.std)
            thetas = jax.tree.map(lambda t, e: jnp.stack([t + e, t - e, t]), theta, eps)
            run = lambda th: tr.window(
                self.problem, self.truncation_length, self.objective, th, inner, task_key
            )
            losses, (inners, finite) = jax.vmap(run)(thetas)
            scale = (losses[0] - losses[1]) / (2 * self.std**2)
            grad = jax.tree.map(lambda e: e * scale.astype(e.dtype), eps)
            center = jax.tree.map(lambda x: x[2], inners)
            return grad, losses[2], center, jnp.all(finite) & tr.all_finite(grad)

        grads, losses, inner, finite = jax.vmap(per_task)(state.inner, keys[:, 0], keys[:, 1])
        inner, step, restarted = tr.restart(
            self.problem, keys[:, 2], inner, state.step, self.truncation_length, finite
        )
        info = tr.summarize(losses, finite, restarted)
        return tr.mean_over_finite(grads, finite), UnrollState(inner, step), info


@dataclasses.dataclass(frozen=True)
class PES:
    r"""Persistent evolution strategies: unbiased over the whole horizon from truncated windows.

    Each task runs an antithetic pair of particles, each with its own inner state, perturbed by
    :math:`\pm\epsilon_w` (fresh in every window :math:`w`), and keeps the sum of the positive
    particle's perturbations since the task started, :math:`\xi = \sum_{v \le w}\epsilon_v`:

    .. math:: \hat g = \frac{1}{|F|}\sum_{i\in F} \frac{\xi_i}{2\sigma^2}
       \bigl(\ell_i^+ - \ell_i^-\bigr), \qquad \epsilon \sim \mathcal N(0, \sigma^2 I),

    with :math:`\ell^\pm` the window meta-losses of the two particles. Because :math:`\xi`
    accounts for every perturbation that shaped the particles' states, the sum of a task's
    window estimates over its run is an unbiased estimate of the gradient of the sum of its
    (Gaussian-smoothed) window meta-losses, which truncated backprop and truncated ES are not;
    the price is a variance that grows with the number of windows. :math:`\xi` and both
    particles restart at the horizon and after a non-finite window. Cost: two forward passes of
    ``truncation_length`` steps per task; state: two inner states and one theta per task.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt import learned
      >>> def step(log_lr, x, key):
      ...     x = x - jnp.exp(log_lr) * x
      ...     return x, 0.5 * x**2
      >>> problem = learned.InnerProblem(lambda key: jnp.array(1.0), step, horizon=20)
      >>> estimator = learned.PES(problem, 5, std=0.01, objective="mean")
      >>> theta = jnp.log(0.1)
      >>> state = estimator.init(theta, jax.random.key(0), num_tasks=1000)
      >>> grad, state, info = jax.jit(estimator.gradient)(theta, state, jax.random.key(1))
      >>> state.perturbation_sum.shape, bool(grad < 0)
      ((1000,), True)

    Attributes:
      problem: the :class:`InnerProblem`.
      truncation_length: inner steps per window; must divide ``problem.horizon``.
      std: :math:`\sigma`, the perturbations' standard deviation (the smoothing scale).
      objective: ``"log"`` (mean log loss; losses must be positive) or ``"mean"``.

    References:
      Vicol, Metz and Sohl-Dickstein, "Unbiased gradient estimation in unrolled computation
      graphs with persistent evolution strategies", ICML 2021.
    """

    problem: InnerProblem
    truncation_length: int
    std: float
    objective: str = "log"

    def __post_init__(self):
        tr.check_configuration(self.problem, self.truncation_length, self.objective)
        tr.check_std(self.std)

    def init(self, theta: Any, key: jax.Array, num_tasks: int, *, stagger: bool = True) -> PESState:
        state = _unroll_init(self, key, num_tasks, stagger)
        xi = jax.tree.map(
            lambda t: jnp.zeros((num_tasks, *jnp.shape(t)), jnp.result_type(t)), theta
        )
        # Both particles of a task start from the same fresh state.
        return PESState(state.inner, state.inner, xi, state.step)

    init.__doc__ = _INIT_DOC

    def gradient(
        self, theta: Any, state: PESState, key: jax.Array
    ) -> tuple[Any, PESState, EstimatorInfo]:
        """One window of every task: the meta-gradient estimate and the next carried state.

        Args:
          theta: the meta-parameters.
          state: the carried state from :meth:`init` or the previous call.
          key: a PRNG key for this window; ``jax.random.split(key, (num_tasks, 3))[i]`` holds
            task ``i``'s window key (step ``t`` uses ``fold_in(window_key, t)``), perturbation
            key and restart key (``problem.init`` of a restarted task).

        Returns:
          ``(grad, state, info)``; ``info.meta_loss`` is the mean of the two particles'.
        """
        keys = tr.task_keys(key, tr.num_tasks_of(state.step))

        def per_task(positive, negative, xi, task_key, noise_key):
            eps = tr.perturbation(noise_key, theta, self.std)
            xi = jax.tree.map(jnp.add, xi, eps)
            thetas = jax.tree.map(lambda t, e: jnp.stack([t + e, t - e]), theta, eps)
            inners = jax.tree.map(lambda p, n: jnp.stack([p, n]), positive, negative)
            run = lambda th, inner: tr.window(
                self.problem, self.truncation_length, self.objective, th, inner, task_key
            )
            losses, (inners, finite) = jax.vmap(run)(thetas, inners)
            scale = (losses[0] - losses[1]) / (2 * self.std**2)
            grad = jax.tree.map(lambda x: x * scale.astype(x.dtype), xi)
            positive, negative = (jax.tree.map(lambda x, i=i: x[i], inners) for i in (0, 1))
            finite = jnp.all(finite) & tr.all_finite(grad)
            return grad, jnp.mean(losses), positive, negative, xi, finite

        grads, losses, positive, negative, xi, finite = jax.vmap(per_task)(
            state.positive, state.negative, state.perturbation_sum, keys[:, 0], keys[:, 1]
        )
        positive, step, restarted = tr.restart(
            self.problem, keys[:, 2], positive, state.step, self.truncation_length, finite
        )
        # The restarted tasks' particles share their fresh state, and their xi is zeroed.
        negative = _select(restarted, positive, negative)
        xi = _select(restarted, jax.tree.map(jnp.zeros_like, xi), xi)
        info = tr.summarize(losses, finite, restarted)
        return tr.mean_over_finite(grads, finite), PESState(positive, negative, xi, step), info


def _select(mask: jax.Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(tr._task_mask(mask, a), a, b), on_true, on_false)


Estimator = TruncatedBackprop | AntitheticES | PES

MetaTrainStep = Callable[
    [Any, optax.OptState, Any, jax.Array], tuple[Any, optax.OptState, Any, EstimatorInfo]
]


def meta_train_step(
    estimator: Estimator, meta_optimizer: optax.GradientTransformation
) -> MetaTrainStep:
    """One meta-training step: an estimator's meta-gradient, then the meta-optimizer's update.

    Returns the pure function ``step(theta, meta_opt_state, estimator_state, key) -> (theta,
    meta_opt_state, estimator_state, info)``, to ``jax.jit`` (with shardings on a mesh). The
    estimators do not clip: put ``optax.clip_by_global_norm`` first in ``meta_optimizer``, as
    learned-optimizer meta-training does, so that one wild window cannot throw theta away.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import learned
      >>> def step(log_lr, x, key):  # learn the step size of gradient descent on 0.5 * x^2
      ...     x = x - jnp.exp(log_lr) * x
      ...     return x, 0.5 * x**2 + 1e-3
      >>> problem = learned.InnerProblem(lambda key: jnp.array(1.0), step, horizon=20)
      >>> estimator = learned.PES(problem, truncation_length=5, std=0.01)
      >>> meta_optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))
      >>> train = jax.jit(learned.meta_train_step(estimator, meta_optimizer))
      >>> theta = jnp.log(0.01)
      >>> opt_state = meta_optimizer.init(theta)
      >>> state = estimator.init(theta, jax.random.key(0), num_tasks=8)
      >>> for key in jax.random.split(jax.random.key(1), 100):
      ...     theta, opt_state, state, info = train(theta, opt_state, state, key)
      >>> bool(jnp.exp(theta) > 0.5)  # from 0.01 towards the best step size, 1
      True

    Args:
      estimator: a :class:`TruncatedBackprop`, :class:`AntitheticES` or :class:`PES`.
      meta_optimizer: the optax transform applied to the meta-gradient.

    Returns:
      The step function; its ``info`` is the estimator's :class:`EstimatorInfo`.
    """
    if not callable(getattr(estimator, "gradient", None)):
        raise TypeError(
            f"estimator must be a metaopt.learned estimator such as PES(problem, 10, std=0.01), "
            f"got estimator={estimator!r}."
        )
    if not isinstance(meta_optimizer, optax.GradientTransformation):
        raise TypeError(
            f"meta_optimizer must be an optax GradientTransformation such as optax.chain("
            f"optax.clip_by_global_norm(1.0), optax.adam(1e-3)), got {meta_optimizer!r}."
        )

    def step(theta, meta_opt_state, estimator_state, key):
        grad, estimator_state, info = estimator.gradient(theta, estimator_state, key)
        updates, meta_opt_state = meta_optimizer.update(grad, meta_opt_state, theta)
        return optax.apply_updates(theta, updates), meta_opt_state, estimator_state, info

    return step
