"""Inverse p-th roots of symmetric positive semi-definite matrices (the core of Shampoo).

Two methods, both batched over leading dimensions and both reporting their error:

- eigendecomposition, :math:`A = Q\\Lambda Q^\\top \\Rightarrow A^{-1/p} = Q\\Lambda^{-1/p}Q^\\top`,
  accurate for any ``p`` and any conditioning the working precision can represent, optionally
  retried in float64 when float32 is not accurate enough;
- the coupled Newton iteration of Guo and Higham ("A Schur-Newton Method for the Matrix p-th
  Root and its Inverse", SIAM J. Matrix Anal. Appl. 28(3), 2006), only matrix products, which
  suits accelerators.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.optimizers import _common


class MatrixRootInfo(NamedTuple):
    """How well an inverse root was computed; every field is an array (batched like the input).

    Example:
      >>> import jax.numpy as jnp, metaopt
      >>> root, info = metaopt.matrix_inverse_pth_root(jnp.diag(jnp.array([4.0, 9.0])), 2,
      ...                                              damping=0.0)
      >>> print(jnp.round(jnp.diag(root), 4), bool(info.finite), bool(info.relative_error < 1e-5))
      [0.5    0.3333] True True
      >>> _, info = metaopt.matrix_inverse_pth_root(jnp.full((2, 2), jnp.nan), 2)
      >>> bool(info.finite), float(info.relative_error)
      (False, inf)

    Attributes:
      relative_error: :math:`\\lVert X^p \\tilde A - I\\rVert_F / \\sqrt n` for the returned
        :math:`X` and the damped input :math:`\\tilde A` (0 for a zero matrix, whose root is
        defined as 0). For ``eigh``, negative eigenvalues down to 1% of the largest are
        round-off and clipped in :math:`\\tilde A` as in the root (bfloat16 statistics have
        them at 1e-3); larger ones are kept, so an indefinite input shows an error of order
        :math:`|\\lambda_{\\min}| / (\\delta\\lambda_{\\max} + \\epsilon)` instead of
        the error of the root of its clipped part. Infinite when the input is not finite or
        the error cannot be computed (never NaN). For ``n`` above 8 the norm is estimated from
        8 fixed random sign vectors :math:`Z`, as
        :math:`\\lVert (X^p\\tilde A - I)Z\\rVert_F/\\lVert Z\\rVert_F` (unbiased in the
        square), which costs matrix-vector products instead of the :math:`p + 1` matrix
        products of the exact norm.
      iterations: Newton iterations used (0 for the eigendecomposition).
      finite: whether every entry of the input and of the root is finite.
      used_float64: whether the float64 retry produced the result.
    """

    relative_error: jax.Array
    iterations: jax.Array
    finite: jax.Array
    used_float64: jax.Array


def matrix_inverse_pth_root(
    matrix: jax.Array,
    p: int,
    *,
    damping: float = 1e-6,
    epsilon: float = 0.0,
    method: Literal["eigh", "newton"] = "eigh",
    retry_tol: float | None = 1e-3,
    newton_tol: float = 1e-6,
    newton_max_iterations: int = 100,
    sequential: bool | None = None,
) -> tuple[jax.Array, MatrixRootInfo]:
    r"""Computes :math:`(A + (\delta\lambda_{\max}(A) + \epsilon) I)^{-1/p}` for symmetric PSD A.

    ``matrix`` has shape ``[..., n, n]``; leading dimensions are a batch (stacked Shampoo
    blocks). The input is symmetrized first, and negative eigenvalues from round-off are
    clipped to zero; an indefinite or non-finite input is reported in the returned
    :class:`MatrixRootInfo` (a large or infinite ``relative_error``, ``finite=False`` for a
    non-finite input), never silently rooted. Damping is relative to the largest eigenvalue
    (``damping``, which keeps the condition number at most about :math:`1/\delta`) plus an
    absolute ``epsilon``. A zero matrix (no statistics yet) has the root 0 rather than an
    infinite one.

    ``method="eigh"`` is correct for every integer ``p`` and any conditioning the working
    precision can represent; when the input is float32 and the error exceeds ``retry_tol`` (or
    the root is not finite), it is recomputed in float64 if JAX's float64 is enabled
    (``jax_enable_x64``) and cast back. ``method="newton"`` runs the coupled iteration
    :math:`X_{k+1} = X_k T_k,\ M_{k+1} = T_k^p M_k,\ T_k = ((p+1)I - M_k)/p` from
    :math:`X_0 = c^{1/p} I,\ M_0 = c\tilde A`, which converges to :math:`\tilde A^{-1/p}` for
    any SPD matrix; it stops when :math:`\lVert M_k - I\rVert` is below ``newton_tol`` (relative
    Frobenius norm) or after ``newton_max_iterations``. It runs on :math:`A / \max_{ij}|A_{ij}|`
    and scales the root back, so float32 inputs at any representable scale (1e-30, 1e30) work.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.optimizers import matrix_inverse_pth_root
      >>> a = jnp.diag(jnp.array([8.0, 27.0]))
      >>> root, info = matrix_inverse_pth_root(a, 3, damping=0.0)
      >>> print(jnp.round(jnp.diag(root), 6), bool(info.finite))
      [0.5      0.333333] True

    Args:
      matrix: symmetric positive semi-definite matrices, shape ``[..., n, n]``.
      p: the root, a positive integer.
      damping: :math:`\delta`, relative to the largest eigenvalue, nonnegative.
      epsilon: absolute damping :math:`\epsilon`, nonnegative.
      method: ``"eigh"`` or ``"newton"``.
      retry_tol: error above which a float32 eigendecomposition is retried in float64; None
        never retries.
      newton_tol: stopping tolerance of the Newton iteration.
      newton_max_iterations: iteration cap of the Newton iteration.
      sequential: compute the batch's roots one after another (``lax.map``) instead of as one
        vectorized batch. None (the default) chooses sequential on a single CPU device, where
        jaxlib 0.10's batched LAPACK calls can deadlock when two are in flight at once (two
        parameters' roots), and vectorized elsewhere, which keeps a sharded batch on its
        devices.

    Returns:
      ``(root, info)``: the inverse roots, shaped like ``matrix``, and :class:`MatrixRootInfo`.

    Derivatives (``jax.grad``, ``jax.jvp``) with respect to ``matrix``, ``damping`` and
    ``epsilon`` are those of the exact matrix function whichever ``method`` computed the
    value: with :math:`A = Q\operatorname{diag}(\lambda)Q^\top` and
    :math:`f(\lambda) = (\lambda + s)^{-1/p}`, the Daleckii-Krein formula
    :math:`\mathrm{d}f(A)[E] = Q\,(F \circ Q^\top E Q)\,Q^\top` with
    :math:`F_{ij} = (f(\lambda_i) - f(\lambda_j))/(\lambda_i - \lambda_j)` (and
    :math:`f'(\lambda_i)` where the eigenvalues coincide), plus the shift's own derivative. Unlike
    differentiating through ``eigh``, this stays finite for repeated eigenvalues (padded
    blocks, rank-deficient statistics), where the eigenvectors are not unique but the matrix
    function is smooth.
    """
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"p must be a positive integer, got p={p!r}.")
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"matrix must have shape [..., n, n], got shape {matrix.shape}.")
    for name, value in (("damping", damping), ("epsilon", epsilon)):
        if isinstance(value, int | float) and not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {name}={value!r}.")
    if method not in ("eigh", "newton"):
        raise ValueError(f"method must be 'eigh' or 'newton', got method={method!r}.")

    if method == "eigh":
        single = functools.partial(_eigh_root, p=p, retry_tol=retry_tol)
    else:
        single = functools.partial(
            _newton_root,
            p=p,
            tol=newton_tol,
            max_iterations=newton_max_iterations,
        )
    differentiable = _with_spectral_derivative(single, p)
    # Hyperparameters in a wider dtype (float64 under inject_hyperparams) must not widen the root.
    damping, epsilon = (jnp.asarray(x).astype(matrix.dtype) for x in (damping, epsilon))
    return map_matrices(
        lambda m: differentiable(m, damping, epsilon), matrix, sequential=sequential
    )


def sequential_by_default() -> bool:
    """Whether batched matrix functions run one matrix at a time when not told otherwise.

    True on a single CPU device. jaxlib 0.10's CPU eigendecomposition and QR of a *batch* of
    matrices spread the batch over XLA's intra-op threads and wait for them; two such calls in
    flight at once (Shampoo's roots for two parameters) can wait on each other forever. One
    matrix at a time never queues work, and is as fast (jaxlib's OpenBLAS runs on one thread,
    see :func:`map_matrices`). With several devices the batch stays vectorized, because a
    sequential loop over a sharded batch would gather it onto every device; there
    :func:`prepare_cpu_environment`'s flag is the workaround.
    """
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def map_matrices(fn, *matrices: jax.Array, sequential: bool | None = None):
    """Applies ``fn`` (matrices ``[n, m]`` to a pytree) to every matrix of ``[..., n, m]`` arrays.

    The arrays share their batch dimensions. Vectorized (``jax.vmap``) or, when ``sequential``
    (default :func:`sequential_by_default`), one matrix at a time with ``lax.map``; the outputs
    get the batch dimensions back.

    On the CPU backend, where ``fn``'s eigendecompositions and QR factorizations run in jaxlib's
    LAPACK, the first call runs that library's OpenBLAS on one thread (see
    :func:`_common.use_one_lapack_thread`), and a vectorized batch on several CPU devices warns
    unless XLA's scheduler flag is set (see :func:`prepare_cpu_environment`).
    """
    if sequential is None:
        sequential = sequential_by_default()
    batch_shape = matrices[0].shape[:-2]
    flat = tuple(m.reshape((-1, *m.shape[-2:])) for m in matrices)
    if jax.default_backend() == "cpu":
        _common.use_one_lapack_thread()
        if not sequential and flat[0].shape[0] > 1:
            _common.warn_if_batched_cpu_roots_may_deadlock()
    if sequential and flat[0].shape[0] > 1:
        out = jax.lax.map(lambda args: fn(*args), flat)
    else:
        out = jax.vmap(fn)(*flat)
    return jax.tree.map(lambda x: x.reshape(batch_shape + x.shape[1:]), out)


_PROBES = 8


def _error(root, apply_damped, p):
    """RMS deviation of root^p @ damped from the identity (0 for a zero root).

    Exact for n <= _PROBES; above, estimated on fixed random sign vectors Z as
    |(root^p damped - I) Z|_F / |Z|_F, whose square is unbiased (E[Z Z^T] = I per column).
    """
    n = root.shape[-1]
    if n <= _PROBES:
        z = jnp.eye(n, dtype=root.dtype)
    else:
        signs = 2 * np.random.default_rng(0).integers(0, 2, size=(n, _PROBES)) - 1
        z = jnp.asarray(signs, root.dtype)
    damped = apply_damped(z)
    y = damped
    for _ in range(p):
        y = root @ y
    # The root of a zero matrix is defined as 0; a zero root of anything else has error 1.
    zero = jnp.all(root == 0) & jnp.all(damped == 0)
    return jnp.where(zero, 0.0, jnp.linalg.norm(y - z) / jnp.linalg.norm(z))


# Negative eigenvalues down to this fraction of the largest are round-off and clipped to zero:
# rounding a PSD matrix's entries to bfloat16 (relative error 2^-9) moves its eigenvalues by up
# to 2^-9 |A|_F, measured at 1e-4 to 1e-3 of the largest for Gram matrices of size 16 to 1024.
# Below it the input is not positive semi-definite, and the error says so.
_NEGATIVE_ROUND_OFF = 1e-2


def _eigh_in(matrix, p, damping, epsilon):
    symmetric = 0.5 * (matrix + matrix.T)
    signed, vectors = jnp.linalg.eigh(symmetric)
    eigenvalues = jnp.maximum(signed, 0.0)
    round_off = signed >= -_NEGATIVE_ROUND_OFF * jnp.max(eigenvalues)
    shift = damping * jnp.max(eigenvalues) + epsilon
    damped_values = eigenvalues + shift
    positive = damped_values > 0
    inverse_root = jnp.where(positive, jnp.where(positive, damped_values, 1.0) ** (-1.0 / p), 0.0)
    root = (vectors * inverse_root) @ vectors.T

    # The error is measured against the damped input with its round-off negative eigenvalues
    # clipped, as rooted (bfloat16 statistics have them at 1e-3 of the largest; measuring
    # against those rejected every root of such statistics), and its larger negative ones kept,
    # so an indefinite input is reported rather than silently replaced by its PSD part.
    reference_values = jnp.where(round_off, eigenvalues, signed) + shift

    def apply_damped(z):
        return vectors @ (reference_values[:, None] * (vectors.T @ z))

    return root, _error(root, apply_damped, p)


def _eigh_root(matrix, *, p, damping, epsilon, retry_tol):
    root, error = _eigh_in(matrix, p, damping, epsilon)
    finite = jnp.all(jnp.isfinite(root))
    used_float64 = jnp.asarray(False)
    can_retry = retry_tol is not None and matrix.dtype == jnp.float32 and jax.config.jax_enable_x64
    if can_retry:
        retry = jnp.all(jnp.isfinite(matrix)) & (~finite | ~(error <= retry_tol))

        def in_float64():
            root64, error64 = _eigh_in(matrix.astype(jnp.float64), p, damping, epsilon)
            return root64.astype(matrix.dtype), error64.astype(error.dtype)

        root, error = jax.lax.cond(retry, in_float64, lambda: (root, error))
        finite = jnp.all(jnp.isfinite(root))
        used_float64 = retry
    return root, _checked_input(
        matrix, MatrixRootInfo(error, jnp.zeros([], jnp.int32), finite, used_float64)
    )


def _checked_input(matrix, info):
    """A non-finite input makes any root meaningless (eigh returns a zero root for an Inf on
    the diagonal): reported as ``finite=False`` and an infinite error, as is a NaN error."""
    ok = jnp.all(jnp.isfinite(matrix))
    error = info.relative_error
    error = jnp.where(ok & ~jnp.isnan(error), error, jnp.inf).astype(error.dtype)
    return info._replace(relative_error=error, finite=info.finite & ok)


def _newton_root(matrix, *, p, damping, epsilon, tol, max_iterations):
    n = matrix.shape[-1]
    identity = jnp.eye(n, dtype=matrix.dtype)
    symmetric = 0.5 * (matrix + matrix.T)
    # The iteration runs on A / max|A_ij|, whose root is max|A_ij|^(1/p) times A's: in float32
    # the Frobenius norms below overflow for entries near 1e20 and underflow near 1e-20, which
    # gave a zero root reported with error 0.
    size = jnp.max(jnp.abs(symmetric))
    size = jnp.where((size > 0) & jnp.isfinite(size), size, 1.0)
    normalized = symmetric / size
    shift = damping * _largest_eigenvalue(normalized) + epsilon / size
    damped = normalized + shift * identity
    # The Frobenius norm bounds the spectral norm; any c <= (p + 1) / (2 |A|_2) converges.
    norm = jnp.linalg.norm(damped)
    zero = norm == 0
    scale = (1.0 + p) / (2.0 * jnp.where(zero, 1.0, norm))
    x = scale ** (1.0 / p) * identity
    m = scale * damped

    def residual(m):
        return jnp.linalg.norm(m - identity) / jnp.sqrt(n)

    def active(state):
        _, m, k = state
        return (residual(m) > tol) & (k < max_iterations) & ~zero

    def step(state):
        x, m, k = state
        t = ((p + 1) * identity - m) / p
        return x @ t, jnp.linalg.matrix_power(t, p) @ m, k + 1

    x, m, k = jax.lax.while_loop(active, step, (x, m, jnp.zeros([], jnp.int32)))
    root = jnp.where(zero, jnp.zeros_like(x), x)
    error = _error(root, lambda z: damped @ z, p)
    root = root * size ** (-1.0 / p)
    finite = jnp.all(jnp.isfinite(root))
    return root, _checked_input(matrix, MatrixRootInfo(error, k, finite, jnp.asarray(False)))


def _largest_eigenvalue(symmetric, iterations=32):
    """Largest eigenvalue of a PSD matrix by power iteration (matrix products only)."""
    n = symmetric.shape[-1]
    # A fixed, generic start vector: all ones plus a ramp, unlikely to be orthogonal to the top
    # eigenvector.
    v = jnp.ones(n, symmetric.dtype) + jnp.arange(n, dtype=symmetric.dtype) / n

    def body(_, v):
        w = symmetric @ v
        norm = jnp.linalg.norm(w)
        return jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), w)

    v = jax.lax.fori_loop(0, iterations, body, v / jnp.linalg.norm(v))
    return jnp.maximum(v @ symmetric @ v, 0.0)


def _with_spectral_derivative(single, p):
    """Wraps ``single(matrix, damping, epsilon)`` with the exact matrix function's derivative."""

    @jax.custom_jvp
    def root_of(matrix, damping, epsilon):
        return single(matrix, damping=damping, epsilon=epsilon)

    @root_of.defjvp
    def root_of_jvp(primals, tangents):
        matrix, damping, epsilon = primals
        matrix_dot, damping_dot, epsilon_dot = tangents
        root, info = root_of(matrix, damping, epsilon)
        symmetric = 0.5 * (matrix + matrix.T)
        eigenvalues, vectors = jnp.linalg.eigh(symmetric)
        eigenvalues = jnp.maximum(eigenvalues, 0.0)
        rotated = vectors.T @ (0.5 * (matrix_dot + matrix_dot.T)) @ vectors
        # eigh sorts ascending: the last eigenpair is the largest, which sets the damping.
        largest, largest_dot = eigenvalues[-1], rotated[-1, -1]
        shift = damping * largest + epsilon
        shift_dot = damping_dot * largest + damping * largest_dot + epsilon_dot
        shifted = eigenvalues + shift
        value, slope = _inverse_power(shifted, p)
        gap = shifted[:, None] - shifted[None, :]
        scale = jnp.maximum(shifted[:, None], shifted[None, :])
        # Divided differences lose digits to cancellation when eigenvalues are close; there the
        # slope at the midpoint is accurate to O(gap^2). eps^(1/3) balances the two errors.
        close = jnp.abs(gap) <= jnp.finfo(matrix.dtype).eps ** (1 / 3) * scale
        midpoint_slope = _inverse_power(0.5 * (shifted[:, None] + shifted[None, :]), p)[1]
        divided = jnp.where(
            close, midpoint_slope, (value[:, None] - value[None, :]) / jnp.where(close, 1.0, gap)
        )
        inner = divided * rotated + jnp.diag(slope * shift_dot)
        root_dot = (vectors @ inner @ vectors.T).astype(root.dtype)
        info_dot = jax.tree.map(_zero_tangent, info)
        return (root, info), (root_dot, info_dot)

    return root_of


