"""Independent NumPy references for Shampoo and SOAP, in float64, written from the update rules.

No jax / optax / metaopt here. ``params`` is a dict of arrays (only their shapes matter) and
``grads`` a list, one entry per step t = 1, 2, ..., of dicts of arrays of the same shapes. Both
references return the per-step *directions* of the core transforms (``scale_by_shampoo`` and
``scale_by_soap``, before any learning rate), one dict per step.

Shape plan, shared by both. A tensor of shape s is viewed as D_1..D_k: with
``merge_small_dimensions``, adjacent dims are merged left to right while the product stays
<= block_size, except that the last dim > 1 of a tensor with two or more such dims never joins
a group that already holds all the others (a matrix stays a matrix); then dims equal to 1 are
dropped. Axis i is preconditioned iff
D_i <= max_preconditioned_dimension and (k > 1 or precondition_vectors); ``one_sided`` keeps only
the preconditioned axis with the smallest D_i (first on ties). A preconditioned axis longer than
block_size is zero-padded to a multiple of block_size and cut into blocks of length block_size;
every other axis is one block of length D_i.

Shampoo (Gupta, Koren, Singer 2018, "Shampoo: Preconditioned Stochastic Tensor Optimization";
Anil et al. 2020, "Scalable Second Order Optimization for Deep Learning"), step t, gradient G:
    m = b1 m + (1 - b1) G ;  mhat = m / (1 - b1^t)
        (nesterov: mhat = b1 m / (1 - b1^(t+1)) + (1 - b1) G / (1 - b1^t))
    every statistics_frequency steps, per block and preconditioned axis i (Gb matricized on i):
        L_i = b2 L_i + (1 - b2) Gb Gb^T ;  Lhat_i = L_i / (1 - b2^n_s)   (n_s updates so far)
        (b2 = 1, the original Shampoo: L_i = L_i + Gb Gb^T and Lhat_i = L_i)
    at t = S, S + f, S + 2f, ... (S = start_preconditioning_step, f = preconditioning_frequency):
        A = sym(Lhat_i) with eigenvalues clipped at 0 ;  shift = damping lambda_max(A) + epsilon
        X = (A + shift I)^(-1/p) ;  err = ||X^p (A + shift I) - I||_F / sqrt(b_i)
        P_i = X if X is finite and err <= root_error_threshold, else P_i is kept (a failure)
    graft d_g: sgd mhat ; adagrad mhat / (sqrt(sum G^2) + eps) ;
               rmsprop mhat / (sqrt(v) + eps) ; adam mhat / (sqrt(v / (1 - b2g^t)) + eps)
               with v = b2g v + (1 - b2g) G^2 ;  none: mhat
    no preconditioned axis or t < S: direction = d_g ; else per block
        d_sh = mhat x_1 P_1 x_2 P_2 ...   and   direction = d_sh ||d_g|| / ||d_sh||
        (d_g where d_sh = 0; d_sh unscaled when the graft kind is "none").
The exponent p is 2c for c preconditioned axes unless overridden.

SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"): Adam run in the
eigenbasis Q_i of Shampoo's statistics, see ``soap_reference``.
"""

import itertools
import math

import numpy as np

SHAMPOO_DEFAULTS = dict(
    b1=0.9,
    b2=0.999,
    nesterov=False,
    damping=1e-6,
    eps_root=1e-12,
    exponent_override=None,
    block_size=1024,
    merge_small_dimensions=True,
    max_preconditioned_dimension=8192,
    one_sided=False,
    precondition_vectors=True,
    graft_kind="adam",
    graft_b2=0.999,
    graft_eps=1e-8,
    statistics_frequency=1,
    preconditioning_frequency=20,
    start_preconditioning_step=None,
    root_error_threshold=None,
)

SOAP_DEFAULTS = dict(
    b1=0.95,
    b2=0.95,
    shampoo_b2=None,
    eps=1e-8,
    preconditioning_frequency=10,
    block_size=1024,
    merge_small_dimensions=True,
    max_preconditioned_dimension=8192,
    one_sided=False,
    precondition_vectors=False,
)


