"""NumPy (float64) transcription of the per-parameter MLP learned optimizer's update.

Written from the specification of ``metaopt.learned.PerParameterMLP`` (a Metz et al. 2019 /
VeLO style per-parameter network with muLO update multipliers, Therien et al. 2024), not from the
JAX code, so the two can be compared: plain Python loops over leaves, over the entries of each
tensor and over the factored rows and columns, NumPy only (no jax / optax / metaopt).

Specification v2: the moments are bias corrected (n = steps taken including this one); p is
scaled by 1 / sqrt(mean(p^2) + eps), g and the momenta by 1 / sqrt(sigma2 + eps) with sigma2
the tensor's bias-corrected mean of the factored (or unfactored) second moment, and the ratio
features by the entrywise inverse roots of the corrected RMS and factored moments; there is no
per-feature normalization, and the per-tensor shrinkage feature compares mean(g^2) with sigma2.
Non-finite inverse roots and features are replaced by 0.

Trees are nested dicts (visited in sorted key order), lists and tuples of NumPy arrays. The
configuration is any object with the description's attributes (the dataclass itself, or a
``types.SimpleNamespace``) or a dict with those keys.

State (from :func:`init_state`), a plain dict::

    {"leaves": [per-leaf dict {"m": [K arrays], "v": array, "r": array, "c": array}, ...],
     "count": int, "skipped_steps": int}

with the leaves in flattening order.
"""

import math

import numpy as np

EPS = 1e-30


# ------------------------------------------------------------------------------ trees
def flatten(tree):
    """The leaves of a dict/list/tuple tree, depth first, dict keys in sorted order."""
    if isinstance(tree, dict):
        out = []
        for key in sorted(tree):
            out.extend(flatten(tree[key]))
        return out
    if isinstance(tree, list | tuple):
        out = []
        for item in tree:
            out.extend(flatten(item))
        return out
    return [tree]


def unflatten(like, leaves):
    """The tree with the structure of ``like`` whose leaves are ``leaves`` (in flatten order)."""
    leaves = list(leaves)
    position = [0]

    def build(node):
        if isinstance(node, dict):
            return {key: build(node[key]) for key in sorted(node)}
        if isinstance(node, list | tuple):
            return type(node)(build(item) for item in node)
        leaf = leaves[position[0]]
        position[0] += 1
        return leaf

    result = build(like)
    assert position[0] == len(leaves), "leaf count differs from the tree's"
    return result


def _option(config, name):
    if isinstance(config, dict):
        return config[name]
    return getattr(config, name)


# ------------------------------------------------------------------------------ state
def _leaf_state(p, n_momenta):
    p = np.asarray(p)
    shape = p.shape
    if len(shape) >= 2:
        r = np.zeros(shape[:-1])
        c = np.zeros(shape[:-2] + shape[-1:])
    else:
        r = np.zeros(shape)
        c = np.zeros(())
    return {"m": [np.zeros(shape) for _ in range(n_momenta)], "v": np.zeros(shape), "r": r, "c": c}


def init_state(params, lopt_config):
    """All moments zero (float64), count 0, skipped_steps 0."""
    n_momenta = len(tuple(_option(lopt_config, "momentum_decays")))
    return {
        "leaves": [_leaf_state(p, n_momenta) for p in flatten(params)],
        "count": 0,
        "skipped_steps": 0,
    }


def _copy_state(state):
    return {
        "leaves": [
            {
                "m": [m.copy() for m in leaf["m"]],
                "v": leaf["v"].copy(),
                "r": leaf["r"].copy(),
                "c": leaf["c"].copy(),
            }
            for leaf in state["leaves"]
        ],
        "count": state["count"],
        "skipped_steps": state["skipped_steps"],
    }


# ------------------------------------------------------------------------------ pieces
def _mean_square(x):
    """mean(x^2) over every entry, by an explicit sum."""
    flat = np.ravel(x)
    total = 0.0
    for value in flat:
        total += float(value) * float(value)
    return total / flat.size


def _mean(x):
    """mean(x) over every entry, by an explicit sum."""
    flat = np.ravel(x)
    total = 0.0
    for value in flat:
        total += float(value)
    return total / flat.size


def _finite_or_zero(value):
    """A float, replaced by 0 if it is not finite."""
    return value if math.isfinite(value) else 0.0


def _inverse_root(y):
    """1 / sqrt(y + eps) for a float, 0 where that is not finite."""
    with np.errstate(all="ignore"):
        value = float(np.float64(1.0) / np.sqrt(np.float64(y) + EPS))
    return _finite_or_zero(value)


