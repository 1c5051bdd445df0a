"""How Shampoo-type methods cut a parameter tensor into preconditioned blocks.

A tensor is first reshaped by merging adjacent small dimensions and dropping dimensions of size
one; each remaining axis is preconditioned unless it is too long (then it is left alone, a
diagonal fallback for that axis). A preconditioned axis longer than the block size is cut into
equal blocks, the last one zero-padded. Blocks are stored with the block grid first,
``[n_1, ..., n_k, b_1, ..., b_k]``, so a tensor sharded along an axis gives block statistics
sharded along the same grid axis, and batched matrix work (roots, eigenbases) spreads over the
devices that hold the blocks.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp

from metaopt.optimizers._common import check_number, safe_sqrt

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Blocking:
    """How parameters are cut into blocks with their own preconditioners (Shampoo, SOAP).

    Example:
      >>> import jax.numpy as jnp, metaopt
      >>> opt = metaopt.scale_by_shampoo(blocking=metaopt.Blocking(block_size=4))
      >>> state = opt.init(jnp.zeros((8, 6)))
      >>> # An [8, 6] matrix in blocks of at most 4: a 2 x 2 grid, the last columns zero-padded.
      >>> [s.shape for s in state.statistics]
      [(2, 2, 4, 4), (2, 2, 4, 4)]

    Attributes:
      block_size: longest preconditioned axis of one block. Longer axes are cut into blocks
        of this length (the last one zero-padded). Memory per preconditioned axis is about
        ``block_size`` numbers per parameter for the statistics, as much again for the
        preconditioner; each step costs about ``2 * block_size`` multiply-adds per parameter
        and axis.
      merge_small_dimensions: merge adjacent dimensions while their product stays within
        ``block_size`` (a ``[3, 3, 64, 128]`` convolution kernel becomes ``[576, 128]``), but
        never into a single axis: the last axis longer than one stays apart (``[32, 16]`` stays
        a matrix with two factors, ``[4, 8, 16]`` becomes ``[32, 16]``).
      max_preconditioned_dimension: axes longer than this (before blocking) get no
        preconditioner (for example the vocabulary axis of an embedding); None preconditions
        every axis. A tensor left with no preconditioned axis uses the diagonal (grafting) method.
      one_sided: precondition only the shortest preconditioned axis of each tensor (half the
        memory and work, one statistic per tensor).
      precondition_vectors: whether tensors with one axis (biases, norm scales) get a full
        matrix preconditioner; if False they use the diagonal method.

    A tensor with no elements (an axis of length 0) is never preconditioned: it gets the
    diagonal method, that is an empty update.
    """

    block_size: int = 1024
    merge_small_dimensions: bool = True
    max_preconditioned_dimension: int | None = 8192
    one_sided: bool = False
    precondition_vectors: bool = True

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int, got block_size={self.block_size!r}.")
        if self.block_size < 1:
            raise ValueError(
                f"block_size must be a positive integer, got block_size={self.block_size}. "
                "Typical values are 128 to 2048."
            )
        limit = self.max_preconditioned_dimension
        check_number("max_preconditioned_dimension", limit, optional=True, integer=True)
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(
                f"max_preconditioned_dimension must be None or a positive integer, got "
                f"max_preconditioned_dimension={limit!r}."
            )


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """The static layout of one parameter tensor's blocks.

    Attributes:
      shape: the parameter's shape.
      merged: its shape after merging small dimensions and dropping ones.
      preconditioned: indices of the preconditioned axes of ``merged``.
      counts: blocks along each axis of ``merged``.
      lengths: block length along each axis of ``merged``.
      origins: for each axis of ``merged``, the axes of ``shape`` merged into it.
    """

    shape: tuple[int, ...]
    merged: tuple[int, ...]
    preconditioned: tuple[int, ...]
    counts: tuple[int, ...]
    lengths: tuple[int, ...]
    origins: tuple[tuple[int, ...], ...]

    def to_blocks(self, x: jax.Array) -> jax.Array:
        """``[*shape] -> [*counts, *lengths]`` (zero-padded)."""
        x = self._padded(x)
        k = len(self.merged)
        x = x.reshape([s for n, b in zip(self.counts, self.lengths, strict=True) for s in (n, b)])
        return x.transpose([2 * i for i in range(k)] + [2 * i + 1 for i in range(k)])

    def from_blocks(self, blocks: jax.Array) -> jax.Array:
        """The inverse of :meth:`to_blocks` (padding dropped)."""
        k = len(self.merged)
        x = blocks.transpose([j for i in range(k) for j in (i, k + i)])
        x = x.reshape([n * b for n, b in zip(self.counts, self.lengths, strict=True)])
        x = x[tuple(slice(0, d) for d in self.merged)]
        return x.reshape(self.shape)

    def statistics(self, blocks: jax.Array) -> tuple[jax.Array, ...]:
        """Per preconditioned axis i, the Gram matrices ``G_(i) G_(i)^T`` of the blocks.

        Each has shape ``[*counts, b_i, b_i]``.
        """
        grid, block = _letters(len(self.merged))
        out = []
        for i in self.preconditioned:
            other = block[:i] + "Z" + block[i + 1 :]
            spec = f"{grid}{block},{grid}{other}->{grid}{block[i]}Z"
            out.append(jnp.einsum(spec, blocks, blocks, precision=_HIGHEST))
        return tuple(out)

    def multiply(
        self, blocks: jax.Array, matrices: tuple[jax.Array, ...], *, transpose: bool = False
    ) -> jax.Array:
        """Multiplies every block along each preconditioned axis i by ``matrices[i]`` (or its
        transpose): ``out[.., a, ..] = sum_c M[a, c] x[.., c, ..]``."""
        grid, block = _letters(len(self.merged))
        for i, matrix in zip(self.preconditioned, matrices, strict=True):
            matrix_spec = f"{grid}{block[i]}Z" if transpose else f"{grid}Z{block[i]}"
            out = block[:i] + "Z" + block[i + 1 :]
            spec = f"{grid}{block},{matrix_spec}->{grid}{out}"
            blocks = jnp.einsum(spec, blocks, matrix.astype(blocks.dtype), precision=_HIGHEST)
        return blocks

    def block_norms(self, blocks: jax.Array) -> jax.Array:
        """Frobenius norm of each block, ``[*counts]``, with a zero (not NaN) derivative at a
        zero block."""
        k = len(self.merged)
        axes = tuple(range(k, 2 * k))
        return safe_sqrt(jnp.sum(jnp.square(blocks), axis=axes))

    def tensor_block_norms(self, x: jax.Array) -> jax.Array:
        """:meth:`block_norms` of ``to_blocks(x)``, read in the tensor's own layout: the blocks
        are never transposed into a stack (a copy of the tensor), only summed in place."""
        x = self._padded(x)
        k = len(self.merged)
        x = x.reshape([s for n, b in zip(self.counts, self.lengths, strict=True) for s in (n, b)])
        return safe_sqrt(jnp.sum(jnp.square(x), axis=tuple(2 * i + 1 for i in range(k))))

    def per_block_to_tensor(self, values: jax.Array) -> jax.Array:
        """Spreads one value per block, ``[*counts]``, over the block's entries: ``[*shape]``."""
        x = values.reshape([s for n in self.counts for s in (n, 1)])
        x = jnp.broadcast_to(
            x, [s for n, b in zip(self.counts, self.lengths, strict=True) for s in (n, b)]
        )
        x = x.reshape([n * b for n, b in zip(self.counts, self.lengths, strict=True)])
        return x[tuple(slice(0, d) for d in self.merged)].reshape(self.shape)

    def _padded(self, x: jax.Array) -> jax.Array:
        """``x`` in the merged shape, zero-padded to whole blocks."""
        x = x.reshape(self.merged)
        padding = [
            (0, n * b - d) for n, b, d in zip(self.counts, self.lengths, self.merged, strict=True)
        ]
        return jnp.pad(x, padding) if any(high for _, high in padding) else x

    def matrix_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the per-axis statistics: ``[*counts, b_i, b_i]``."""
        return tuple(self.counts + (self.lengths[i],) * 2 for i in self.preconditioned)


def plan_blocks(shape: tuple[int, ...], blocking: Blocking) -> BlockPlan:
    """Works out the block layout of a tensor of ``shape`` (see :class:`Blocking`)."""
    merged: list[int] = []
    origins: list[tuple[int, ...]] = []
    # Merging never turns a tensor with two or more axes longer than one into a vector: a small
    # matrix keeps its two Kronecker factors (a 32 x 16 weight merged into a 512-vector got a
    # full 512 x 512 factor in Shampoo and none in SOAP; both then lost to Adam).
    long_axes = [axis for axis, d in enumerate(shape) if d != 1]
    apart = long_axes[-1] if len(long_axes) > 1 else None
    for axis, d in enumerate(shape):
        whole = axis == apart and merged[-1] != 1 and sum(m != 1 for m in merged) == 1
        if (
            blocking.merge_small_dimensions
            and merged
            and merged[-1] * d <= blocking.block_size
            and not whole
        ):
            merged[-1] *= d
            origins[-1] += (axis,)
        else:
            merged.append(d)
            origins.append((axis,))
    kept = [i for i, d in enumerate(merged) if d != 1]
    merged = [merged[i] for i in kept]
    origins = [tuple(a for a in origins[i] if shape[a] != 1) for i in kept]
    limit = blocking.max_preconditioned_dimension
    preconditioned = [i for i, d in enumerate(merged) if limit is None or d <= limit]
    if len(merged) == 1 and not blocking.precondition_vectors:
        preconditioned = []
    if 0 in merged:
        # An empty tensor has nothing to precondition (and no blocks to cut): the diagonal
        # method gives it an empty update.
        preconditioned = []
    if blocking.one_sided and len(preconditioned) > 1:
        preconditioned = [min(preconditioned, key=lambda i: merged[i])]
    counts, lengths = [], []
    for i, d in enumerate(merged):
        if i in preconditioned and d > blocking.block_size:
            counts.append(math.ceil(d / blocking.block_size))
            lengths.append(blocking.block_size)
        else:
            counts.append(1)
            lengths.append(d)
    return BlockPlan(
        shape=tuple(shape),
        merged=tuple(merged),
        preconditioned=tuple(preconditioned),
        counts=tuple(counts),
        lengths=tuple(lengths),
        origins=tuple(origins),
    )


def _letters(k: int) -> tuple[str, str]:
    """einsum letters for a block tensor of rank k: grid axes (upper case), block axes (lower)."""
    if k > 12:
        raise ValueError(f"tensors of rank {k} are not supported (at most 12 axes after merging).")
    return string.ascii_uppercase[:k], string.ascii_lowercase[:k]


def grid_sharding(plan: BlockPlan, parameter: jax.Array, extra_axes: int):
    """A sharding for per-block state ``[*counts, ...extra_axes]`` that follows the parameter's.

    A grid axis inherits the mesh axes of the parameter axis it was cut from when that axis was
    not merged with another and its block count divides evenly over those mesh axes; other axes
    are replicated. Returns None when the parameter is not a concrete array with a
    ``NamedSharding`` (inside ``jit`` XLA propagates shardings itself).
    """
    sharding = getattr(parameter, "sharding", None)
    if isinstance(parameter, jax.core.Tracer) or not isinstance(
        sharding, jax.sharding.NamedSharding
    ):
        return None
    spec = tuple(sharding.spec) + (None,) * (len(plan.shape) - len(sharding.spec))
    grid_spec = []
    for count, origin in zip(plan.counts, plan.origins, strict=True):
        axes = spec[origin[0]] if len(origin) == 1 else None
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        devices = math.prod(sharding.mesh.shape[name] for name in names)
        grid_spec.append(axes if names and count % devices == 0 else None)
    partition = jax.sharding.PartitionSpec(*grid_spec, *([None] * extra_axes))
    return jax.sharding.NamedSharding(sharding.mesh, partition)


def place(x: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Puts a freshly initialized state array on ``sharding`` (unchanged for None)."""
    return x if sharding is None else jax.device_put(x, sharding)
