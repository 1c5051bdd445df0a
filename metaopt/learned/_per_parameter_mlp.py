"""A per-parameter MLP learned optimizer whose behaviour is a pytree of meta-parameters.

Metz, Maheswaranathan, Nixon, Freeman and Sohl-Dickstein, "Understanding and correcting
pathologies in the training of learned optimizers", ICML 2019; the per-parameter network of
VeLO (Metz et al., 2022); muLO (Therien et al., "muLO: Compute-Efficient Meta-Generalization of
Learned Optimizers", 2024) for the width-aware parameterization.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.optimizers import _common
from metaopt.optimizers._common import ScalarOrSchedule
from metaopt.optimizers._tree_checks import STATE_FOR_OTHER_PARAMS, check_matching

# Added under every square root and normalizer: far below any float32 gradient scale that
# matters, so the features stay scale-invariant, and large enough that 1/sqrt stays finite.
# Every quotient is written as a division by a square root (never rsqrt, never a division by a
# mean square): meta-gradients in float32 then hold at most 1/(y + eps) <= 1e30, where rsqrt's
# derivative y^(-3/2) would overflow to inf and turn 0 * inf into NaN.
_TINY = 1e-30
_PARAMETERIZATIONS = ("standard", "mulo")
DEFAULT_STEP_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)


class PerParameterMLPState(NamedTuple):
    """State of :meth:`PerParameterMLP.transform`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from metaopt import learned
      >>> lopt = learned.PerParameterMLP(hidden_size=4)  # three momenta by default
      >>> tx = lopt.transform(lopt.init(jax.random.key(0)))
      >>> params = {"w": jnp.ones((5, 3)), "b": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> state.momenta["w"].shape, state.row_moment["w"].shape, state.column_moment["w"].shape
      ((3, 5, 3), (5,), (3,))
      >>> state.column_moment["b"].shape  # a vector's second moment is not factored
      ()
      >>> grads = {"w": jnp.full((5, 3), jnp.nan), "b": jnp.zeros(3)}
      >>> updates, state = tx.update(grads, state, params)  # a NaN skips the step
      >>> int(state.count), int(state.skipped_steps), float(jnp.abs(updates["w"]).max())
      (0, 1, 0.0)

    Attributes:
      count: steps taken (int32); a skipped step (non-finite gradient) does not count.
      momenta: per parameter, an array of shape ``(K, *param.shape)``: the exponential moving
        averages of the gradient at the K ``momentum_decays``.
      second_moment: per parameter, the moving average of the squared gradient (``rms_decay``).
      row_moment: per parameter, Adafactor's row statistics (mean of the squared gradient over
        the last axis) for tensors of two or more dimensions; for vectors and scalars the
        unfactored squared-gradient average, both with ``factored_decay``.
      column_moment: per parameter, the column statistics (mean over the second-to-last axis);
        a zero scalar for vectors and scalars.
      skipped_steps: steps skipped because the gradient held a NaN or an infinity.
    """

    count: jax.Array
    momenta: optax.Updates
    second_moment: optax.Updates
    row_moment: optax.Updates
    column_moment: optax.Updates
    skipped_steps: jax.Array


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_decays(name: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise TypeError(
            f"{name} must be a non-empty sequence of numbers in [0, 1), got {name}={values!r}."
        )
    for value in values:
        _common.check_range(name, value, 0.0, 1.0, fix="Each decay must lie in [0, 1).")
    return tuple(float(v) for v in values)


@dataclasses.dataclass(frozen=True)
class PerParameterMLP:
    r"""A learned optimizer: a small MLP applied to every parameter entry, with tensor features.

    The description is static (hashable, so it can be a ``jit`` static argument); its behaviour
    lives in the meta-parameters that :meth:`init` creates and meta-training learns.
    :meth:`transform` turns meta-parameters into an ``optax.GradientTransformation``.

    For each parameter tensor :math:`p` with gradient :math:`g` the transform keeps momenta
    :math:`m_k` at the ``momentum_decays`` :math:`\beta_k`, a second moment :math:`v`
    (``rms_decay``) and Adafactor's factored second moment :math:`f = r c^\top / \bar r` from
    row and column statistics (``factored_decay``; for vectors :math:`f` is unfactored). Its
    :math:`F = 4 + 3K` per-entry features are

    .. math::

       p,\; g,\; m_k,\; \frac{g}{\sqrt{v}},\; \frac{m_k}{\sqrt{v}},\;
       \frac{g}{\sqrt{f}},\; \frac{m_k}{\sqrt{f}},

    each divided by its root mean square over the tensor, so one network serves tensors of
    every scale. The tensor's features are :math:`\tanh(t/\tau_j)` of the step :math:`t` at the
    ``step_timescales`` and the clipped log-ratio of the gradient's mean square to its running
    average, :math:`\tfrac12 \log(\overline{g^2}/\bar v)`, which tells the network that the
    gradient shrinks. The network outputs a direction :math:`d` and a log-magnitude :math:`a`,
    and the update is

    .. math:: u = -\lambda_1\, d\, \exp(\lambda_2 a)\, \mu_p,

    with small fixed multipliers :math:`\lambda_1` (``step_multiplier``) and :math:`\lambda_2`
    (``magnitude_multiplier``), so an untrained optimizer takes small, finite steps
    (Metz et al., 2019), and a per-tensor multiplier :math:`\mu_p` (1, or muLO's
    :math:`1/\text{fan-in}`, see ``parameterization``).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from metaopt import learned
      >>> lopt = learned.PerParameterMLP(hidden_size=8)
      >>> meta_params = lopt.init(jax.random.key(0))
      >>> tx = lopt.transform(meta_params)
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> bool(jnp.max(jnp.abs(updates["w"])) < 0.01)  # an untrained optimizer steps ~1e-3
      True

    References:
      Metz et al., "Understanding and correcting pathologies in the training of learned
      optimizers", ICML 2019. Metz et al., "VeLO: Training Versatile Learned Optimizers by
      Scaling Up", 2022. Therien et al., "muLO: Compute-Efficient Meta-Generalization of
      Learned Optimizers", 2024.

    Attributes:
      hidden_size: width of the per-parameter MLP (>= 1).
      hidden_layers: number of hidden layers (>= 1), each ``hidden_size`` wide, ReLU.
      momentum_decays: decays of the gradient momenta, each in [0, 1) (three by default).
      rms_decay: decay of the squared-gradient average, in [0, 1).
      factored_decay: decay of Adafactor's row and column statistics, in [0, 1).
      step_timescales: timescales :math:`\tau_j` (> 0) of the step features.
      step_multiplier: :math:`\lambda_1`, the fixed scale of the step (> 0).
      magnitude_multiplier: :math:`\lambda_2`, the fixed scale of the log-magnitude (>= 0).
      parameterization: ``"standard"``, or ``"mulo"``: the target network is initialized in
        muP and each tensor's update is multiplied by muLO's multiplier (1 for the input layer
        and for vectors, 1/fan-in for hidden and output matrices; see
        :func:`mulo_update_multipliers`), which :meth:`transform` then requires.
    """

    hidden_size: int = 16
    hidden_layers: int = 1
    momentum_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    rms_decay: float = 0.999
    factored_decay: float = 0.99
    step_timescales: tuple[float, ...] = DEFAULT_STEP_TIMESCALES
    step_multiplier: float = 1e-3
    magnitude_multiplier: float = 1e-3
    parameterization: str = "standard"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "hidden_layers"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(
                    f"{name} must be a positive integer, got {name}={value!r}. "
                    f"Pass for example {name}={16 if name == 'hidden_size' else 1}."
                )
        object.__setattr__(
            self, "momentum_decays", _check_decays("momentum_decays", self.momentum_decays)
        )
        _common.check_range("rms_decay", self.rms_decay, 0.0, 1.0)
        _common.check_range("factored_decay", self.factored_decay, 0.0, 1.0)
        timescales = self.step_timescales
        if isinstance(timescales, str) or not isinstance(timescales, Sequence):
            raise TypeError(
                f"step_timescales must be a sequence of positive numbers, got "
                f"step_timescales={timescales!r}."
            )
        for value in timescales:
            _common.check_positive("step_timescales", value)
        object.__setattr__(self, "step_timescales", tuple(float(v) for v in timescales))
        _common.check_positive("step_multiplier", self.step_multiplier)
        _common.check_nonnegative("magnitude_multiplier", self.magnitude_multiplier)
        for name in ("rms_decay", "factored_decay", "step_multiplier", "magnitude_multiplier"):
            if callable(getattr(self, name)):
                raise TypeError(
                    f"{name} of the description must be a number; pass a schedule or a traced "
                    f"value to transform({name}=...) instead."
                )
        if self.parameterization not in _PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {_PARAMETERIZATIONS}, got "
                f"parameterization={self.parameterization!r}."
            )

    @property
    def num_features(self) -> int:
        """Per-entry features F = 4 + 3K (K momenta)."""
        return 4 + 3 * len(self.momentum_decays)

    @property
    def num_tensor_features(self) -> int:
        """The number of per-tensor features (the step embeddings and the gradient shrinkage)."""
        return len(self.step_timescales) + 1

    def init(self, key: jax.Array) -> dict:
        """Meta-parameters of an untrained optimizer: weights ~ N(0, 1/fan-in), biases zero.

        Args:
          key: a PRNG key.

        Returns:
          ``{"input": {"w", "b"}, "tensor": {"w"}, "hidden": [{"w", "b"}, ...],
          "output": {"w", "b"}}`` in float32.
        """
        features, tensor_features = self.num_features, self.num_tensor_features
        width = self.hidden_size
        keys = jax.random.split(key, self.hidden_layers + 2)

        def normal(k, shape, fan_in):
            # A float32 factor: a NumPy float64 one would promote the weights under x64.
            return jax.random.normal(k, shape, jnp.float32) * np.float32(fan_in**-0.5)

        first_fan_in = features + tensor_features
        return {
            "input": {
                "w": normal(keys[0], (features, width), first_fan_in),
                "b": jnp.zeros(width, jnp.float32),
            },
            "tensor": {"w": normal(keys[1], (tensor_features, width), first_fan_in)},
            "hidden": [
                {
                    "w": normal(keys[2 + i], (width, width), width),
                    "b": jnp.zeros(width, jnp.float32),
                }
                for i in range(self.hidden_layers - 1)
            ],
            "output": {
                "w": normal(keys[-1], (width, 2), width),
                "b": jnp.zeros(2, jnp.float32),
            },
        }

    def check_meta_params(self, meta_params: Any) -> None:
        """Raises ValueError naming the first leaf whose structure or shape differs from
        :meth:`init`'s."""
        expected = jax.eval_shape(self.init, jax.random.key(0))
        check_matching(
            "meta_params",
            meta_params,
            "expected_meta_params",
            expected,
            hint=f"meta-parameters of {self!r}; build them with this description's init(key)",
        )

    def transform(
        self,
        meta_params: Any,
        *,
        step_multiplier: ScalarOrSchedule | None = None,
        magnitude_multiplier: ScalarOrSchedule | None = None,
        update_multipliers: Any = None,
    ) -> optax.GradientTransformation:
        r"""The optimizer that ``meta_params`` describe, as an optax transform.

        The result returns the parameter *updates* (add them with ``optax.apply_updates``) and
        needs ``params`` in ``update``. It is a pure function of ``meta_params``: ``jax.grad``
        of a loss after N inner steps with respect to them works, and so do ``optax.chain``,
        ``optax.MultiSteps``, ``optax.apply_if_finite`` and ``flax.nnx.Optimizer``.

        A gradient with a NaN or an infinity skips the step: zero update, state unchanged
        except ``skipped_steps``.

        Args:
          meta_params: the pytree from :meth:`init`, from meta-training or from a saved file
            (:func:`load_meta_params`).
          step_multiplier: :math:`\lambda_1`; None uses the description's. A float, a traced
            scalar or a schedule of the step count.
          magnitude_multiplier: :math:`\lambda_2`; None uses the description's.
          update_multipliers: None, or a pytree matching the parameters with one number per
            tensor multiplying its update (required when ``parameterization="mulo"``; see
            :func:`mulo_update_multipliers`).

        Returns:
          An ``optax.GradientTransformation`` with state :class:`PerParameterMLPState`.
        """
        self.check_meta_params(meta_params)
        step_multiplier = self.step_multiplier if step_multiplier is None else step_multiplier
        magnitude_multiplier = (
            self.magnitude_multiplier if magnitude_multiplier is None else magnitude_multiplier
        )
        _common.check_positive("step_multiplier", step_multiplier)
        _common.check_nonnegative("magnitude_multiplier", magnitude_multiplier)
        if self.parameterization == "mulo" and update_multipliers is None:
            raise ValueError(
                "parameterization='mulo' needs update_multipliers=..., one number per "
                "parameter tensor (1 for the input layer and vectors, 1/fan-in for hidden and "
                "output matrices). Build them with "
                "metaopt.learned.mulo_update_multipliers(params, input_layers=[...]) or a "
                "task's update_multipliers(params)."
            )
        description = self

        def init_fn(params):
            def moments(p):
                dtype = _compute_dtype(p.dtype)
                shape = np.shape(p)
                if len(shape) >= 2:
                    row = jnp.zeros(shape[:-1], dtype)
                    column = jnp.zeros(shape[:-2] + shape[-1:], dtype)
                else:
                    row, column = jnp.zeros(shape, dtype), jnp.zeros((), dtype)
                return (
                    jnp.zeros((len(description.momentum_decays), *shape), dtype),
                    jnp.zeros(shape, dtype),
                    row,
                    column,
                )

            leaves, treedef = jax.tree.flatten(params)
            columns = list(zip(*[moments(p) for p in leaves], strict=True)) or [()] * 4
            momenta, second, row, column = (treedef.unflatten(list(c)) for c in columns)
            zero = jnp.zeros((), jnp.int32)
            return PerParameterMLPState(zero, momenta, second, row, column, zero)

        def update_fn(updates, state, params=None):
            if params is None:
                raise ValueError(
                    "The learned optimizer needs the parameters (one of its features): call "
                    "update(grads, state, params)."
                )
            check_matching("updates", updates, "params", params)
            check_matching(
                "updates",
                updates,
                "state.second_moment",
                state.second_moment,
                hint=STATE_FOR_OTHER_PARAMS,
            )
            leaves, treedef = jax.tree.flatten(updates)
            if update_multipliers is None:
                multipliers = [1.0] * len(leaves)
            else:
                multipliers = _multiplier_leaves(update_multipliers, updates, treedef)
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves] or [True]))
            hyper = (
                _common.value_at(step_multiplier, state.count),
                _common.value_at(magnitude_multiplier, state.count),
            )

            def take_step():
                return _step(
                    description, meta_params, leaves, treedef, params, state, hyper, multipliers
                )

            def skip_step():
                zeros = jax.tree.map(jnp.zeros_like, updates)
                return zeros, state._replace(skipped_steps=_common.increment(state.skipped_steps))

            return jax.lax.cond(finite, take_step, skip_step)

        return optax.GradientTransformation(init_fn, update_fn)


