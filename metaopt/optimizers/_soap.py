"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner.

Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade, "SOAP: Improving and
Stabilizing Shampoo using Adam", ICLR 2025 (arXiv:2409.11321).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.optimizers import _common
from metaopt.optimizers._blocking import Blocking, BlockPlan, grid_sharding, place, plan_blocks
from metaopt.optimizers._common import ScalarOrSchedule
from metaopt.optimizers._matrix_root import eigenbasis, refresh_eigenbasis
from metaopt.optimizers._shampoo import check_whole
from metaopt.optimizers._tree_checks import (
    STATE_FOR_OTHER_PARAMS,
    NotParameterShaped,
    check_matching,
    is_params_placeholder,
)


class ScaleBySOAPState(NamedTuple):
    """State of :func:`scale_by_soap`.

    ``optax.tree_map_params`` maps its function over ``mu`` (the copy of the parameter tree)
    and leaves ``nu``, ``statistics`` and ``eigenbases`` alone, since their arrays are in block
    layout; ``transform_non_params`` receives each of these trees whole.

    Example:
      >>> import jax.numpy as jnp, metaopt
      >>> state = metaopt.scale_by_soap().init({"w": jnp.zeros((4, 3))})
      >>> # One statistic and one eigenbasis per axis of w, each [*block_grid, b, b].
      >>> [q.shape for q in state.eigenbases["w"]]
      [(1, 1, 4, 4), (1, 1, 3, 3)]
      >>> state.mu["w"].shape, int(state.count)
      ((4, 3), 0)

    Attributes:
      count: steps taken (int32); a skipped step (non-finite gradient) does not count.
      mu: first moment, in the parameters' own coordinates (like the parameters).
      nu: second moment in the rotated coordinates, a tree with the parameters' structure:
        for a preconditioned tensor in block layout ``[*block_grid, *block_shape]``, otherwise
        like the parameter.
      statistics: a tree with the parameters' structure; at each parameter's place a tuple
        with, per preconditioned axis, Shampoo's factor statistics ``[*block_grid, b, b]``, in
        the parameter's dtype (at least float32); ``()`` for a tensor with no preconditioned
        axis.
      eigenbases: their (approximate) eigenvectors, same layout, columns by decreasing
        eigenvalue.
      skipped_steps: steps skipped because the gradient was not finite (int32).
    """

    count: jax.Array
    mu: optax.Updates
    nu: Any
    statistics: Any
    eigenbases: Any
    skipped_steps: jax.Array


