"""What the speed and quality benchmarks share: the optimizers and the transformer block."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metaopt

ADAM, ADAMW = "optax.adam", "optax.adamw"


# The transformer block.


def transformer_parameters(
    rng: np.random.Generator, vocab: int, width: int, length: int
) -> dict[str, np.ndarray]:
    """One pre-LN block: embeddings, attention and MLP (4x width) matrices, norms, unembedding."""

    def dense(n_in, n_out):
        return (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)

    ones, zeros = np.ones(width, np.float32), np.zeros(width, np.float32)
    return {
        "embed": (0.02 * rng.standard_normal((vocab, width))).astype(np.float32),
        "position": (0.02 * rng.standard_normal((length, width))).astype(np.float32),
        "attention_norm": {"scale": ones, "bias": zeros},
        "query": dense(width, width),
        "key": dense(width, width),
        "value": dense(width, width),
        "out": dense(width, width),
        "mlp_norm": {"scale": ones.copy(), "bias": zeros.copy()},
        "hidden": dense(width, 4 * width),
        "hidden_bias": np.zeros(4 * width, np.float32),
        "output": dense(4 * width, width),
        "output_bias": zeros.copy(),
        "final_norm": {"scale": ones.copy(), "bias": zeros.copy()},
        "unembed": dense(width, vocab),
    }


def _layer_norm(x, norm):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + 1e-5) * norm["scale"] + norm["bias"]


def transformer_loss(params, tokens, targets, *, heads: int) -> jax.Array:
    """Mean next-token cross-entropy of one pre-LN causal self-attention + MLP block."""
    batch, length = tokens.shape
    width = params["query"].shape[0]
    x = params["embed"][tokens] + params["position"][:length]
    h = _layer_norm(x, params["attention_norm"])

    def split(w):
        return (h @ w).reshape(batch, length, heads, width // heads)

    q, k, v = split(params["query"]), split(params["key"]), split(params["value"])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // heads)
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
    x = x + attended @ params["out"]
    h = _layer_norm(x, params["mlp_norm"])
    x = x + jax.nn.gelu(h @ params["hidden"] + params["hidden_bias"]) @ params["output"]
    x = x + params["output_bias"]
    logits = _layer_norm(x, params["final_norm"]) @ params["unembed"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# Optimizers.


def make_shampoo(learning_rate, block_size=None, frequency=10, start=None, root_method="eigh"):
    """metaopt.shampoo with Adam grafting (its default) and the given blocks and root schedule."""
    blocking = None if block_size is None else metaopt.Blocking(block_size=block_size)
    return metaopt.shampoo(
        learning_rate,
        blocking=blocking,
        grafting=metaopt.Grafting("adam"),
        preconditioning_frequency=frequency,
        start_preconditioning_step=start,
        root_method=root_method,
    )


def make_soap(learning_rate, block_size=None, frequency=10):
    """metaopt.soap with the paper's settings (vectors get plain Adam, weight decay 0.01, as in
    the recorded runs) and the given block size."""
    blocking = (
        None
        if block_size is None
        else metaopt.Blocking(block_size=block_size, precondition_vectors=False)
    )
    return metaopt.soap(
        learning_rate, weight_decay=0.01, preconditioning_frequency=frequency, blocking=blocking
    )
