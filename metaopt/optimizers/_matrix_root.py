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


class MatrixRootInfo(NamedTuple):
    """How well an inverse root was computed; every field is an array (batched like the input).

    Attributes:
      relative_error: :math:`\\lVert X^p \\tilde A - I\\rVert_F / \\sqrt n` for the returned
        :math:`X` and the damped matrix :math:`\\tilde A` (0 for a zero matrix, whose root is
        defined as 0).
      iterations: Newton iterations used (0 for the eigendecomposition).
      finite: whether every entry of the root is finite.
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
) -> tuple[jax.Array, MatrixRootInfo]:
    r"""Computes :math:`(A + (\delta\lambda_{\max}(A) + \epsilon) I)^{-1/p}` for symmetric PSD A.

    ``matrix`` has shape ``[..., n, n]``; leading dimensions are a batch (stacked Shampoo
    blocks). The input is symmetrized first, and negative eigenvalues from round-off are
    clipped to zero. Damping is relative to the largest eigenvalue (``damping``, which keeps the
    condition number at most about :math:`1/\delta`) plus an absolute ``epsilon``. A zero matrix
    (no statistics yet) has the root 0 rather than an infinite one.

    ``method="eigh"`` is correct for every integer ``p`` and any conditioning the working
    precision can represent; when the input is float32 and the error exceeds ``retry_tol`` (or
    the root is not finite), it is recomputed in float64 if JAX's float64 is enabled
    (``jax_enable_x64``) and cast back. ``method="newton"`` runs the coupled iteration
    :math:`X_{k+1} = X_k T_k,\ M_{k+1} = T_k^p M_k,\ T_k = ((p+1)I - M_k)/p` from
    :math:`X_0 = c^{1/p} I,\ M_0 = c\tilde A`, which converges to :math:`\tilde A^{-1/p}` for
    any SPD matrix; it stops when :math:`\lVert M_k - I\rVert` is below ``newton_tol`` (relative
    Frobenius norm) or after ``newton_max_iterations``.

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

    Returns:
      ``(root, info)``: the inverse roots, shaped like ``matrix``, and :class:`MatrixRootInfo`.
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
        single = functools.partial(
            _eigh_root, p=p, damping=damping, epsilon=epsilon, retry_tol=retry_tol
        )
    else:
        single = functools.partial(
            _newton_root,
            p=p,
            damping=damping,
            epsilon=epsilon,
            tol=newton_tol,
            max_iterations=newton_max_iterations,
        )
    batch_shape, n = matrix.shape[:-2], matrix.shape[-1]
    flat = matrix.reshape((-1, n, n))
    root, info = jax.vmap(single)(flat)
    return root.reshape(matrix.shape), jax.tree.map(lambda x: x.reshape(batch_shape), info)


def _error(root, damped, p):
    """RMS deviation of root^p @ damped from the identity (0 for a zero root)."""
    n = damped.shape[-1]
    power = jnp.linalg.matrix_power(root, p)
    deviation = power @ damped - jnp.eye(n, dtype=damped.dtype)
    zero = jnp.all(root == 0)
    return jnp.where(zero, 0.0, jnp.linalg.norm(deviation) / jnp.sqrt(n))


def _eigh_in(matrix, p, damping, epsilon):
    symmetric = 0.5 * (matrix + matrix.T)
    eigenvalues, vectors = jnp.linalg.eigh(symmetric)
    eigenvalues = jnp.maximum(eigenvalues, 0.0)
    shift = damping * jnp.max(eigenvalues) + epsilon
    damped_values = eigenvalues + shift
    positive = damped_values > 0
    inverse_root = jnp.where(positive, jnp.where(positive, damped_values, 1.0) ** (-1.0 / p), 0.0)
    root = (vectors * inverse_root) @ vectors.T
    damped = symmetric + shift * jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
    return root, _error(root, damped, p)


def _eigh_root(matrix, *, p, damping, epsilon, retry_tol):
    root, error = _eigh_in(matrix, p, damping, epsilon)
    finite = jnp.all(jnp.isfinite(root))
    used_float64 = jnp.asarray(False)
    can_retry = retry_tol is not None and matrix.dtype == jnp.float32 and jax.config.jax_enable_x64
    if can_retry:
        retry = ~finite | ~(error <= retry_tol)

        def in_float64():
            root64, error64 = _eigh_in(matrix.astype(jnp.float64), p, damping, epsilon)
            return root64.astype(matrix.dtype), error64.astype(error.dtype)

        root, error = jax.lax.cond(retry, in_float64, lambda: (root, error))
        finite = jnp.all(jnp.isfinite(root))
        used_float64 = retry
    return root, MatrixRootInfo(error, jnp.zeros([], jnp.int32), finite, used_float64)


def _newton_root(matrix, *, p, damping, epsilon, tol, max_iterations):
    n = matrix.shape[-1]
    identity = jnp.eye(n, dtype=matrix.dtype)
    symmetric = 0.5 * (matrix + matrix.T)
    damped = symmetric + (damping * _largest_eigenvalue(symmetric) + epsilon) * identity
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
    finite = jnp.all(jnp.isfinite(root))
    return root, MatrixRootInfo(_error(root, damped, p), k, finite, jnp.asarray(False))


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