def _entrywise_inverse_root(y):
    """1 / sqrt(y + eps) entry by entry, 0 where that is not finite."""
    out = np.zeros(np.shape(y))
    for index in np.ndindex(*np.shape(y)):
        out[index] = _inverse_root(y[index])
    return out


def _scaled(x, scale):
    """x * scale (a scalar or an array like x), entry by entry, 0 where not finite."""
    x = np.asarray(x, np.float64)
    scale = np.broadcast_to(np.asarray(scale, np.float64), x.shape)
    out = np.zeros(x.shape)
    with np.errstate(all="ignore"):
        for index in np.ndindex(*x.shape):
            out[index] = _finite_or_zero(float(x[index] * scale[index]))
    return out


def _factored_second_moment(r, c):
    """f[..., i, j] = r[..., i] c[..., j] / (mean_i r[..., i] + eps), one slice at a time."""
    lead = r.shape[:-1]
    n_rows, n_cols = r.shape[-1], c.shape[-1]
    f = np.zeros((*lead, n_rows, n_cols))
    for index in np.ndindex(*lead):
        row, col = r[index], c[index]
        row_mean = sum(float(x) for x in row) / n_rows
        for i in range(n_rows):
            for j in range(n_cols):
                f[(*index, i, j)] = row[i] * col[j] / (row_mean + EPS)
    return f


def _relu(x):
    return np.where(x > 0.0, x, 0.0)


def _network(meta_params, features, tensor_features):
    """(direction, log-magnitude) for each row of ``features`` ([n, F]), one entry at a time."""
    w_in = np.asarray(meta_params["input"]["w"], np.float64)
    b_in = np.asarray(meta_params["input"]["b"], np.float64)
    w_tensor = np.asarray(meta_params["tensor"]["w"], np.float64)
    hidden = [
        (np.asarray(layer["w"], np.float64), np.asarray(layer["b"], np.float64))
        for layer in meta_params["hidden"]
    ]
    w_out = np.asarray(meta_params["output"]["w"], np.float64)
    b_out = np.asarray(meta_params["output"]["b"], np.float64)

    # The per-tensor features enter every entry's first layer the same way.
    tensor_term = np.zeros(w_tensor.shape[1])
    for j, s_j in enumerate(tensor_features):
        tensor_term = tensor_term + s_j * w_tensor[j]

    directions = np.zeros(features.shape[0])
    log_magnitudes = np.zeros(features.shape[0])
    for n, x in enumerate(features):
        pre = b_in + tensor_term
        for i, x_i in enumerate(x):
            pre = pre + x_i * w_in[i]
        h = _relu(pre)
        for w, b in hidden:
            h = _relu(h @ w + b)
        out = h @ w_out + b_out
        directions[n] = out[0]
        log_magnitudes[n] = out[1]
    return directions, log_magnitudes


def _scalar(value, count):
    """A float, or a schedule evaluated at the step count before this step."""
    if callable(value):
        value = value(count)
    return float(value)


