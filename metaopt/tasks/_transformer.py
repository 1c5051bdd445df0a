"""A small decoder-only transformer on a synthetic next-token task, as a training task.

The sequences come from a sparse second-order Markov chain, so the next token depends on the two
before it: a model must attend to the previous position to do better than a bigram model, and the
best possible loss is known. Plain JAX, no neural-network library.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.tasks._regression import _check_count
from metaopt.tasks._training_tasks import (
    _DATA_SEED,
    PARAMETERIZATIONS,
    TrainingTask,
    _check_choice,
    _check_scale,
    _jitted_task,
    _matching,
    _normal_weights,
    _update_multiplier,
)

VOCAB_SIZE = 16
SEQUENCE_LENGTH = 16
_SUCCESSORS = 3  # tokens that may follow each pair of tokens
_NUM_TRAIN, _NUM_TEST = 2048, 512
_NORM_EPSILON = 1e-5


def _markov_chain_sequences(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Train and test sequences of the chain, and the test set's optimal mean loss.

    Each pair of tokens ``(a, b)`` is followed by one of :data:`_SUCCESSORS` tokens, chosen at
    random, with probabilities drawn from a flat Dirichlet. The first two tokens of a sequence
    are uniform, so the first target can only be guessed (loss :math:`\\log V`).
    """
    contexts = VOCAB_SIZE**2
    successors = np.stack(
        [rng.choice(VOCAB_SIZE, _SUCCESSORS, replace=False) for _ in range(contexts)]
    )
    probabilities = rng.dirichlet(np.ones(_SUCCESSORS), contexts)
    # Inverse-CDF sampling over each context's successors in increasing token order; the last
    # successor takes any rounding slack of the cumulative sum, so no zero-probability token
    # is ever drawn.
    order = np.argsort(successors, axis=1)
    successors = np.take_along_axis(successors, order, 1)
    probabilities = np.take_along_axis(probabilities, order, 1)
    cumulative = probabilities.cumsum(1)[:, :-1]

    def sequences(count: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.zeros((count, SEQUENCE_LENGTH + 1), np.int32)
        tokens[:, :2] = rng.integers(VOCAB_SIZE, size=(count, 2))
        loss = np.full((count, SEQUENCE_LENGTH), math.log(VOCAB_SIZE))
        for t in range(2, SEQUENCE_LENGTH + 1):
            context = tokens[:, t - 2] * VOCAB_SIZE + tokens[:, t - 1]
            choice = (rng.random((count, 1)) > cumulative[context]).sum(1)
            tokens[:, t] = successors[context, choice]
            loss[:, t - 1] = -np.log(probabilities[context, choice])
        return tokens, loss.mean()

    train, _ = sequences(_NUM_TRAIN)
    test, optimal_test_loss = sequences(_NUM_TEST)
    return train, test, float(optimal_test_loss)


@functools.cache
def _chain_data() -> tuple[jax.Array, jax.Array, float]:
    """The sequences of :func:`_markov_chain_sequences` on the device, shared by every task."""
    train, test, optimal_test_loss = _markov_chain_sequences(np.random.default_rng(_DATA_SEED))
    return jnp.asarray(train), jnp.asarray(test), optimal_test_loss


def _layer_norm(x: jax.Array, norm: dict[str, jax.Array]) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    variance = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + _NORM_EPSILON) * norm["scale"] + norm["bias"]