# ------------------------------------------------------------------ shape plan and blocks
class _Plan:
    """The static view of one tensor: dims D, preconditioned axes, block lengths and counts."""

    def __init__(self, shape, cfg):
        block_size = cfg["block_size"]
        # The last dim longer than 1 is never merged into a group holding every other long dim.
        long = [i for i, d in enumerate(shape) if d > 1]
        last = long[-1] if len(long) >= 2 else -1
        dims = []
        for i, d in enumerate(shape):
            would_be_vector = i == last and sum(x > 1 for x in dims[:-1]) == 0 and dims[-1] > 1
            if (
                cfg["merge_small_dimensions"]
                and dims
                and dims[-1] * d <= block_size
                and not would_be_vector
            ):
                dims[-1] *= d
            else:
                dims.append(d)
        dims = [d for d in dims if d != 1]
        limit = cfg["max_preconditioned_dimension"]
        axes = [
            i
            for i, d in enumerate(dims)
            if (limit is None or d <= limit) and (len(dims) > 1 or cfg["precondition_vectors"])
        ]
        if cfg["one_sided"] and len(axes) > 1:
            axes = [min(axes, key=lambda i: dims[i])]  # min returns the first on ties
        self.shape = tuple(shape)
        self.dims = tuple(dims)
        self.axes = axes
        self.lengths = tuple(
            block_size if (i in axes and d > block_size) else d for i, d in enumerate(dims)
        )
        self.counts = tuple(math.ceil(d / b) for d, b in zip(dims, self.lengths, strict=True))

    def blocks(self, x):
        """x (of the tensor's shape) -> {block index: block}, zero-padded, copies."""
        x = np.reshape(x, self.dims)
        pad = [(0, n * b - d) for d, b, n in zip(self.dims, self.lengths, self.counts, strict=True)]
        x = np.pad(x, pad) if pad else x
        out = {}
        for index in itertools.product(*(range(n) for n in self.counts)):
            window = tuple(
                slice(j * b, (j + 1) * b) for j, b in zip(index, self.lengths, strict=True)
            )
            out[index] = x[window].copy()
        return out

    def assemble(self, blocks):
        """Inverse of ``blocks``: padding removed, reshaped to the tensor's shape."""
        padded = np.zeros([n * b for b, n in zip(self.lengths, self.counts, strict=True)])
        for index, block in blocks.items():
            window = tuple(
                slice(j * b, (j + 1) * b) for j, b in zip(index, self.lengths, strict=True)
            )
            padded[window] = block
        return padded[tuple(slice(0, d) for d in self.dims)].reshape(self.shape)


def _gram(x, axis):
    """x matricized along ``axis`` (length n x rest), times its transpose: n x n."""
    mat = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    return mat @ mat.T


def _multiply_along(x, matrix, axis):
    """y[..a..] = sum_a' matrix[a, a'] x[..a'..] on ``axis``."""
    return np.moveaxis(np.tensordot(matrix, x, axes=([1], [axis])), 0, axis)


def shampoo_exponent(c, exponent_override):
    """p = 2c, an int override, or seq[c - 1] when that entry exists and is positive."""
    if exponent_override is None:
        return 2 * c
    if isinstance(exponent_override, int):
        return exponent_override
    seq = list(exponent_override)
    if c <= len(seq) and seq[c - 1] > 0:
        return int(seq[c - 1])
    return 2 * c


def inverse_root(stat, p, damping, epsilon):
    """(X, relative_error) with X = (A + (damping lambda_max(A) + epsilon) I)^(-1/p), A = sym(stat)
    with eigenvalues clipped at 0; eigenvalues <= 0 after the shift map to 0."""
    n = stat.shape[0]
    if not np.all(np.isfinite(stat)):
        return np.full((n, n), np.nan), np.inf
    values, vectors = np.linalg.eigh(0.5 * (stat + stat.T))
    values = np.maximum(values, 0.0)
    a = (vectors * values) @ vectors.T
    shift = damping * values.max() + epsilon
    shifted = values + shift
    positive = shifted > 0
    powers = np.zeros_like(shifted)
    powers[positive] = shifted[positive] ** (-1.0 / p)
    x = (vectors * powers) @ vectors.T
    if not np.any(x):
        return x, 0.0
    residual = np.linalg.matrix_power(x, p) @ (a + shift * np.eye(n)) - np.eye(n)
    return x, np.linalg.norm(residual) / math.sqrt(n)