# ------------------------------------------------------------------------------ update
def update(
    meta_params,
    state,
    grads,
    params,
    config,
    step_multiplier=None,
    magnitude_multiplier=None,
    update_multipliers=None,
):
    """One step of the learned optimizer; returns ``(updates, new_state)``.

    ``step_multiplier`` / ``magnitude_multiplier``: None (the configuration's), a float or a
    schedule ``count -> float``. ``update_multipliers``: None or a tree like ``params`` of
    scalars. The input state is not modified.
    """
    momentum_decays = [float(b) for b in _option(config, "momentum_decays")]
    rms_decay = float(_option(config, "rms_decay"))
    factored_decay = float(_option(config, "factored_decay"))
    timescales = [float(tau) for tau in _option(config, "step_timescales")]
    if step_multiplier is None:
        step_multiplier = _option(config, "step_multiplier")
    if magnitude_multiplier is None:
        magnitude_multiplier = _option(config, "magnitude_multiplier")

    grad_leaves = [np.asarray(g) for g in flatten(grads)]
    param_leaves = [np.asarray(p) for p in flatten(params)]
    if update_multipliers is None:
        multipliers = [1.0] * len(param_leaves)
    else:
        multipliers = [float(np.asarray(u)) for u in flatten(update_multipliers)]
    assert len(grad_leaves) == len(param_leaves) == len(multipliers) == len(state["leaves"])

    new_state = _copy_state(state)
    all_finite = all(bool(np.all(np.isfinite(g))) for g in grad_leaves)
    if not all_finite:
        new_state["skipped_steps"] += 1
        zeros = [np.zeros(p.shape, p.dtype) for p in param_leaves]
        return unflatten(params, zeros), new_state

    count = state["count"]
    lambda1 = _scalar(step_multiplier, count)
    lambda2 = _scalar(magnitude_multiplier, count)

    updates = []
    for p_in, g_in, multiplier, leaf in zip(
        param_leaves, grad_leaves, multipliers, new_state["leaves"], strict=True
    ):
        if p_in.size == 0:
            updates.append(np.zeros(p_in.shape, p_in.dtype))
            continue
        shape = p_in.shape
        p = p_in.astype(np.float64)
        g = g_in.astype(np.float64)
        g2 = g * g

        # Moments (momenta, RMS, factored or unfactored second moment).
        for k, b in enumerate(momentum_decays):
            leaf["m"][k] = b * leaf["m"][k] + (1.0 - b) * g
        leaf["v"] = rms_decay * leaf["v"] + (1.0 - rms_decay) * g2
        if len(shape) >= 2:
            row_means = np.zeros(shape[:-1])
            col_means = np.zeros(shape[:-2] + shape[-1:])
            for index in np.ndindex(*shape[:-2]):
                block = g2[index]
                n_rows, n_cols = block.shape
                for i in range(n_rows):
                    row_means[(*index, i)] = sum(block[i, j] for j in range(n_cols)) / n_cols
                for j in range(n_cols):
                    col_means[(*index, j)] = sum(block[i, j] for i in range(n_rows)) / n_rows
            leaf["r"] = factored_decay * leaf["r"] + (1.0 - factored_decay) * row_means
            leaf["c"] = factored_decay * leaf["c"] + (1.0 - factored_decay) * col_means
            f = _factored_second_moment(leaf["r"], leaf["c"])
        else:
            leaf["r"] = factored_decay * leaf["r"] + (1.0 - factored_decay) * g2
            f = leaf["r"]

        # Bias corrections (n = steps taken including this one) and inverse roots: per-tensor
        # scalars for p and for g and the momenta, entrywise for the two ratio features.
        n = count + 1
        momenta = [m / (1.0 - b**n) for m, b in zip(leaf["m"], momentum_decays, strict=True)]
        v_hat = leaf["v"] / (1.0 - rms_decay**n)
        f_hat = f / (1.0 - factored_decay**n)
        factored_source = leaf["c"] if len(shape) >= 2 else leaf["r"]
        sigma2 = _mean(factored_source) / (1.0 - factored_decay**n)
        i_sigma = _inverse_root(sigma2)
        i_p = _inverse_root(_mean_square(p))
        i_v = _entrywise_inverse_root(v_hat)
        i_f = _entrywise_inverse_root(f_hat)

        # Per-parameter features, no further normalization; a scalar is a 1-vector.
        raw = [_scaled(p, i_p), _scaled(g, i_sigma), *[_scaled(m, i_sigma) for m in momenta]]
        raw += [_scaled(g, i_v), *[_scaled(m, i_v) for m in momenta]]
        raw += [_scaled(g, i_f), *[_scaled(m, i_f) for m in momenta]]
        columns = [np.ravel(x) for x in raw]
        features = np.stack(columns, axis=1)  # [entries, F]

        # Per-tensor features: step embeddings, then the gradient's size against sigma2.
        tensor_features = [math.tanh(count / tau) for tau in timescales]
        with np.errstate(all="ignore"):
            log_ratio = float(0.5 * np.log((_mean_square(g) + EPS) / (sigma2 + EPS)))
        shrinkage = float(np.clip(log_ratio, -5.0, 5.0)) / 5.0
        tensor_features.append(shrinkage if math.isfinite(shrinkage) else 0.0)

        directions, log_magnitudes = _network(meta_params, features, tensor_features)
        step = np.zeros(directions.shape)
        for n in range(directions.shape[0]):
            step[n] = -lambda1 * directions[n] * math.exp(lambda2 * log_magnitudes[n]) * multiplier
        updates.append(step.reshape(shape).astype(p_in.dtype))

    new_state["count"] = count + 1
    return unflatten(params, updates), new_state


def run(meta_params, params, grads_sequence, config, **kwargs):
    """Apply :func:`update` for each gradient tree in turn (params += updates); returns the
    list of update trees and the final state."""
    state = init_state(params, config)
    params = unflatten(params, [np.array(p) for p in flatten(params)])
    all_updates = []
    for grads in grads_sequence:
        updates, state = update(meta_params, state, grads, params, config, **kwargs)
        params = unflatten(
            params,
            [p + u for p, u in zip(flatten(params), flatten(updates), strict=True)],
        )
        all_updates.append(updates)
    return all_updates, state
