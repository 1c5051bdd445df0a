"""Shampoo's root step: the inverse roots of every statistic, same-shaped blocks in one batch.

A model's tensors are cut into blocks of a handful of shapes (``b x b`` for every full block,
smaller ones at the edges), so the roots of all its statistics are a few stacks of equal
matrices. Computing them tensor by tensor and axis by axis put one loop per tensor and axis
into every compiled step (15 on a 4M-parameter MLP), although only root steps run them; XLA
compiled each separately. Stacking the matrices of equal size, dtype and root across tensors
leaves one loop per kind of matrix, however many tensors there are.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from metaopt.optimizers._matrix_root import (
    MatrixRootInfo,
    matrix_inverse_pth_root,
    sequential_by_default,
)


def stacked_inverse_roots(
    matrices: Sequence[jax.Array],
    exponents: Sequence[int],
    *,
    damping: jax.Array | float,
    epsilon: jax.Array | float,
    method: str,
) -> list[tuple[jax.Array, MatrixRootInfo]]:
    """``matrix_inverse_pth_root(matrices[i], exponents[i])`` for every i, batched by kind.

    Where the roots run one matrix at a time (a single CPU device, see
    :func:`~metaopt.optimizers._matrix_root.sequential_by_default`), the matrices of equal size,
    dtype and exponent are concatenated into one stack and rooted by one call, so the compiled
    program holds one loop per kind instead of one per input; each matrix gets the same
    arithmetic as before, so the roots are unchanged bit for bit. Elsewhere each input stays
    its own vectorized call: concatenating stacks that are sharded like their parameters would
    move them between devices.

    Example:
      >>> import jax.numpy as jnp
      >>> from metaopt.optimizers._shampoo_roots import stacked_inverse_roots
      >>> a, b = jnp.eye(2)[None] * 16.0, jnp.eye(2)[None, None] * 81.0
      >>> (ra, _), (rb, _) = stacked_inverse_roots(
      ...     [a, b], [4, 4], damping=0.0, epsilon=0.0, method="eigh")
      >>> print(ra[0, 0, 0], rb.shape, rb[0, 0, 0, 0])
      0.5 (1, 1, 2, 2) 0.33333334

    Args:
      matrices: stacks of symmetric PSD matrices, each ``[..., n, n]``.
      exponents: the root of each stack.
      damping: relative damping, as in ``matrix_inverse_pth_root``.
      epsilon: absolute damping.
      method: ``"eigh"`` or ``"newton"``.

    Returns:
      ``(root, info)`` per input, shaped like the input (``info`` fields like its batch).
    """
    if len(matrices) != len(exponents):
        raise ValueError(
            f"matrices and exponents must have the same length, got {len(matrices)} and "
            f"{len(exponents)}."
        )

    def roots(stack, p):
        return matrix_inverse_pth_root(
            stack, p, damping=damping, epsilon=epsilon, method=method, sequential=sequential
        )

    sequential = sequential_by_default()
    if not sequential:
        return [roots(m, p) for m, p in zip(matrices, exponents, strict=True)]
    groups: dict[tuple, list[int]] = {}
    for i, (m, p) in enumerate(zip(matrices, exponents, strict=True)):
        groups.setdefault((m.shape[-1], jnp.dtype(m.dtype), p), []).append(i)
    out: list = [None] * len(matrices)
    for (n, _, p), members in groups.items():
        stack = jnp.concatenate([matrices[i].reshape(-1, n, n) for i in members])
        root, info = roots(stack, p)
        start = 0
        for i in members:
            batch = matrices[i].shape[:-2]
            stop = start + matrices[i].size // (n * n)
            out[i] = (
                root[start:stop].reshape(matrices[i].shape),
                jax.tree.map(lambda x, a=start, b=stop, s=batch: x[a:b].reshape(s), info),
            )
            start = stop
    return out
