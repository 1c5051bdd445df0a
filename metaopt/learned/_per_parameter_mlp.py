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
    row and column statistics (``factored_decay``; for vectors :math:`f` is unfactored), each
    bias-corrected as Adam's (:math:`\hat m_k = m_k / (1 - \beta_k^n)` at step :math:`n`, and so
    on). Its :math:`F = 4 + 3K` per-entry features are

    .. math::

       \frac{p}{\rho},\; \frac{g}{\sigma},\; \frac{\hat m_k}{\sigma},\;
       \frac{g}{\sqrt{\hat v}},\; \frac{\hat m_k}{\sqrt{\hat v}},\;
       \frac{g}{\sqrt{\hat f}},\; \frac{\hat m_k}{\sqrt{\hat f}},

    normalized per tensor so that one network serves tensors of every scale: :math:`\rho` is
    the root mean square of the parameter tensor and :math:`\sigma` the running root mean square
    of its gradient (the mean of the factored statistics), and the ratio features are
    scale-free by construction. Two per-tensor scalars, where one normalizer per feature would
    cost a pass over the tensor each: the update then fuses into one elementwise pass. The
    tensor's features are :math:`\tanh(t/\tau_j)` of the step :math:`t` at the
    ``step_timescales`` and the clipped log-ratio of the gradient's mean square to its running
    average, :math:`\tfrac12 \log(\overline{g^2}/\sigma^2)`, which tells the network that the
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

            return _step(
                description, meta_params, leaves, treedef, params, state, hyper, multipliers, finite
            )

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


def _step(description, meta_params, leaves, treedef, params, state, hyper, multipliers, finite):
    """One step; a gradient that is not ``finite`` gives a zero update and keeps the moments.

    The skip is a select inside each tensor's passes, not a conditional: a conditional would
    copy the whole state every step.
    """
    step_multiplier, magnitude_multiplier = hyper
    param_leaves = treedef.flatten_up_to(params)
    fields = [
        treedef.flatten_up_to(field)
        for field in (state.momenta, state.second_moment, state.row_moment, state.column_moment)
    ]
    t = state.count.astype(jnp.float32)
    outputs = [
        _leaf_step(
            description,
            meta_params,
            g,
            p,
            *moments,
            t,
            step_multiplier,
            magnitude_multiplier,
            mult,
            finite,
        )
        for g, p, *moments, mult in zip(leaves, param_leaves, *fields, multipliers, strict=True)
    ]
    updates, *new_fields = zip(*outputs, strict=True) if outputs else ([],) * 5
    momenta, second, row, column = (treedef.unflatten(list(f)) for f in new_fields)
    count = jnp.where(finite, _common.increment(state.count), state.count)
    skipped = jnp.where(finite, state.skipped_steps, _common.increment(state.skipped_steps))
    new_state = PerParameterMLPState(count, momenta, second, row, column, skipped)
    return treedef.unflatten(list(updates)), new_state


def _finite(x: jax.Array) -> jax.Array:
    """Non-finite entries -> 0 (an overflowed second moment, a non-finite parameter)."""
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _inverse_root(x: jax.Array) -> jax.Array:
    """1 / sqrt(x + tiny), written as a division by a square root (see ``_TINY``); 0 where
    that is not finite."""
    return _finite(1.0 / jnp.sqrt(x + _TINY))


# The network is written out entry by entry (each hidden unit a sum of scalar-weighted arrays)
# when it has at most this many weights: XLA then fuses features, network and step into one
# elementwise pass over the tensor instead of materializing [entries, features] and
# [entries, hidden] arrays (measured in docs/benchmarks.md, learned suite). Larger networks
# would make that program too long to compile quickly, so they use matrix products.
_ENTRYWISE_WEIGHTS = 1024


def _is_entrywise(description: PerParameterMLP) -> bool:
    """Whether the network is small enough to be written out entry by entry."""
    width, layers = description.hidden_size, description.hidden_layers
    weights = width * (description.num_features + (layers - 1) * width + 2)
    return weights <= _ENTRYWISE_WEIGHTS


def _dense_network(weights, features):
    """The per-entry MLP as matrix products over the stacked features."""
    first, bias, hidden, output, output_bias = weights
    h = jax.nn.relu(jnp.stack(features, axis=-1) @ first + bias)
    for w, b in hidden:
        h = jax.nn.relu(h @ w + b)
    out = h @ output + output_bias
    return out[..., 0], out[..., 1]


@jax.custom_jvp
def _entrywise_network(weights, features):
    """The same MLP, entry by entry; its derivatives are the dense form's (matrix products,
    which is what the meta-gradient needs: one product per layer, not one reduction per
    weight)."""
    first, bias, hidden, output, output_bias = weights

    def layer(w, b, inputs):
        return [
            jax.nn.relu(b[j] + sum(w[i, j] * x for i, x in enumerate(inputs)))
            for j in range(w.shape[1])
        ]

    h = layer(first, bias, features)
    for w, b in hidden:
        h = layer(w, b, h)
    direction, log_magnitude = (
        output_bias[o] + sum(output[j, o] * x for j, x in enumerate(h)) for o in range(2)
    )
    return direction, log_magnitude


@_entrywise_network.defjvp
def _entrywise_network_jvp(primals, tangents):
    return jax.jvp(_dense_network, primals, tangents)


