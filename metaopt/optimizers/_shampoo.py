"""Shampoo: Kronecker-factored full-matrix preconditioning, blocked, grafted and distributed.

Gupta, Koren and Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018;
Anil, Gupta, Koren, Regan and Singer, "Scalable Second Order Optimization for Deep Learning",
2020 (arXiv:2002.09018); Shi et al., "A Distributed Data-Parallel PyTorch Implementation of the
Distributed Shampoo Optimizer for Training Neural Networks At-Scale", 2023 (arXiv:2309.06497).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.optimizers import _common
from metaopt.optimizers._blocking import Blocking, BlockPlan, grid_sharding, place, plan_blocks
from metaopt.optimizers._common import ScalarOrSchedule
from metaopt.optimizers._shampoo_config import Grafting, check_whole, exponent_rule
from metaopt.optimizers._shampoo_roots import stacked_inverse_roots
from metaopt.optimizers._tree_checks import (
    STATE_FOR_OTHER_PARAMS,
    NotParameterShaped,
    check_matching,
    is_params_placeholder,
)


class ScaleByShampooState(NamedTuple):
    """State of :func:`scale_by_shampoo`.

    ``optax.tree_map_params`` maps its function over ``mu`` and ``graft`` (the copies of the
    parameter tree) and leaves ``statistics`` and ``preconditioners`` alone: their arrays do not
    have the parameters' shapes, so ``transform_non_params`` receives each of the two trees
    whole.

    Example:
      >>> import jax.numpy as jnp, metaopt
      >>> state = metaopt.scale_by_shampoo().init({"w": jnp.zeros((4, 3))})
      >>> # One Kronecker factor per axis of w, each [*block_grid, b, b] (a single block here).
      >>> [s.shape for s in state.statistics["w"]]
      [(1, 1, 4, 4), (1, 1, 3, 3)]
      >>> int(state.count), int(state.root_failures), int(state.skipped_steps)
      (0, 0, 0)

    Attributes:
      count: steps taken (int32); a skipped step (non-finite gradient) does not count.
      mu: first moment (EMA of the gradient with rate ``b1``), like the parameters.
      graft: the grafted method's second moment, like the parameters (``()`` for ``"sgd"`` and
        ``"none"``).
      statistics: a tree with the parameters' structure; at each parameter's place a tuple
        with, per preconditioned axis, the Kronecker factor statistics
        ``[*block_grid, b, b]`` in ``statistics_dtype`` (``()`` for a tensor with no
        preconditioned axis).
      preconditioners: their inverse roots, same layout, in ``preconditioner_dtype``.
      root_failures: inverse roots rejected so far (non-finite, or error above
        ``root_error_threshold``); each rejected block kept its previous preconditioner.
      root_error: the largest relative error of the roots computed at the last root step.
      skipped_steps: steps skipped because the gradient was not finite.
    """

    count: jax.Array
    mu: optax.Updates
    graft: optax.Updates
    statistics: Any
    preconditioners: Any
    root_failures: jax.Array
    root_error: jax.Array
    skipped_steps: jax.Array


@_common.renamed_arguments({"epsilon": "eps_root"})
def scale_by_shampoo(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    *,
    nesterov: bool = False,
    damping: ScalarOrSchedule = 1e-6,
    eps_root: ScalarOrSchedule = 1e-12,
    exponent_override: int | Sequence[int] | None = None,
    blocking: Blocking | None = None,
    grafting: Grafting | None = None,
    statistics_frequency: int = 1,
    preconditioning_frequency: int = 20,
    start_preconditioning_step: int | None = None,
    root_method: Literal["eigh", "newton"] = "eigh",
    root_error_threshold: float | None = 0.5,
    statistics_dtype: Any = None,
    preconditioner_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients with blocked, grafted Shampoo (without learning rate or weight decay).

    For a parameter block :math:`W` with gradient :math:`G_t` (``t = 1, 2, ...``) and
    preconditioned axes :math:`i = 1..c` (a matrix has two, the left and the right):

    .. math::

       m_t &= \beta_1 m_{t-1} + (1-\beta_1) G_t, \qquad \hat m_t = m_t / (1-\beta_1^t) \\
       L^{(i)} &\leftarrow \beta_2 L^{(i)} + (1-\beta_2)\, G_{(i)} G_{(i)}^\top
         \quad\text{every } k_s \text{ steps} \\
       P^{(i)} &= \big(\hat L^{(i)} + (\delta\lambda_{\max} + \epsilon) I\big)^{-1/p}
         \quad\text{every } k_p \text{ steps from } t_0 \\
       D_t &= \hat m_t \times_1 P^{(1)} \cdots \times_c P^{(c)}, \qquad
       u_t = D_t\, \lVert A_t\rVert_F / \lVert D_t\rVert_F

    :math:`G_{(i)}` is the block unfolded along axis :math:`i`, :math:`\hat L` the
    bias-corrected statistic, :math:`\times_i` multiplication along axis :math:`i`,
    :math:`p = 2c` unless overridden, and :math:`A_t` the grafted method's step (Adam by
    default). For a matrix this is :math:`L^{-1/4}\hat m R^{-1/4}`, the paper's update, with
    the grafted step size. With ``nesterov``, :math:`\hat m_t` is replaced by
    :math:`\beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) G_t/(1-\beta_1^t)`.

    Roots are computed only on the steps that need them, inside ``lax.cond``, so other steps
    cost one statistics update and one preconditioner product per axis. A root that is not
    finite or whose error exceeds ``root_error_threshold`` is rejected: the block keeps its
    previous preconditioner (the identity before the first success) and
    ``state.root_failures`` counts the event. A step whose gradient is not finite is skipped
    (zero update, state unchanged, ``state.skipped_steps`` counts it), because one NaN would
    otherwise live in the statistics forever.

    The gradients must have the tree structure and leaf shapes of the parameters given to
    ``init``; otherwise ``update`` raises a ``ValueError`` naming the leaf and both shapes (no
    broadcasting). A tensor with no elements gets an empty update (the grafted method's).

    Derivatives with respect to the hyperparameters (``jax.grad`` through training) are exact:
    the roots are differentiated as matrix functions (see :func:`matrix_inverse_pth_root`).

    Example:
      >>> import jax.numpy as jnp, optax, metaopt
      >>> opt = metaopt.scale_by_shampoo(preconditioning_frequency=5)
      >>> g = jnp.array([[1.0, -2.0], [3.0, 0.5]])
      >>> updates, state = opt.update(g, opt.init(jnp.zeros((2, 2))))
      >>> # No preconditioner yet: the first step is the grafted Adam step, the sign of g.
      >>> print(jnp.round(updates, 4))
      [[ 1. -1.]
       [ 1.  1.]]
      >>> # The core in a chain of your own: clipping, Shampoo's direction, a decaying step.
      >>> opt = optax.chain(
      ...     optax.clip_by_global_norm(1.0),
      ...     metaopt.scale_by_shampoo(),
      ...     optax.scale_by_learning_rate(optax.cosine_decay_schedule(1e-3, 10_000)),
      ... )

    References:
      Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor Optimization
      <https://arxiv.org/abs/1802.09568>`_, 2018; Anil et al., `Scalable Second Order
      Optimization for Deep Learning <https://arxiv.org/abs/2002.09018>`_, 2020; Shi et al.,
      `A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo Optimizer
      <https://arxiv.org/abs/2309.06497>`_, 2023.

    Args:
      b1: first-moment rate, in [0, 1); 0 preconditions the raw gradient.
      b2: statistics rate, in [0, 1]; 1 sums the statistics (the original Shampoo).
      nesterov: use the Nesterov (NAdam) form of the first moment.
      damping: :math:`\delta`, added to the statistics relative to their largest eigenvalue.
      eps_root: :math:`\epsilon`, absolute damping, added to the statistics inside the root
        (optax's name for a constant inside a root; ``epsilon`` in metaopt 0.1).
      exponent_override: the root :math:`p`: an int for every tensor, or a sequence whose
        entry ``c - 1`` applies to tensors with ``c`` preconditioned axes (0 or a missing
        entry keeps the default ``2c``).
      blocking: how tensors are cut into preconditioned blocks, a :class:`Blocking`; None
        uses ``Blocking()``.
      grafting: the step-size method, a :class:`Grafting`; None uses ``Grafting()`` (Adam).
      statistics_frequency: update the statistics every this many steps (:math:`k_s`).
      preconditioning_frequency: recompute the roots every this many steps (:math:`k_p`).
      start_preconditioning_step: the first step that uses Shampoo's direction (:math:`t_0`),
        where the first roots are computed; default ``preconditioning_frequency``.
      root_method: ``"eigh"`` or ``"newton"``, see :func:`matrix_inverse_pth_root`.
      root_error_threshold: reject roots whose relative error
        :math:`\lVert P^p \tilde L - I\rVert_F/\sqrt b` exceeds this; None checks finiteness only.
      statistics_dtype: dtype of the statistics; None uses the parameter's dtype, at least
        float32. ``jnp.bfloat16`` halves their memory (roots are always computed in at least
        float32, from the positive semi-definite part of the rounded statistics).
      preconditioner_dtype: dtype of the stored roots; None as for ``statistics_dtype``.

    Returns:
      An ``optax.GradientTransformation``.
    """
    _common.check_range("b1", b1, 0.0, 1.0, fix="EMA rates must be at least 0 and below 1.")
    _common.check_range("b2", b2, 0.0, 1.0, high_inclusive=True, fix="Use 1 to sum statistics.")
    _common.check_nonnegative("damping", damping)
    _common.check_nonnegative("eps_root", eps_root)
    for name, value in (
        ("statistics_frequency", statistics_frequency),
        ("preconditioning_frequency", preconditioning_frequency),
    ):
        check_whole(name, value)
    if start_preconditioning_step is None:
        start_preconditioning_step = preconditioning_frequency
    check_whole("start_preconditioning_step", start_preconditioning_step)
    if root_method not in ("eigh", "newton"):
        raise ValueError(
            f"root_method must be 'eigh' or 'newton', got root_method={root_method!r}."
        )
    if root_error_threshold is not None:
        _common.check_positive("root_error_threshold", root_error_threshold)
    _common.check_number_or_numbers("exponent_override", exponent_override)
    exponent = exponent_rule(exponent_override)
    blocking = Blocking() if blocking is None else blocking
    grafting = Grafting() if grafting is None else grafting
    if not isinstance(blocking, Blocking):
        raise TypeError(f"blocking must be a metaopt.Blocking, got blocking={blocking!r}.")
    if not isinstance(grafting, Grafting):
        raise TypeError(
            f"grafting must be a metaopt.Grafting, got grafting={grafting!r}; for example "
            "metaopt.Grafting('adam', b2=0.999)."
        )

    def init_fn(params: optax.Params) -> ScaleByShampooState:
        leaves, treedef = jax.tree.flatten(params)
        plans = [plan_blocks(x.shape, blocking) for x in leaves]
        statistics, preconditioners = [], []
        for plan, leaf in zip(plans, leaves, strict=True):
            sharding = grid_sharding(plan, leaf, extra_axes=2)
            shapes = plan.matrix_shapes()
            wide = jnp.promote_types(leaf.dtype, jnp.float32)
            stats_dtype = wide if statistics_dtype is None else statistics_dtype
            root_dtype = wide if preconditioner_dtype is None else preconditioner_dtype
            statistics.append(tuple(place(jnp.zeros(s, stats_dtype), sharding) for s in shapes))
            preconditioners.append(
                tuple(
                    place(jnp.broadcast_to(jnp.eye(s[-1], dtype=root_dtype), s), sharding)
                    for s in shapes
                )
            )
        statistics = jax.tree.unflatten(treedef, statistics)
        preconditioners = jax.tree.unflatten(treedef, preconditioners)
        if is_params_placeholder(params):
            # optax.tree_map_params is looking for copies of the parameter tree.
            statistics, preconditioners = NotParameterShaped(), NotParameterShaped()
        return ScaleByShampooState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            graft=optax.tree.zeros_like(params) if grafting.has_accumulator else (),
            statistics=statistics,
            preconditioners=preconditioners,
            root_failures=jnp.zeros([], jnp.int32),
            root_error=jnp.zeros([], jnp.float32),
            skipped_steps=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None):
        if params is not None:
            check_matching("updates", updates, "params", params)
        check_matching("updates", updates, "state.mu", state.mu, hint=STATE_FOR_OTHER_PARAMS)
        del params
        leaves, treedef = jax.tree.flatten(updates)
        state = state._replace(
            statistics=_common.tuples_per_leaf(treedef, state.statistics),
            preconditioners=_common.tuples_per_leaf(treedef, state.preconditioners),
        )
        plans = [plan_blocks(g.shape, blocking) for g in leaves]
        hyper = {
            "b1": _common.value_at(b1, state.count),
            "b2": _common.value_at(b2, state.count),
            "damping": _common.value_at(damping, state.count),
            "eps_root": _common.value_at(eps_root, state.count),
        }
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves] or [True]))
        # A non-finite step is skipped by selecting, not by a `lax.cond` around the step: a
        # conditional copies every state buffer it passes through and keeps XLA from fusing
        # the step with its neighbours, which cost half an Adam step on a 4M-parameter MLP.
        # The step runs on a zeroed gradient then, so no NaN enters the arithmetic (or its
        # derivatives); the moments' decay rates become 1, so they keep their values with no
        # tensor select (selecting each moment made XLA copy the donated moments), and the
        # statistics are selected inside their own update.
        safe = [jnp.where(finite, g, jnp.zeros_like(g)) for g in leaves]
        directions, new_state = _step(safe, treedef, plans, state, hyper, finite)
        directions = [jnp.where(finite, d, jnp.zeros_like(d)) for d in directions]
        return jax.tree.unflatten(treedef, directions), new_state

    def _step(leaves, treedef, plans, state, hyper, finite):
        def decay(rate):
            # On a skipped step (zero gradient) a decay of 1 keeps the moment as it was.
            return jnp.where(finite, rate, 1.0)

        count = _common.increment(state.count)
        b1_t, b2_t = hyper["b1"], hyper["b2"]
        mu_leaves = treedef.flatten_up_to(state.mu)
        graft_leaves = treedef.flatten_up_to(state.graft) if grafting.has_accumulator else None

        # First moment and the grafted method's step, elementwise.
        new_mu, moments, graft_steps, new_graft = [], [], [], []
        for i, g in enumerate(leaves):
            dtype = jnp.promote_types(g.dtype, jnp.float32)
            g32 = g.astype(dtype)
            m = decay(b1_t) * mu_leaves[i].astype(dtype) + (1.0 - b1_t) * g32
            new_mu.append(m.astype(mu_leaves[i].dtype))
            if nesterov:
                # Scalar coefficients first: with a Python-float b1, XLA would otherwise fold
                # the constants into the tensor products differently from an injected b1.
                momentum_weight = b1_t / (1.0 - b1_t ** _common.increment(count))
                gradient_weight = (1.0 - b1_t) / (1.0 - b1_t**count)
                m_hat = momentum_weight * m + gradient_weight * g32
            else:
                m_hat = m / (1.0 - b1_t**count)
            moments.append(m_hat)
            if grafting.has_accumulator:
                v_old = graft_leaves[i].astype(dtype)
                if grafting.kind == "adagrad":
                    v = v_old + jnp.square(g32)
                else:
                    v = decay(grafting.b2) * v_old + (1.0 - grafting.b2) * jnp.square(g32)
                new_graft.append(v.astype(graft_leaves[i].dtype))
                if grafting.kind == "adam":
                    v = v / (1.0 - grafting.b2**count)
                graft_steps.append(m_hat / (_common.safe_sqrt(v) + grafting.eps))
            else:
                graft_steps.append(m_hat)

        statistics = _update_statistics(
            leaves,
            plans,
            tuple(treedef.flatten_up_to(state.statistics)),
            state.count,
            b2_t,
            finite,
        )
        preconditioners, failures, root_error = _update_roots(
            plans,
            statistics,
            tuple(treedef.flatten_up_to(state.preconditioners)),
            state,
            count,
            b2_t,
            hyper,
            finite,
        )

        directions = []
        for plan, g, m_hat, graft_step, factors in zip(
            plans, leaves, moments, graft_steps, preconditioners, strict=True
        ):
            if plan.preconditioned:
                shampoo = _precondition(plan, m_hat, graft_step, factors)
                direction = jnp.where(count >= start_preconditioning_step, shampoo, graft_step)
            else:
                direction = graft_step
            directions.append(direction.astype(g.dtype))

        new_state = ScaleByShampooState(
            count=jnp.where(finite, count, state.count),
            mu=jax.tree.unflatten(treedef, new_mu),
            graft=jax.tree.unflatten(treedef, new_graft) if grafting.has_accumulator else (),
            statistics=jax.tree.unflatten(treedef, statistics),
            preconditioners=jax.tree.unflatten(treedef, preconditioners),
            root_failures=state.root_failures + failures,
            root_error=root_error,
            skipped_steps=jnp.where(
                finite, state.skipped_steps, _common.increment(state.skipped_steps)
            ),
        )
        return directions, new_state

    def _update_statistics(leaves, plans, statistics, steps_before, b2_t, finite):
        # b2 = 1 sums the statistics (the original Shampoo) instead of freezing them at zero.
        weight = jnp.where(b2_t < 1.0, 1.0 - b2_t, 1.0)

        def updated():
            out = []
            for plan, g, old in zip(plans, leaves, statistics, strict=True):
                if not plan.preconditioned:
                    out.append(old)
                    continue
                dtype = jnp.promote_types(old[0].dtype, jnp.float32)
                grams = plan.statistics(plan.to_blocks(g.astype(dtype)))
                # A skipped step keeps the statistics (a select, fused into the update).
                out.append(
                    tuple(
                        jnp.where(finite, b2_t * s.astype(dtype) + weight * gram, s).astype(s.dtype)
                        for s, gram in zip(old, grams, strict=True)
                    )
                )
            return tuple(out)

        if isinstance(statistics_frequency, int) and statistics_frequency == 1:
            return updated()
        due = steps_before % statistics_frequency == 0
        return jax.lax.cond(due, updated, lambda: statistics)

    def _update_roots(plans, statistics, previous_roots, state, count, b2_t, hyper, finite):
        updates_so_far = (count - 1) // statistics_frequency + 1
        correction = jnp.where(b2_t < 1.0, 1.0 - b2_t**updates_so_far, 1.0)

        def recompute():
            matrices, exponents = [], []
            for plan, stats in zip(plans, statistics, strict=True):
                for s in stats:
                    dtype = jnp.promote_types(s.dtype, jnp.float32)
                    matrices.append(s.astype(dtype) / correction.astype(dtype))
                    exponents.append(exponent(len(plan.preconditioned)))
            computed = iter(
                stacked_inverse_roots(
                    matrices,
                    exponents,
                    damping=hyper["damping"],
                    epsilon=hyper["eps_root"],
                    method=root_method,
                )
            )
            failures = jnp.zeros([], jnp.int32)
            worst = jnp.zeros([], jnp.float32)
            out = []
            for previous in previous_roots:
                new = []
                for old in previous:
                    root, info = next(computed)
                    accept = info.finite
                    if root_error_threshold is not None:
                        accept &= info.relative_error <= root_error_threshold
                    new.append(jnp.where(accept[..., None, None], root, old).astype(old.dtype))
                    failures += jnp.sum(~accept).astype(jnp.int32)
                    error = jnp.where(info.finite, info.relative_error, jnp.inf)
                    worst = jnp.maximum(worst, jnp.max(error).astype(jnp.float32))
                out.append(tuple(new))
            return tuple(out), failures, worst

        def keep():
            return previous_roots, jnp.zeros([], jnp.int32), state.root_error

        due = (count >= start_preconditioning_step) & (
            (count - start_preconditioning_step) % preconditioning_frequency == 0
        )
        return jax.lax.cond(due & finite, recompute, keep)

    def _precondition(plan: BlockPlan, m_hat, graft_step, factors):
        blocks = plan.multiply(plan.to_blocks(m_hat), factors)
        if grafting.kind == "none":
            return plan.from_blocks(blocks)
        # The grafted step stays in the parameter's layout (its norms are summed in place and
        # the choice below is made there): one copy of the tensor fewer than moving it into
        # blocks and back.
        shampoo_norm = plan.block_norms(blocks)
        graft_norm = plan.tensor_block_norms(graft_step)
        positive = shampoo_norm > 0
        scale = graft_norm / jnp.where(positive, shampoo_norm, 1.0)
        expand = (...,) + (None,) * len(plan.merged)
        scaled = plan.from_blocks(blocks * scale[expand])
        return jnp.where(plan.per_block_to_tensor(positive), scaled, graft_step)

    return optax.GradientTransformation(init_fn, update_fn)