def _inverse_power(x, p):
    """``x ** (-1/p)`` and its derivative, both 0 where ``x <= 0`` (the zero-matrix convention)."""
    positive = x > 0
    safe = jnp.where(positive, x, 1.0)
    value = jnp.where(positive, safe ** (-1.0 / p), 0.0)
    slope = jnp.where(positive, -value / (p * safe), 0.0)
    return value, slope


def _zero_tangent(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def eigenbasis(matrix: jax.Array, *, sequential: bool | None = None) -> jax.Array:
    r"""Eigenvectors of symmetric matrices ``[..., n, n]``, columns by decreasing eigenvalue.

    Computed in at least float32 and returned in that dtype. This is SOAP's first basis; later
    ones come from :func:`refresh_eigenbasis`. Eigenvalues below
    :math:`32\,n\,\epsilon_{\mathrm{mach}}` of the largest are zero up to round-off, and their
    eigenvectors, an arbitrary basis of the null space that changes with the input's round-off,
    are replaced by a canonical one:
    the eigenvectors of :math:`P\,\mathrm{diag}(1, \dots, n)\,P` for the projector :math:`P`
    onto that null space. Sharded and unsharded runs then agree.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.optimizers import eigenbasis
      >>> q = eigenbasis(jnp.diag(jnp.array([1.0, 3.0, 2.0])))
      >>> print(jnp.abs(q).astype(int))
      [[0 0 1]
       [1 0 0]
       [0 1 0]]

    Args:
      matrix: symmetric matrices, shape ``[..., n, n]``.
      sequential: one matrix at a time (see :func:`matrix_inverse_pth_root`).

    Returns:
      Orthogonal matrices of the same shape.
    """
    dtype = jnp.promote_types(matrix.dtype, jnp.float32)

    def single(m):
        symmetric = m.astype(dtype)
        values, vectors = jnp.linalg.eigh(0.5 * (symmetric + symmetric.T))
        # Eigenvectors of (numerically) zero eigenvalues are an arbitrary basis of the null
        # space, which changes with the input's round-off (sharded against unsharded runs).
        # They are replaced by a canonical one: the eigenvectors of the null-space projector P
        # times diag(1..n) times P, whose eigenvalues there (1/n to 1) are far from the zeros
        # on the range.
        n = values.shape[0]
        unseen = values <= _NULL_SPACE * n * jnp.finfo(dtype).eps * jnp.max(jnp.abs(values))
        projector = (vectors * unseen) @ vectors.T
        ramp = jnp.arange(1, n + 1, dtype=dtype) / n
        _, canonical = jnp.linalg.eigh((projector * ramp) @ projector)
        # eigh sorts ascending: L's null vectors come first, the canonical ones last.
        count = jnp.sum(unseen)
        canonical = jnp.roll(canonical, count, axis=1)
        vectors = jnp.where(unseen[None, :], canonical, vectors)
        return vectors[:, ::-1]

    return map_matrices(single, matrix, sequential=sequential)


# Eigenvalues below this times n eps_mach of the largest are zero up to round-off.
_NULL_SPACE = 32.0


def refresh_eigenbasis(
    matrix: jax.Array, basis: jax.Array, *, sequential: bool | None = None
) -> tuple[jax.Array, jax.Array]:
    r"""One power-iteration step towards the eigenbasis of ``matrix``, starting from ``basis``.

    The columns of :math:`Q` are first sorted by the estimated eigenvalues
    :math:`\mathrm{diag}(Q^\top A Q)`, largest first, then
    :math:`Q \leftarrow \mathrm{QR}((A + sI)Q)` with
    :math:`s = \sqrt{\epsilon_{\mathrm{mach}}}\,\max \mathrm{diag}(Q^\top A Q)`. The shift
    leaves the eigenvectors unchanged; where :math:`A` is rank-deficient it keeps the previous
    basis vectors, which plain QR would replace by an arbitrary completion of round-off that
    differs from run to run (sharded against unsharded).
    When :math:`A` changes slowly (an exponential moving average, as in SOAP) one step per
    refresh tracks its eigenvectors at the cost of a matrix product and a QR factorization,
    instead of a full eigendecomposition.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.optimizers import refresh_eigenbasis
      >>> a = jnp.diag(jnp.array([1.0, 4.0]))
      >>> q, order = refresh_eigenbasis(a, jnp.eye(2))
      >>> print(order, jnp.abs(q).astype(int).tolist())
      [1 0] [[0, 1], [1, 0]]

    Args:
      matrix: symmetric matrices ``[..., n, n]``.
      basis: current orthogonal bases, same shape.
      sequential: one matrix at a time (see :func:`matrix_inverse_pth_root`).

    Returns:
      ``(basis, order)``: the refreshed bases and, per matrix, the permutation applied to the old
      columns (``order[j]`` is the old column now in position ``j``), so that quantities stored
      in the old coordinates can be permuted to match.
    """
    dtype = jnp.promote_types(matrix.dtype, jnp.float32)

    def single(m, q):
        m, q = m.astype(dtype), q.astype(dtype)
        estimates = jnp.einsum("ij,ik,kj->j", q, m, q)
        order = jnp.argsort(-estimates, stable=True)
        q = q[:, order]
        # One step on A + s I (the same eigenvectors) with s far above A's round-off and far
        # below its resolved eigenvalues: where A is rank-deficient, A q is round-off, and QR
        # would complete the basis with arbitrary vectors that differ between runs (sharded
        # and unsharded); the shift keeps the previous vectors there instead.
        shift = jnp.sqrt(jnp.finfo(dtype).eps) * jnp.max(jnp.abs(estimates))
        q, _ = jnp.linalg.qr(m @ q + shift * q)
        return q, order

    return map_matrices(single, matrix, basis, sequential=sequential)
