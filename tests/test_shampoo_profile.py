"""benchmarks/shampoo/profile.py: the profile of Shampoo's step by kind of operation."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks.shampoo import profile


def test_dots_are_told_apart_and_their_flops_counted_from_the_compiled_shapes():
    def step(x, w, blocks, matrices):
        plain = x @ w  # [6, 5] x [5, 7]: a model matmul
        batched = jnp.einsum("bij,bjk->bik", blocks, matrices)  # 3 blocks of [4, 2] x [2, 9]
        return jnp.sin(plain), batched

    args = (jnp.ones((6, 5)), jnp.ones((5, 7)), jnp.ones((3, 4, 2)), jnp.ones((3, 2, 9)))
    kinds = profile.classify(jax.jit(step).lower(*args).compile().as_text())
    by_kind = {}
    for kind, flops in kinds.values():
        by_kind[kind] = by_kind.get(kind, 0.0) + flops
    assert by_kind["model matmuls"] == 2 * 6 * 7 * 5
    assert by_kind["block matmuls"] == 2 * 3 * 4 * 9 * 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_tiny_run_reports_every_kind_and_the_floors():
    text = profile.run([8], width=16, depth=1, batch=4, steps=1)
    assert "| model matmuls |" in text and "| block matmuls |" in text
    assert "floor: Adam + block matmuls as measured" in text
    assert "the roots alone, block 8" in text and "eighs ×" in text
    # Adam's step holds no batched dot; Shampoo's does.
    block_row = next(line for line in text.splitlines() if line.startswith("| block matmuls"))
    adam_ms, shampoo_ms = (float(cell) for cell in block_row.strip("| \n").split("|")[1:3])
    assert adam_ms == 0.0 and shampoo_ms > 0.0