@_common.renamed_arguments({"epsilon": "eps_root"})
def shampoo(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    nesterov: bool = False,
    damping: ScalarOrSchedule = 1e-6,
    eps_root: ScalarOrSchedule = 1e-12,
    exponent_override: int | Sequence[int] | None = None,
    blocking: Blocking | None = None,
    grafting: Grafting | None = None,
    statistics_frequency: int = 1,
    preconditioning_frequency: int = 20,
    start_preconditioning_step: int | None = None,
    root_method: Literal["eigh", "newton"] = "eigh",
    root_error_threshold: float | None = 0.5,
    statistics_dtype: Any = None,
    preconditioner_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Shampoo with decoupled weight decay and a learning rate.

    .. math::  \theta_t = \theta_{t-1} - \eta_t\,(u_t + \lambda\,\theta_{t-1})

    with :math:`u_t` the output of :func:`scale_by_shampoo` (all other arguments are passed to
    it) and :math:`\lambda` = ``weight_decay``. With the default Adam grafting, learning rates
    tuned for AdamW are a good start.

    Example:
      >>> import jax, jax.numpy as jnp, optax, metaopt
      >>> a = jnp.diag(jnp.array([1.0, 100.0]))  # an ill-conditioned quadratic
      >>> loss = lambda w: 0.5 * jnp.sum(w * (a @ w))
      >>> opt = metaopt.shampoo(0.1, preconditioning_frequency=5)
      >>> w = jnp.ones((2, 2))
      >>> state = opt.init(w)
      >>> step = jax.jit(lambda w, state: opt.update(jax.grad(loss)(w), state, w))
      >>> for _ in range(200):
      ...     updates, state = step(w, state)
      ...     w = optax.apply_updates(w, updates)
      >>> print(bool(loss(w) < 1e-6), int(state[0].root_failures))
      True 0

    References:
      Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor Optimization
      <https://arxiv.org/abs/1802.09568>`_, 2018; Anil et al., `Scalable Second Order
      Optimization for Deep Learning <https://arxiv.org/abs/2002.09018>`_, 2020; Shi et al.,
      `A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo Optimizer
      <https://arxiv.org/abs/2309.06497>`_, 2023.

    Args:
      learning_rate: step size :math:`\eta`, a float, traced array or schedule.
      b1: first-moment rate; 0 inside ``optax.contrib.schedule_free``, which replaces momentum.
      b2: statistics rate.
      weight_decay: decoupled weight decay :math:`\lambda`, multiplied by the learning rate.
      mask: which leaves get weight decay (a pytree of booleans or a function of params).
      nesterov: Nesterov form of the first moment.
      damping: damping relative to the statistics' largest eigenvalue.
      eps_root: absolute damping :math:`\epsilon`, added inside the root.
      exponent_override: the root p (int, or a sequence by number of preconditioned axes).
      blocking: a :class:`Blocking`, or None for ``Blocking()``.
      grafting: a :class:`Grafting`, or None for ``Grafting("adam")``.
      statistics_frequency: steps between statistics updates.
      preconditioning_frequency: steps between root computations.
      start_preconditioning_step: first step with Shampoo's direction.
      root_method: ``"eigh"`` or ``"newton"``.
      root_error_threshold: largest accepted relative error of a root.
      statistics_dtype: dtype of the statistics.
      preconditioner_dtype: dtype of the roots.

    Every argument is described in full in :func:`scale_by_shampoo`.

    Returns:
      An ``optax.GradientTransformation``.
    """
    _common.check_nonnegative("learning_rate", learning_rate, "Use a positive step size.")
    _common.check_nonnegative("weight_decay", weight_decay)
    return optax.chain(
        scale_by_shampoo(
            b1,
            b2,
            nesterov=nesterov,
            damping=damping,
            eps_root=eps_root,
            exponent_override=exponent_override,
            blocking=blocking,
            grafting=grafting,
            statistics_frequency=statistics_frequency,
            preconditioning_frequency=preconditioning_frequency,
            start_preconditioning_step=start_preconditioning_step,
            root_method=root_method,
            root_error_threshold=root_error_threshold,
            statistics_dtype=statistics_dtype,
            preconditioner_dtype=preconditioner_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