def _compute_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _multiplier_leaves(update_multipliers: Any, updates: Any, treedef: Any) -> list:
    try:
        leaves = treedef.flatten_up_to(update_multipliers)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "update_multipliers must have the tree structure of the parameters, one number per "
            f"tensor: {error}"
        ) from None
    for path_leaf, value in zip(jax.tree_util.tree_leaves_with_path(updates), leaves, strict=True):
        if np.ndim(value) != 0:
            raise ValueError(
                f"update_multipliers{jax.tree_util.keystr(path_leaf[0])} must be a scalar (one "
                f"multiplier per tensor), got shape {np.shape(value)}."
            )
    return leaves


def _step(description, meta_params, leaves, treedef, params, state, hyper, multipliers):
    """One step that is taken (the gradient is finite)."""
    step_multiplier, magnitude_multiplier = hyper
    param_leaves = treedef.flatten_up_to(params)
    fields = [
        treedef.flatten_up_to(field)
        for field in (state.momenta, state.second_moment, state.row_moment, state.column_moment)
    ]
    t = state.count.astype(jnp.float32)
    outputs = [
        _leaf_step(
            description, meta_params, g, p, *moments, t, step_multiplier, magnitude_multiplier, mult
        )
        for g, p, *moments, mult in zip(leaves, param_leaves, *fields, multipliers, strict=True)
    ]
    updates, *new_fields = zip(*outputs, strict=True) if outputs else ([],) * 5
    momenta, second, row, column = (treedef.unflatten(list(f)) for f in new_fields)
    new_state = PerParameterMLPState(
        _common.increment(state.count), momenta, second, row, column, state.skipped_steps
    )
    return treedef.unflatten(list(updates)), new_state