def _transformer_apply(params: dict, tokens: jax.Array, heads: int, attention_scale: float):
    """Logits ``(..., length, VOCAB_SIZE)`` of the pre-norm decoder for ``tokens (..., length)``."""
    length = tokens.shape[-1]
    h = params["embedding"][tokens] + params["position"][:length]
    causal = jnp.tril(jnp.ones((length, length), bool))
    for block in params["blocks"]:
        a = _layer_norm(h, block["attention_norm"])
        split = (*a.shape[:-1], heads, a.shape[-1] // heads)
        query, key, value = ((a @ block[name]).reshape(split) for name in ("query", "key", "value"))
        scores = attention_scale * jnp.einsum("...qhc,...khc->...hqk", query, key)
        # The diagonal is always allowed, so no row of the softmax is all masked.
        scores = jnp.where(causal, scores, -jnp.inf)
        attended = jnp.einsum("...hqk,...khc->...qhc", jax.nn.softmax(scores, -1), value)
        h = h + attended.reshape(a.shape) @ block["output"]
        m = _layer_norm(h, block["mlp_norm"])
        m = jax.nn.gelu(m @ block["mlp_in"]["w"] + block["mlp_in"]["b"])
        h = h + m @ block["mlp_out"]["w"] + block["mlp_out"]["b"]
    return _layer_norm(h, params["final_norm"]) @ params["unembedding"]


def transformer_task(
    width: int = 32,
    heads: int = 2,
    layers: int = 1,
    batch_size: int = 32,
    init_scale: float = 1.0,
    parameterization: str = "standard",
) -> TrainingTask:
    r"""A decoder-only transformer that predicts the next token of a Markov chain.

    **Data.** Sequences of 17 tokens from a vocabulary of 16, drawn from a
    fixed sparse second-order Markov chain: each pair of tokens is followed by one of 3 tokens,
    with fixed random probabilities. The first two tokens are uniform. The training set holds
    2048 sequences and the test set 512, both made from a fixed seed. The model reads the first
    16 tokens and is scored by the mean cross-entropy of its prediction of each next token. The
    chain's own probabilities score 0.95 on the test set and a uniform guess 2.77
    (:math:`\log 16`); a bigram model scores about 2.49, since it does not see the
    token two positions back.

    **Model.** Token and learned positional embeddings, ``layers`` pre-norm blocks (causal
    multi-head self-attention with ``heads`` heads, then a GELU MLP of width ``4 * width``,
    each added to the residual stream), a final layer norm and an untied linear read-out.
    Layer norms have a learned scale (1) and bias (0); the attention projections have no bias.

    **Parameterization**, with every weight multiplied by ``init_scale``: as in
    :func:`mlp_task`, the embeddings are the input layer (:math:`\mathcal{N}(0, 1/\mathrm{fan\_in})`
    with fan-in the vocabulary size or the sequence length, since they act on one-hot vectors),
    the attention and MLP matrices are hidden (:math:`\mathcal{N}(0, 1/\mathrm{fan\_in})`) and the
    read-out is the output (:math:`\mathcal{N}(0, 1/\mathrm{fan\_in}^2)` under ``"mup"``,
    :math:`\mathcal{N}(0, 1/\mathrm{fan\_in})` under ``"standard"``). Under ``"mup"`` attention
    scores are scaled by :math:`1/d_{\mathrm{head}}` instead of :math:`1/\sqrt{d_{\mathrm{head}}}`
    (Yang et al., "Tensor Programs V", 2021, section 4). ``update_multipliers`` follows the same
    muLO rule: 1 for the embeddings and every vector, :math:`1/\mathrm{fan\_in}` for the other
    matrices.

    Example:
      >>> import jax
      >>> from metaopt.tasks import transformer_task
      >>> task = transformer_task(width=32, heads=2, layers=1, batch_size=8)
      >>> params = task.init(jax.random.key(0))
      >>> inputs, targets = task.sample_batch(jax.random.key(1))
      >>> inputs.shape, targets.shape, inputs.dtype
      ((8, 16), (8, 16), dtype('int32'))
      >>> print(f"{float(task.evaluate(params)['train_loss']):.1f}")  # a uniform guess: 2.77
      3.3
      >>> task.update_multipliers(params)["blocks"][0]["mlp_out"]["w"]  # 1 / (4 * width)
      0.0078125

    Args:
      width: the width of the residual stream, divisible by ``heads``.
      heads: the number of attention heads.
      layers: the number of transformer blocks.
      batch_size: the number of sequences of a minibatch.
      init_scale: a positive factor on every initial weight.
      parameterization: ``"standard"`` or ``"mup"``.

    Returns:
      The :class:`TrainingTask`; the same object for the same arguments. A batch is a pair
      ``(inputs, targets)`` of int32 tokens of shape ``(batch_size, 16)``, the targets being the
      inputs shifted by one position. ``evaluate`` returns the losses and the next-token
      accuracies on the training and test sets.

    Raises:
      ValueError: if an argument is not as described above.
    """
    width = _check_count("width", width)
    heads = _check_count("heads", heads)
    if width % heads:
        raise ValueError(
            f"width must be a multiple of heads, got width={width} and heads={heads}. "
            f"Use for example width={heads * max(1, round(width / heads))}."
        )
    layers = _check_count("layers", layers)
    batch_size = _check_count("batch_size", batch_size)
    init_scale = _check_scale("init_scale", init_scale)
    _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    return _transformer_task(width, heads, layers, batch_size, init_scale, parameterization)


@functools.lru_cache(maxsize=64)
def _transformer_task(width, heads, layers, batch_size, init_scale, parameterization):
    train, test, _ = _chain_data()
    head_size = width // heads
    attention_scale = 1 / head_size if parameterization == "mup" else head_size**-0.5
    name = (
        f"transformer-markov-w{width}-h{heads}-l{layers}-b{batch_size}-init{init_scale:g}"
        f"-{parameterization}"
    )
    # Role and shape of each weight, in the tree of the parameters (vectors are added in init).
    block = {
        "query": ("hidden", (width, width)),
        "key": ("hidden", (width, width)),
        "value": ("hidden", (width, width)),
        "output": ("hidden", (width, width)),
        "mlp_in": {"w": ("hidden", (width, 4 * width))},
        "mlp_out": {"w": ("hidden", (4 * width, width))},
    }
    weights = {
        "embedding": ("input", (VOCAB_SIZE, width)),
        "position": ("input", (SEQUENCE_LENGTH, width)),
        "blocks": [block] * layers,
        "unembedding": ("output", (width, VOCAB_SIZE)),
    }
    is_weight = lambda node: isinstance(node, tuple)
    weight_leaves, weight_tree = jax.tree.flatten(weights, is_leaf=is_weight)

    def with_vectors(tree: dict, norm: Any, bias: Any) -> dict:
        """``tree`` with its layer norms and MLP biases filled in by ``norm()`` and ``bias(n)``."""
        tree = {**tree, "final_norm": norm(), "blocks": [dict(b) for b in tree["blocks"]]}
        for b in tree["blocks"]:
            b["attention_norm"], b["mlp_norm"] = norm(), norm()
            b["mlp_in"] = {**b["mlp_in"], "b": bias(4 * width)}
            b["mlp_out"] = {**b["mlp_out"], "b": bias(width)}
        return tree

    def init(key: jax.Array) -> dict:
        drawn = _normal_weights(key, weight_leaves, parameterization, init_scale)
        zeros = lambda n: jnp.zeros(n, jnp.float32)
        norm = lambda: {"scale": jnp.ones(width, jnp.float32), "bias": zeros(width)}
        return with_vectors(jax.tree.unflatten(weight_tree, drawn), norm, zeros)

    multipliers = with_vectors(
        jax.tree.unflatten(
            weight_tree, [_update_multiplier(shape, role) for role, shape in weight_leaves]
        ),
        lambda: {"scale": 1.0, "bias": 1.0},
        lambda n: 1.0,
    )

    def logits(params: dict, inputs: jax.Array) -> jax.Array:
        return _transformer_apply(params, inputs, heads, attention_scale)

    def loss(params: dict, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        inputs, targets = batch
        losses = optax.softmax_cross_entropy_with_integer_labels(logits(params, inputs), targets)
        return losses.mean()

    def sample_batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        index = jax.random.randint(key, (batch_size,), 0, train.shape[0], jnp.int32)
        sequences = train[index]
        return sequences[:, :-1], sequences[:, 1:]

    def evaluate(params: dict) -> dict[str, jax.Array]:
        metrics = {}
        for split, sequences in (("train", train), ("test", test)):
            inputs, targets = sequences[:, :-1], sequences[:, 1:]
            out = logits(params, inputs)
            losses = optax.softmax_cross_entropy_with_integer_labels(out, targets)
            metrics[f"{split}_loss"] = losses.mean()
            correct = jnp.argmax(out, axis=-1) == targets
            metrics[f"{split}_accuracy"] = jnp.mean(correct.astype(jnp.float32))
        return metrics

    def update_multipliers(params: dict) -> dict:
        return _matching(params, multipliers, name)

    return _jitted_task(name, init, loss, sample_batch, evaluate, update_multipliers)