# ------------------------------------------------------------------------- Shampoo
def _shampoo_tensor(grads, shape, cfg):
    """Directions for one tensor over all steps, and its number of rejected roots."""
    plan = _Plan(shape, cfg)
    b1, b2 = cfg["b1"], cfg["b2"]
    kind, b2g, eps_g = cfg["graft_kind"], cfg["graft_b2"], cfg["graft_eps"]
    c = len(plan.axes)
    p = shampoo_exponent(c, cfg["exponent_override"])
    freq = cfg["preconditioning_frequency"]
    start = cfg["start_preconditioning_step"]
    start = freq if start is None else start
    stat_freq = cfg["statistics_frequency"]
    threshold = cfg["root_error_threshold"]

    m = np.zeros(shape)
    v = np.zeros(shape)
    index_set = list(itertools.product(*(range(n) for n in plan.counts)))
    stats = {j: {i: np.zeros((plan.lengths[i],) * 2) for i in plan.axes} for j in index_set}
    precs = {j: {i: np.eye(plan.lengths[i]) for i in plan.axes} for j in index_set}
    failures = 0
    directions = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64).reshape(shape)
        m = b1 * m + (1.0 - b1) * g
        if cfg["nesterov"]:
            mhat = b1 * m / (1.0 - b1 ** (t + 1)) + (1.0 - b1) * g / (1.0 - b1**t)
        else:
            mhat = m / (1.0 - b1**t)

        # Graft direction, elementwise over the whole tensor.
        if kind in ("sgd", "none"):
            d_graft = mhat
        elif kind == "adagrad":
            v = v + g * g
            d_graft = mhat / (np.sqrt(v) + eps_g)
        elif kind == "rmsprop":
            v = b2g * v + (1.0 - b2g) * g * g
            d_graft = mhat / (np.sqrt(v) + eps_g)
        elif kind == "adam":
            v = b2g * v + (1.0 - b2g) * g * g
            d_graft = mhat / (np.sqrt(v / (1.0 - b2g**t)) + eps_g)
        else:
            raise ValueError(f"unknown graft kind {kind!r}")

        if c == 0:
            directions.append(d_graft)
            continue

        g_blocks = plan.blocks(g)
        n_stats = (t - 1) // stat_freq + 1
        if (t - 1) % stat_freq == 0:
            for j in index_set:
                for i in plan.axes:
                    gram = _gram(g_blocks[j], i)
                    # b2 = 1 is the original Shampoo: the statistics are sums.
                    stats[j][i] = (
                        stats[j][i] + gram if b2 == 1 else b2 * stats[j][i] + (1 - b2) * gram
                    )
        if t >= start and (t - start) % freq == 0:
            for j in index_set:
                for i in plan.axes:
                    lhat = stats[j][i] / (1.0 - b2**n_stats) if b2 < 1 else stats[j][i]
                    x, error = inverse_root(lhat, p, cfg["damping"], cfg["eps_root"])
                    if np.all(np.isfinite(x)) and (threshold is None or error <= threshold):
                        precs[j][i] = x
                    else:
                        failures += 1

        if t < start:
            directions.append(d_graft)
            continue
        m_blocks, graft_blocks = plan.blocks(mhat), plan.blocks(d_graft)
        out = {}
        for j in index_set:
            d_sh = m_blocks[j]
            for i in plan.axes:
                d_sh = _multiply_along(d_sh, precs[j][i], i)
            norm = np.linalg.norm(d_sh)
            if kind == "none":
                out[j] = d_sh
            elif norm > 0:
                out[j] = d_sh * (np.linalg.norm(graft_blocks[j]) / norm)
            else:
                out[j] = graft_blocks[j]
        directions.append(plan.assemble(out))
    return directions, failures