def _network_weights(description, meta_params, tensor_features, dtype):
    def weight(layer, name):
        return layer[name].astype(dtype)

    bias = weight(meta_params["input"], "b") + tensor_features @ weight(meta_params["tensor"], "w")
    hidden = [(weight(layer, "w"), weight(layer, "b")) for layer in meta_params["hidden"]]
    return (
        weight(meta_params["input"], "w"),
        bias,
        hidden,
        weight(meta_params["output"], "w"),
        weight(meta_params["output"], "b"),
    )


def _leaf_step(
    description, meta_params, g, p, momenta, second, row, column, t, lam1, lam2, mult, finite
):
    """The update and new moments of one parameter tensor; zero and unchanged unless
    ``finite``."""
    if g.size == 0:
        return jnp.zeros_like(g), momenta, second, row, column
    dtype = _compute_dtype(g.dtype)
    shape = g.shape
    old_moments = (momenta, second, row, column)
    # A skipped step computes from a zero gradient (so no NaN reaches the computation, or a
    # meta-gradient) and selects the old moments.
    g_c = jnp.where(finite, g, 0).astype(dtype).reshape(shape or (1,))
    p_c = jnp.asarray(p).astype(dtype).reshape(shape or (1,))
    n = t.astype(dtype) + 1.0  # this step's number, for the bias corrections
    decays = description.momentum_decays
    momenta = momenta.reshape((-1, *g_c.shape))
    decay_column = jnp.asarray(decays, dtype).reshape((-1,) + (1,) * g_c.ndim)
    # One array for all momenta, updated in place (a stack of separate arrays is not).
    stacked = decay_column * momenta + (1.0 - decay_column) * g_c
    squared = jnp.square(g_c)
    b_v, b_f = description.rms_decay, description.factored_decay
    second = b_v * second.reshape(g_c.shape) + (1.0 - b_v) * squared
    if g_c.ndim >= 2:
        row_squares = jnp.mean(squared, axis=-1)
        row = b_f * row + (1.0 - b_f) * row_squares
        column = b_f * column + (1.0 - b_f) * jnp.mean(squared, axis=-2)
        # r / (mean r + eps), divided twice by the square root: the derivative of a division
        # by y holds 1/y^2, which for y = mean r + eps ~ 1e-30 would overflow float32.
        root_mean = jnp.sqrt(jnp.mean(row, axis=-1) + _TINY)[..., None]
        factored = (row / root_mean / root_mean)[..., :, None] * column[..., None, :]
        mean_square, running_mean_square = jnp.mean(row_squares), jnp.mean(column)
    else:
        row = b_f * row.reshape(g_c.shape) + (1.0 - b_f) * squared
        factored = row
        mean_square, running_mean_square = jnp.mean(squared), jnp.mean(row)
    stacked = jnp.where(finite, stacked, momenta)
    second = jnp.where(finite, second, old_moments[1].reshape(g_c.shape))
    row = jnp.where(finite, row, old_moments[2].reshape(row.shape))
    column = jnp.where(finite, column, old_moments[3])
    # The new moments are written once and read back by the feature pass: without the barrier
    # XLA recomputes them there from the old ones, whose buffers the state's donation has
    # already reused, and copies the whole old state first to allow that.
    stacked, second = jax.lax.optimization_barrier((stacked, second))
    new_momenta = list(stacked)
    # Bias corrections: each average divided by 1 - decay^n, as Adam's.
    corrected = [1.0 / (1.0 - b**n) for b in decays]
    momenta_hat = [c * m for c, m in zip(corrected, new_momenta, strict=True)]
    factored_correction = 1.0 / (1.0 - b_f**n)
    running_mean_square = running_mean_square * factored_correction
    inverse_scale = _inverse_root(running_mean_square)
    inverse_rms = _inverse_root(second / (1.0 - b_v**n))
    inverse_factored = _inverse_root(factored * factored_correction)
    inverse_p = _inverse_root(jnp.mean(jnp.square(p_c)))
    features = [p_c * inverse_p]
    for inverse in (inverse_scale, inverse_rms, inverse_factored):
        features += [g_c * inverse, *(m * inverse for m in momenta_hat)]
    features = [_finite(f).reshape(-1) for f in features]

    timescales = jnp.asarray(description.step_timescales, dtype)
    shrinkage = 0.5 * (jnp.log(mean_square + _TINY) - jnp.log(running_mean_square + _TINY))
    shrinkage = jnp.clip(shrinkage, -5.0, 5.0) / 5.0
    shrinkage = jnp.where(jnp.isfinite(shrinkage), shrinkage, 0.0)
    tensor_features = jnp.concatenate([jnp.tanh(t.astype(dtype) / timescales), shrinkage[None]])

    weights = _network_weights(description, meta_params, tensor_features, dtype)
    network = _entrywise_network if _is_entrywise(description) else _dense_network
    direction, log_magnitude = network(weights, features)
    step = -lam1 * direction * jnp.exp(lam2 * log_magnitude) * mult
    update = jnp.where(finite, step, 0.0).reshape(shape).astype(g.dtype)
    momenta = stacked
    if not shape:
        momenta, second, row = momenta.reshape(-1), second.reshape(()), row.reshape(())
    return update, momenta, second, row, column