def _normalized(x: jax.Array) -> jax.Array:
    """A feature divided by its root mean square over the tensor (non-finite entries -> 0)."""
    x = jnp.where(jnp.isfinite(x), x, 0.0)
    return x / jnp.sqrt(jnp.mean(jnp.square(x)) + _TINY)


def _leaf_step(description, meta_params, g, p, momenta, second, row, column, t, lam1, lam2, mult):
    """The update and new moments of one parameter tensor."""
    if g.size == 0:
        return jnp.zeros_like(g), momenta, second, row, column
    dtype = _compute_dtype(g.dtype)
    shape = g.shape
    g_c = g.astype(dtype).reshape(shape or (1,))
    p_c = jnp.asarray(p).astype(dtype).reshape(shape or (1,))
    decays = jnp.asarray(description.momentum_decays, dtype).reshape((-1,) + (1,) * g_c.ndim)
    momenta = decays * momenta.reshape((-1, *g_c.shape)) + (1.0 - decays) * g_c
    squared = jnp.square(g_c)
    b_v, b_f = description.rms_decay, description.factored_decay
    second = b_v * second.reshape(g_c.shape) + (1.0 - b_v) * squared
    if g_c.ndim >= 2:
        row = b_f * row + (1.0 - b_f) * jnp.mean(squared, axis=-1)
        column = b_f * column + (1.0 - b_f) * jnp.mean(squared, axis=-2)
        # r / (mean r + eps), divided twice by the square root: the derivative of a division
        # by y holds 1/y^2, which for y = mean r + eps ~ 1e-30 would overflow float32.
        root_mean = jnp.sqrt(jnp.mean(row, axis=-1) + _TINY)[..., None]
        factored = (row / root_mean / root_mean)[..., :, None] * column[..., None, :]
    else:
        row = b_f * row.reshape(g_c.shape) + (1.0 - b_f) * squared
        factored = row
    rms, factored_rms = jnp.sqrt(second + _TINY), jnp.sqrt(factored + _TINY)
    features = [p_c, g_c, *momenta, g_c / rms, *(momenta / rms)]
    features += [g_c / factored_rms, *(momenta / factored_rms)]
    x = jnp.stack([_normalized(f) for f in features], axis=-1).reshape(-1, len(features))

    timescales = jnp.asarray(description.step_timescales, dtype)
    shrinkage = 0.5 * (jnp.log(jnp.mean(squared) + _TINY) - jnp.log(jnp.mean(second) + _TINY))
    shrinkage = jnp.clip(shrinkage, -5.0, 5.0) / 5.0
    shrinkage = jnp.where(jnp.isfinite(shrinkage), shrinkage, 0.0)
    tensor_features = jnp.concatenate([jnp.tanh(t.astype(dtype) / timescales), shrinkage[None]])

    def weight(layer, name):
        return layer[name].astype(dtype)

    bias = weight(meta_params["input"], "b") + tensor_features @ weight(meta_params["tensor"], "w")
    h = jax.nn.relu(x @ weight(meta_params["input"], "w") + bias)
    for layer in meta_params["hidden"]:
        h = jax.nn.relu(h @ weight(layer, "w") + weight(layer, "b"))
    out = h @ weight(meta_params["output"], "w") + weight(meta_params["output"], "b")
    direction, log_magnitude = out[:, 0], out[:, 1]
    step = -lam1 * direction * jnp.exp(lam2 * log_magnitude) * mult
    update = step.reshape(shape).astype(g.dtype)
    if not shape:
        momenta, second, row = momenta.reshape(-1), second.reshape(()), row.reshape(())
    return update, momenta, second, row, column