def shampoo_reference(params, grads, **config):
    """Shampoo directions: (list over steps of {name: direction}, total rejected roots).

    ``config`` takes the keys of ``SHAMPOO_DEFAULTS`` (the blocking options flat, the grafting
    ones as ``graft_kind``, ``graft_b2``, ``graft_eps``)."""
    unknown = set(config) - set(SHAMPOO_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown Shampoo options {sorted(unknown)}")
    cfg = {**SHAMPOO_DEFAULTS, **config}
    steps = [{} for _ in grads]
    failures = 0
    for name, w in params.items():
        directions, count = _shampoo_tensor([g[name] for g in grads], np.shape(w), cfg)
        failures += count
        for step, d in zip(steps, directions, strict=True):
            step[name] = d
    return steps, failures


# ---------------------------------------------------------------------------- SOAP
def _rotate(x, bases, transpose):
    """Multiplies x along each preconditioned axis i by Q_i^T (transpose) or by Q_i."""
    for i, q in bases.items():
        x = _multiply_along(x, q.T if transpose else q, i)
    return x


def _canonical_eigenbasis(a):
    """Eigenvectors by descending eigenvalue; those of eigenvalues below 32 n eps of the largest
    (the null space, an arbitrary basis) replaced by the eigenvectors of P diag(1..n)/n P with
    P the projector onto that null space, in ascending order of those eigenvalues."""
    n = a.shape[0]
    values, vectors = np.linalg.eigh(a)
    null = values <= 32.0 * n * np.finfo(np.float64).eps * np.abs(values).max()
    k = int(null.sum())
    if k:
        p = vectors[:, null] @ vectors[:, null].T
        _, w = np.linalg.eigh(p @ np.diag(np.arange(1, n + 1) / n) @ p)
        vectors = np.concatenate([w[:, n - k :], vectors[:, k:]], axis=1)
    return vectors[:, ::-1]


def _soap_tensor(grads, shape, cfg):
    plan = _Plan(shape, cfg)
    b1, b2, eps = cfg["b1"], cfg["b2"], cfg["eps"]
    beta_s = cfg["b2"] if cfg["shampoo_b2"] is None else cfg["shampoo_b2"]
    freq = cfg["preconditioning_frequency"]
    directions = []

    if not plan.axes:  # plain Adam
        m, v = np.zeros(shape), np.zeros(shape)
        for t, g in enumerate(grads, start=1):
            g = np.asarray(g, dtype=np.float64).reshape(shape)
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * g * g
            directions.append((m / (1.0 - b1**t)) / (np.sqrt(v / (1.0 - b2**t)) + eps))
        return directions

    index_set = list(itertools.product(*(range(n) for n in plan.counts)))
    m = {j: np.zeros(plan.lengths) for j in index_set}
    v = {j: np.zeros(plan.lengths) for j in index_set}  # in the rotated space
    stats, bases = {j: {} for j in index_set}, {j: {} for j in index_set}
    for t, g in enumerate(grads, start=1):
        g_blocks = plan.blocks(np.asarray(g, dtype=np.float64))
        out = {}
        for j in index_set:
            gb = g_blocks[j]
            if t == 1:
                for i in plan.axes:
                    stats[j][i] = (1.0 - beta_s) * _gram(gb, i)
                    bases[j][i] = _canonical_eigenbasis(stats[j][i])
            g_rot = _rotate(gb, bases[j], transpose=True)
            m[j] = b1 * m[j] + (1.0 - b1) * gb
            m_rot = _rotate(m[j], bases[j], transpose=True)
            v[j] = b2 * v[j] + (1.0 - b2) * g_rot * g_rot
            n_rot = (m_rot / (1.0 - b1**t)) / (np.sqrt(v[j] / (1.0 - b2**t)) + eps)
            out[j] = _rotate(n_rot, bases[j], transpose=False)
            if t > 1:
                for i in plan.axes:
                    stats[j][i] = beta_s * stats[j][i] + (1.0 - beta_s) * _gram(gb, i)
            if t % freq == 0:
                for i in plan.axes:
                    q, stat = bases[j][i], stats[j][i]
                    estimate = np.diag(q.T @ stat @ q)
                    order = np.argsort(-estimate, kind="stable")
                    q = q[:, order]
                    v[j] = np.take(v[j], order, axis=i)
                    # power step on stat + s I, s = sqrt(eps) * largest estimate: directions
                    # stat has not seen keep their previous basis vectors
                    s = np.sqrt(np.finfo(np.float64).eps) * np.max(np.abs(estimate))
                    bases[j][i], _ = np.linalg.qr(stat @ q + s * q)
        directions.append(plan.assemble(out))
    return directions


def soap_reference(params, grads, **config):
    """SOAP directions (Vyas et al. 2024, Algorithm 1 with the eigenbasis refreshed by one QR
    power step), a list over steps of {name: direction}. ``config`` takes the keys of
    ``SOAP_DEFAULTS``. Per block, with beta_s = shampoo_b2 or b2:
        t = 1:  L_i = (1 - beta_s) Gb Gb^T ;  Q_i = eigenvectors of L_i (descending), the null
            space's given canonically (see _canonical_eigenbasis)
        G' = G rotated by Q^T ;  m = b1 m + (1 - b1) G ;  M' = m rotated by Q^T
        v = b2 v + (1 - b2) G'^2 ;  N' = (M' / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
        direction = N' rotated back by Q
        t > 1:  L_i = beta_s L_i + (1 - beta_s) Gb Gb^T
        t % preconditioning_frequency == 0: sort Q_i's columns (and v along axis i) by
            diag(Q_i^T L_i Q_i) descending, then Q_i = Q factor of qr((L_i + s I) Q_i) with
            s = sqrt(eps_mach) * max diag(Q_i^T L_i Q_i).
    Tensors without a preconditioned axis run plain Adam (b1, b2, eps)."""
    unknown = set(config) - set(SOAP_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown SOAP options {sorted(unknown)}")
    cfg = {**SOAP_DEFAULTS, **config}
    steps = [{} for _ in grads]
    for name, w in params.items():
        directions = _soap_tensor([g[name] for g in grads], np.shape(w), cfg)
        for step, d in zip(steps, directions, strict=True):
            step[name] = d
    return steps