@_common.renamed_arguments({}, keyword_only=("shampoo_b2", "eps"))
def scale_by_soap(
    b1: ScalarOrSchedule = 0.95,
    b2: ScalarOrSchedule = 0.95,
    *,
    shampoo_b2: ScalarOrSchedule | None = None,
    eps: float = 1e-8,
    preconditioning_frequency: int = 10,
    blocking: Blocking | None = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients with SOAP (without learning rate or weight decay).

    Per block with gradient :math:`G_t` and preconditioned axes :math:`i`, Shampoo's
    statistics :math:`L^{(i)} \leftarrow \beta_s L^{(i)} + (1-\beta_s) G_{(i)}G_{(i)}^\top`
    have eigenbases :math:`Q^{(i)}`; Adam runs in the rotated coordinates:

    .. math::

       G' &= G \times_i Q^{(i)\top}, \qquad m \leftarrow \beta_1 m + (1-\beta_1) G, \qquad
       v \leftarrow \beta_2 v + (1-\beta_2)\, G'^{\,2} \\
       u &= \left(\frac{m \times_i Q^{(i)\top} / (1-\beta_1^t)}
                 {\sqrt{v/(1-\beta_2^t)} + \epsilon}\right) \times_i Q^{(i)}

    The first moment lives in the original coordinates (it is rotated when used), the second
    in the rotated ones. The bases come from an eigendecomposition at the first step and are
    refreshed every ``preconditioning_frequency`` steps by one step of power iteration with QR,
    :math:`Q \leftarrow \mathrm{QR}(L Q)`, after sorting the columns (and ``v`` with them) by the
    estimated eigenvalues :math:`\mathrm{diag}(Q^\top L Q)`, as in the paper's implementation.
    Tensors with no preconditioned axis (vectors by default, and tensors with no elements) get
    plain Adam. The gradients must have the tree structure and leaf shapes of the parameters
    given to ``init``; otherwise ``update`` raises a ``ValueError`` naming the leaf and both
    shapes.

    Two guards against numerical trouble. A rotated coordinate whose second moment is at the
    level of the rotations' round-off (below :math:`(32\,\epsilon_{\mathrm{mach}})^2` times
    the largest in its block) takes no step: its gradient is zero up to round-off (a
    rank-deficient gradient, or the off-diagonal of the first rotated gradient), and Adam's
    division would make that round-off a step as large as the real ones. A step whose gradient
    is not finite is skipped (zero update, state unchanged, ``skipped_steps`` counts it), since
    one NaN would otherwise stay in the statistics and moments for good.

    Differences from the paper's code, both deliberate: the first step already takes an Adam
    step in the new basis (the reference implementation only initializes the statistics), and
    long axes are cut into blocks (:class:`Blocking`) instead of being left unpreconditioned.

    Under differentiation (meta-gradients) the eigenbases are treated as constants: they are not
    differentiable where eigenvalues repeat (rank-deficient statistics early in training), and a
    basis is a choice of coordinates rather than a smooth function of the hyperparameters.
    Gradients flow through the statistics-free parts: the moments and the rotations.

    Example:
      >>> import jax.numpy as jnp, optax, metaopt
      >>> opt = metaopt.scale_by_soap()
      >>> g = jnp.array([[1.0, -2.0], [3.0, 0.5]])
      >>> updates, state = opt.update(g, opt.init(jnp.zeros((2, 2))))
      >>> # The first statistics' eigenvectors are g's singular vectors, so the first step (Adam's
      >>> # first step, a sign, in that basis) is g's orthogonal polar factor U V^T.
      >>> u, _, vt = jnp.linalg.svd(g)
      >>> bool(jnp.allclose(updates, u @ vt, atol=1e-5))
      True
      >>> # The core in a chain of your own: clipping, SOAP's direction, a decaying step.
      >>> opt = optax.chain(
      ...     optax.clip_by_global_norm(1.0),
      ...     metaopt.scale_by_soap(),
      ...     optax.scale_by_learning_rate(optax.cosine_decay_schedule(3e-3, 10_000)),
      ... )

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, 2024 (Algorithm 3).

    Args:
      b1: first-moment rate, in [0, 1).
      b2: second-moment rate, in [0, 1).
      shampoo_b2: statistics rate :math:`\beta_s`, in [0, 1); None uses ``b2``.
      eps: added to the square root of the second moment.
      preconditioning_frequency: refresh the eigenbases every this many steps.
      blocking: block layout, a :class:`Blocking`; None uses
        ``Blocking(precondition_vectors=False)``.

    Returns:
      An ``optax.GradientTransformation``.
    """
    for name, value in (("b1", b1), ("b2", b2), ("shampoo_b2", shampoo_b2)):
        if value is not None:
            _common.check_range(name, value, 0.0, 1.0, fix="EMA rates must be in [0, 1).")
    _common.check_nonnegative("eps", eps)
    check_whole("preconditioning_frequency", preconditioning_frequency)
    blocking = Blocking(precondition_vectors=False) if blocking is None else blocking
    if not isinstance(blocking, Blocking):
        raise TypeError(f"blocking must be a metaopt.Blocking, got blocking={blocking!r}.")

    def init_fn(params: optax.Params) -> ScaleBySOAPState:
        leaves, treedef = jax.tree.flatten(params)
        nu, statistics, bases = [], [], []
        for leaf in leaves:
            plan = plan_blocks(leaf.shape, blocking)
            if not plan.preconditioned:
                nu.append(jnp.zeros_like(leaf))
                statistics.append(())
                bases.append(())
                continue
            block_shape = plan.counts + plan.lengths
            nu.append(
                place(
                    jnp.zeros(block_shape, leaf.dtype), grid_sharding(plan, leaf, len(plan.merged))
                )
            )
            sharding = grid_sharding(plan, leaf, 2)
            shapes = plan.matrix_shapes()
            dtype = jnp.promote_types(leaf.dtype, jnp.float32)
            statistics.append(tuple(place(jnp.zeros(s, dtype), sharding) for s in shapes))
            bases.append(tuple(place(jnp.zeros(s, dtype), sharding) for s in shapes))
        nu, statistics, bases = (jax.tree.unflatten(treedef, x) for x in (nu, statistics, bases))
        if is_params_placeholder(params):
            # optax.tree_map_params is looking for copies of the parameter tree.
            nu, statistics, bases = NotParameterShaped(), NotParameterShaped(), NotParameterShaped()
        return ScaleBySOAPState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=nu,
            statistics=statistics,
            eigenbases=bases,
            skipped_steps=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None):
        if params is not None:
            check_matching("updates", updates, "params", params)
        check_matching("updates", updates, "state.mu", state.mu, hint=STATE_FOR_OTHER_PARAMS)
        treedef = jax.tree.structure(updates)
        state = state._replace(
            statistics=_common.tuples_per_leaf(treedef, state.statistics),
            eigenbases=_common.tuples_per_leaf(treedef, state.eigenbases),
        )
        # One NaN or Inf would stay in the statistics and moments for good (every later basis
        # and step NaN): such a step is skipped whole, with a zero update, and counted.
        leaves = jax.tree.leaves(updates)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves] or [True]))

        def skip_step():
            zeros = jax.tree.map(jnp.zeros_like, updates)
            return zeros, state._replace(skipped_steps=_common.increment(state.skipped_steps))

        return jax.lax.cond(finite, lambda: _step(updates, state, params), skip_step)

    def _step(updates, state, params):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        state_nu = treedef.flatten_up_to(state.nu)
        state_statistics = treedef.flatten_up_to(state.statistics)
        state_bases = treedef.flatten_up_to(state.eigenbases)
        count = _common.increment(state.count)
        b1_t = _common.value_at(b1, state.count)
        b2_t = _common.value_at(b2, state.count)
        bs_t = b2_t if shampoo_b2 is None else _common.value_at(shampoo_b2, state.count)
        mu_leaves = treedef.flatten_up_to(state.mu)
        first = state.count == 0
        refresh = count % preconditioning_frequency == 0

        directions, new_mu, new_nu, new_statistics, new_bases = [], [], [], [], []
        for i, g in enumerate(leaves):
            plan = plan_blocks(g.shape, blocking)
            dtype = jnp.promote_types(g.dtype, jnp.float32)
            g32 = g.astype(dtype)
            m = b1_t * mu_leaves[i].astype(dtype) + (1.0 - b1_t) * g32
            new_mu.append(m.astype(mu_leaves[i].dtype))
            m_hat = m / (1.0 - b1_t**count)
            nu_old = state_nu[i].astype(dtype)
            if not plan.preconditioned:
                v = b2_t * nu_old + (1.0 - b2_t) * jnp.square(g32)
                v_hat = v / (1.0 - b2_t**count)
                directions.append((m_hat / (_common.safe_sqrt(v_hat) + eps)).astype(g.dtype))
                new_nu.append(v.astype(state_nu[i].dtype))
                new_statistics.append(())
                new_bases.append(())
                continue

            blocks = plan.to_blocks(g32)
            statistics = tuple(
                bs_t * s + (1.0 - bs_t) * gram
                for s, gram in zip(state_statistics[i], plan.statistics(blocks), strict=True)
            )
            constant = tuple(jax.lax.stop_gradient(s) for s in statistics)
            stored = state_bases[i]
            bases = jax.lax.cond(
                first,
                lambda c=constant, b=stored: tuple(
                    eigenbasis(s).astype(q.dtype) for s, q in zip(c, b, strict=True)
                ),
                lambda b=stored: b,
            )
            rotated = plan.multiply(blocks, bases, transpose=True)
            m_rotated = plan.multiply(plan.to_blocks(m_hat), bases, transpose=True)
            v = b2_t * nu_old + (1.0 - b2_t) * jnp.square(rotated)
            v_hat = v / (1.0 - b2_t**count)
            step = m_rotated / (_common.safe_sqrt(v_hat) + eps)
            step = jnp.where(_resolved(v, len(plan.merged)), step, 0.0)
            directions.append(plan.from_blocks(plan.multiply(step, bases)).astype(g.dtype))

            bases, v = jax.lax.cond(
                refresh,
                lambda c=constant, b=bases, v=v, p=plan: _refresh(p, c, b, v),
                lambda b=bases, v=v: (b, v),
            )
            new_nu.append(v.astype(state_nu[i].dtype))
            new_statistics.append(
                tuple(
                    s.astype(o.dtype) for s, o in zip(statistics, state_statistics[i], strict=True)
                )
            )
            new_bases.append(tuple(jax.lax.stop_gradient(b) for b in bases))

        new_state = ScaleBySOAPState(
            count=count,
            mu=jax.tree.unflatten(treedef, new_mu),
            nu=jax.tree.unflatten(treedef, new_nu),
            statistics=jax.tree.unflatten(treedef, new_statistics),
            eigenbases=jax.tree.unflatten(treedef, new_bases),
            skipped_steps=state.skipped_steps,
        )
        return jax.tree.unflatten(treedef, directions), new_state

    return optax.GradientTransformation(init_fn, update_fn)


@_common.renamed_arguments({}, keyword_only=("shampoo_b2", "eps"))
def soap(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.95,
    b2: ScalarOrSchedule = 0.95,
    *,
    shampoo_b2: ScalarOrSchedule | None = None,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    preconditioning_frequency: int = 10,
    blocking: Blocking | None = None,
) -> optax.GradientTransformation:
    r"""SOAP with decoupled weight decay and a learning rate.

    .. math::  \theta_t = \theta_{t-1} - \eta_t\,(u_t + \lambda\,\theta_{t-1})

    with :math:`u_t` the output of :func:`scale_by_soap` and :math:`\lambda` = ``weight_decay``.
    The betas, ``eps`` and the refresh frequency are the paper's defaults. The learning rate is
    required and weight decay is off, as in metaopt's other aliases; the paper's language-model
    runs used ``learning_rate=3e-3, weight_decay=0.01``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, metaopt
      >>> a = jnp.array([[1.0, 0.9], [0.9, 1.0]])  # a correlated quadratic
      >>> loss = lambda w: 0.5 * jnp.sum(w * (a @ w))
      >>> opt = metaopt.soap(0.05)
      >>> w = jnp.ones((2, 2))
      >>> state = opt.init(w)
      >>> step = jax.jit(lambda w, state: opt.update(jax.grad(loss)(w), state, w))
      >>> for _ in range(300):
      ...     updates, state = step(w, state)
      ...     w = optax.apply_updates(w, updates)
      >>> print(bool(loss(w) < 1e-4))
      True

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, 2024 (Algorithm 3).

    Args:
      learning_rate: step size :math:`\eta`, a float, traced array or schedule.
      b1: first-moment rate; 0 inside ``optax.contrib.schedule_free``, which replaces momentum.
      b2: second-moment rate.
      shampoo_b2: statistics rate (None: ``b2``).
      eps: added to the square root of the second moment.
      preconditioning_frequency: steps between eigenbasis refreshes.
      blocking: a :class:`Blocking`, or None for ``Blocking(precondition_vectors=False)``.
      weight_decay: decoupled weight decay :math:`\lambda`, multiplied by the learning rate
        (default 0; 0.01 in metaopt 0.1 and in the paper).
      mask: which leaves get weight decay (a pytree of booleans or a function of params).

    Returns:
      An ``optax.GradientTransformation``.
    """
    _common.check_nonnegative("learning_rate", learning_rate, "Use a positive step size.")
    _common.check_nonnegative("weight_decay", weight_decay)
    return optax.chain(
        scale_by_soap(
            b1,
            b2,
            shampoo_b2=shampoo_b2,
            eps=eps,
            preconditioning_frequency=preconditioning_frequency,
            blocking=blocking,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


# A rotated coordinate whose second moment is below (_ROUND_OFF * eps_mach)^2 times the largest
# in its block holds only the rotations' round-off (measured: at most 4 eps_mach of the largest
# rotated entry, blocks of 16 to 1024); Adam's division would turn that round-off into steps as
# large as the real ones.
_ROUND_OFF = 32.0


def _resolved(v: jax.Array, k: int) -> jax.Array:
    """Where the rotated second moment ``v`` (``[*grid, *block]``, rank ``2k``) stands above the
    rotations' round-off, relative to the largest entry of its block."""
    largest = jnp.max(v, axis=tuple(range(k, 2 * k)), keepdims=True)
    floor = (_ROUND_OFF * jnp.finfo(v.dtype).eps) ** 2 * largest
    return v > floor


def _refresh(plan: BlockPlan, statistics, bases, v):
    """Sorts each basis by estimated eigenvalue (permuting v to match), then one QR step."""
    k = len(plan.merged)
    new_bases = []
    for axis, s, q in zip(plan.preconditioned, statistics, bases, strict=True):
        refreshed, order = refresh_eigenbasis(s, q)
        q = refreshed.astype(q.dtype)
        shape = [1] * (2 * k)
        shape[:k] = plan.counts
        shape[k + axis] = plan.lengths[axis]
        v = jnp.take_along_axis(v, order.reshape(shape), axis=k + axis)
        new_bases.append(q)
    return tuple(new_bases), v
