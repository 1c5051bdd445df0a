"""Shampoo and SOAP benchmarks: cost per step against Adam, and steps to a target loss.

Two kinds of measurement:

1. **Speed**, on an MLP (default about 4M float32 parameters) and on one pre-LN transformer block
   (embedding, causal self-attention, MLP, unembedding) over synthetic tokens. Every variant is
   one jitted training step (loss gradient, optimizer update, apply) with parameters and state
   donated, timed with :func:`benchmarks.harness.measure` in the same interleaved rounds as
   ``optax.adam`` and ``optax.adamw``:

   * *ordinary steps*, which compute no inverse root (Shampoo) or eigenbasis refresh (SOAP) but
     do apply the preconditioners; their compile times; and the optimizer update alone, from
     fixed gradients;
   * *amortized steps*: one jitted loop of ``root_every`` training steps whose last step
     recomputes Shampoo's roots (or, for SOAP, refreshes its bases every ``soap_refresh_every``
     steps), per step, against the same loop of Adam steps.

2. **Quality**: steps to reach a target loss, at each method's best learning rate of one grid,
   on a deep linear autoencoder of scikit-learn's digits (full batch; an ill-conditioned problem
   whose optimum is known in closed form from PCA) and on the transformer block learning a
   second-order Markov chain (minibatches; the target is set above the chain's own loss).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

import metaopt
from benchmarks import harness
from benchmarks.optimizers import mlp_loss, mlp_parameters

_BLOCK_SIZES = flags.DEFINE_list(
    "shampoo_block_sizes", ["128", "512"], "Block sizes of the Shampoo and SOAP speed variants."
)
_MLP_INPUTS = flags.DEFINE_integer("shampoo_mlp_inputs", 784, "MLP input features.", lower_bound=1)
_MLP_WIDTH = flags.DEFINE_integer("shampoo_mlp_width", 1024, "MLP hidden width.", lower_bound=1)
_MLP_DEPTH = flags.DEFINE_integer("shampoo_mlp_depth", 4, "MLP hidden layers.", lower_bound=1)
_MLP_BATCH = flags.DEFINE_integer("shampoo_mlp_batch", 256, "MLP batch size.", lower_bound=1)
_MODEL_WIDTH = flags.DEFINE_integer(
    "shampoo_d_model", 256, "Transformer width (speed benchmark).", lower_bound=1
)
_HEADS = flags.DEFINE_integer("shampoo_heads", 4, "Attention heads (speed).", lower_bound=1)
_SEQUENCE = flags.DEFINE_integer(
    "shampoo_seq_len", 128, "Tokens per sequence (speed).", lower_bound=1
)
_VOCAB = flags.DEFINE_integer("shampoo_vocab", 1024, "Vocabulary size (speed).", lower_bound=2)
_BATCH = flags.DEFINE_integer("shampoo_batch", 8, "Sequences per batch (speed).", lower_bound=1)
_SPEED_MODELS = flags.DEFINE_list(
    "shampoo_speed_models", ["mlp", "transformer"], "Models of the speed benchmark, in order."
)
_ROOT_EVERY = flags.DEFINE_integer(
    "shampoo_root_every",
    20,
    "Shampoo's preconditioning_frequency in the amortized loop.",
    lower_bound=1,
)
_REFRESH_EVERY = flags.DEFINE_integer(
    "soap_refresh_every",
    10,
    "SOAP's preconditioning_frequency in the amortized loop.",
    lower_bound=1,
)
_ROOT_METHOD = flags.DEFINE_enum(
    "shampoo_root_method",
    "eigh",
    ["eigh", "newton"],
    "Shampoo's root_method in the amortized loop (the library default is eigh).",
)
_SOAP_AMORTIZED = flags.DEFINE_bool(
    "soap_amortized", True, "Whether to time SOAP's amortized loop."
)
_MAX_REPEATS = flags.DEFINE_integer(
    "shampoo_max_repeats", 20, "Caps --repeats for this suite's single steps.", lower_bound=1
)
_AMORTIZED_REPEATS = flags.DEFINE_integer(
    "shampoo_amortized_repeats", 6, "Caps --repeats for the amortized loops.", lower_bound=1
)
_MAX_COMPILE_REPEATS = flags.DEFINE_integer(
    "shampoo_max_compile_repeats", 3, "Caps --compile_repeats for this suite.", lower_bound=1
)
_LEARNING_RATES = flags.DEFINE_list(
    "shampoo_learning_rates",
    ["1e-3", "3e-3", "1e-2", "3e-2"],
    "Learning-rate grid of the quality runs, the same for every method.",
)
_QUALITY_FREQUENCY = flags.DEFINE_integer(
    "shampoo_quality_frequency",
    10,
    "Shampoo's preconditioning_frequency in quality runs.",
    lower_bound=1,
)
_DIGITS_HIDDEN = flags.DEFINE_list(
    "shampoo_digits_hidden", ["32", "16", "32"], "Hidden widths of the linear autoencoder."
)
_DIGITS_STEPS = flags.DEFINE_integer(
    "shampoo_digits_steps", 1000, "Full-batch steps on the digits autoencoder.", lower_bound=1
)
_DIGITS_TARGET = flags.DEFINE_float(
    "shampoo_digits_target",
    0.01,
    "Target: loss at most (1 + this) times the PCA optimum.",
    lower_bound=0.0,
)
_MARKOV_VOCAB = flags.DEFINE_integer(
    "shampoo_markov_vocab", 32, "Markov chain states.", lower_bound=2
)
_MARKOV_SEQUENCE = flags.DEFINE_integer(
    "shampoo_markov_seq_len", 32, "Tokens per Markov sequence.", lower_bound=3
)
_MARKOV_WIDTH = flags.DEFINE_integer(
    "shampoo_markov_d_model", 64, "Transformer width on the Markov task.", lower_bound=1
)
_MARKOV_HEADS = flags.DEFINE_integer(
    "shampoo_markov_heads", 4, "Attention heads on the Markov task.", lower_bound=1
)
_MARKOV_BATCH = flags.DEFINE_integer(
    "shampoo_markov_batch", 32, "Sequences per minibatch on the Markov task.", lower_bound=1
)
_MARKOV_STEPS = flags.DEFINE_integer(
    "shampoo_markov_steps", 800, "Training steps on the Markov task.", lower_bound=1
)
_MARKOV_EVAL_EVERY = flags.DEFINE_integer(
    "shampoo_markov_eval_every", 20, "Steps between held-out evaluations.", lower_bound=1
)
_MARKOV_TARGET = flags.DEFINE_float(
    "shampoo_markov_target",
    0.3,
    "Target: held-out loss at most the chain's own loss plus this many nats.",
    lower_bound=0.0,
)
_PLOT_DIR = flags.DEFINE_string(
    "shampoo_plot_dir",
    str(harness.REPORT_PATH.parent / "_static"),
    "Folder for the loss-curve images (the report links them as _static/<name>.png).",
)

flags.register_validator(
    "shampoo_block_sizes",
    lambda values: bool(values) and all(v.isdigit() and int(v) > 0 for v in values),
    message="--shampoo_block_sizes takes comma-separated positive integers, e.g. 128,512.",
)
flags.register_validator(
    "shampoo_speed_models",
    lambda values: bool(values) and set(values) <= {"mlp", "transformer"},
    message="--shampoo_speed_models takes a comma-separated subset of mlp,transformer.",
)
flags.register_validator(
    "shampoo_digits_hidden",
    lambda values: bool(values) and all(v.isdigit() and int(v) > 0 for v in values),
    message="--shampoo_digits_hidden takes comma-separated positive integers, e.g. 32,16,32.",
)


def _positive_floats(values: Sequence[str]) -> bool:
    try:
        return bool(values) and all(float(v) > 0 for v in values)
    except ValueError:
        return False


flags.register_validator(
    "shampoo_learning_rates",
    _positive_floats,
    message="--shampoo_learning_rates takes comma-separated positive numbers, e.g. 1e-3,3e-3.",
)

_STEP_TARGET, _COMPILE_TARGET = 1.3, 5.0
_NO_ROOT = 2**30  # a preconditioning frequency no benchmark reaches
_SPEED_LEARNING_RATE = 1e-3  # the step's cost does not depend on it
_ADAM, _ADAMW, _SGD = "optax.adam", "optax.adamw", "gradient + SGD apply (no optimizer state)"


def run_suite(settings: harness.Settings) -> str:
    """Runs the speed and quality benchmarks at the sizes given by the flags; returns markdown."""
    single = dataclasses.replace(
        settings,
        repeats=min(settings.repeats, _MAX_REPEATS.value),
        compile_repeats=min(settings.compile_repeats, _MAX_COMPILE_REPEATS.value),
    )
    block_sizes = [int(b) for b in _BLOCK_SIZES.value]
    rng = np.random.default_rng(0)
    problems = {
        "mlp": lambda: mlp_problem(
            rng, _MLP_INPUTS.value, _MLP_WIDTH.value, _MLP_DEPTH.value, _MLP_BATCH.value
        ),
        "transformer": lambda: transformer_problem(
            rng, _VOCAB.value, _MODEL_WIDTH.value, _HEADS.value, _SEQUENCE.value, _BATCH.value
        ),
    }
    sections = []
    for name in dict.fromkeys(_SPEED_MODELS.value):
        sections.append(benchmark_speed(problems[name](), block_sizes, single))
    learning_rates = [float(v) for v in _LEARNING_RATES.value]
    plot_dir = Path(_PLOT_DIR.value)
    sections.append(_quality_intro(learning_rates))
    sections.append(
        quality_digits([int(h) for h in _DIGITS_HIDDEN.value], learning_rates, plot_dir)
    )
    sections.append(quality_markov(learning_rates, plot_dir))
    return "\n".join(sections)


# Problems: parameters, a loss and a batch.


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model to train: host parameters, ``loss(params, *batch)`` and one host batch."""

    name: str
    description: str
    params: Any
    loss: Callable[..., jax.Array]
    batch: tuple[np.ndarray, ...]


def mlp_problem(
    rng: np.random.Generator, inputs: int, width: int, depth: int, batch: int
) -> Problem:
    """The ReLU MLP of the optimizers suite with 10 classes, on a random batch."""
    params = mlp_parameters(rng, inputs, width, depth, 10)
    x = rng.standard_normal((batch, inputs), np.float32)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    sizes = "-".join(map(str, [inputs] + [width] * depth + [10]))
    return Problem("MLP", f"MLP {sizes}, batch {batch}", params, mlp_loss, (x, labels))


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


def transformer_problem(
    rng: np.random.Generator, vocab: int, width: int, heads: int, length: int, batch: int
) -> Problem:
    """The transformer block on uniformly random tokens (the speed does not depend on them)."""
    if width % heads:
        raise ValueError(
            f"shampoo_d_model must be divisible by shampoo_heads, got {width} and {heads}."
        )
    params = transformer_parameters(rng, vocab, width, length)
    tokens = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    description = (
        f"transformer block, d_model {width}, {heads} heads, MLP {4 * width}, vocabulary "
        f"{vocab}, {batch} sequences of {length} tokens"
    )
    loss = functools.partial(transformer_loss, heads=heads)
    return Problem("transformer", description, params, loss, (tokens[:, :-1], tokens[:, 1:]))


# Optimizers.


def _shampoo(learning_rate, block_size=None, frequency=10, start=None, root_method="eigh"):
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


def _soap(learning_rate, block_size=None, frequency=10):
    """metaopt.soap with its defaults (vectors get plain Adam) and the given block size."""
    blocking = (
        None
        if block_size is None
        else metaopt.Blocking(block_size=block_size, precondition_vectors=False)
    )
    return metaopt.soap(learning_rate, preconditioning_frequency=frequency, blocking=blocking)


def _skip_first_step(state):
    """The initial state with its step counter at 1, as after one step.

    Shampoo built with ``start_preconditioning_step=1`` and a huge frequency then computes no
    root on any later step (roots are due when ``(count - start) % frequency == 0``) but applies
    its preconditioners (still the identity) on every one. SOAP computes its first eigenbases
    only at count 0; identity bases stand in for them. Neither changes what a step costs.
    """
    inner = state[0]
    changes = {"count": jnp.ones([], jnp.int32)}
    if isinstance(inner, metaopt.ScaleBySOAPState):
        changes["eigenbases"] = jax.tree.map(
            lambda q: jnp.broadcast_to(jnp.eye(q.shape[-1], dtype=q.dtype), q.shape),
            inner.eigenbases,
        )
    return (inner._replace(**changes), *state[1:])


# Speed.


def _train_step(loss, optimizer):
    def step(params, state, *batch):
        grads = jax.grad(loss)(params, *batch)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _sgd_step(loss):
    def step(params, *batch):
        grads = jax.grad(loss)(params, *batch)
        return (jax.tree.map(lambda p, g: p - _SPEED_LEARNING_RATE * g, params, grads),)

    return step


def _update_step(optimizer):
    """The optimizer alone: update from fixed gradients, applied to the parameters."""

    def step(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _loop(step, steps: int):
    """``steps`` training steps in one jitted call (a ``fori_loop``), on the same batch."""

    def loop(params, state, *batch):
        return jax.lax.fori_loop(0, steps, lambda _, carry: step(*carry, *batch), (params, state))

    return loop


def benchmark_speed(
    problem: Problem, block_sizes: Sequence[int], settings: harness.Settings
) -> str:
    """Times ordinary, optimizer-only and amortized steps of Shampoo and SOAP against Adam."""
    mesh = settings.mesh
    batch = tuple(harness.place(b, mesh, shard_leading_axis=True) for b in problem.batch)
    lr = _SPEED_LEARNING_RATE
    ordinary = [(_ADAM, optax.adam(lr), False), (_ADAMW, optax.adamw(lr), False)]
    for b in block_sizes:
        ordinary.append((f"metaopt.shampoo, block {b}", _shampoo(lr, b, _NO_ROOT, 1), True))
    for b in block_sizes:
        ordinary.append((f"metaopt.soap, block {b}", _soap(lr, b, _NO_ROOT), True))

    def params():
        return harness.place(problem.params, mesh, shard_leading_axis=False)

    def state(optimizer, skip, p):
        init = optimizer.init if not skip else (lambda q: _skip_first_step(optimizer.init(q)))
        return harness.init_state(init, p, mesh, shard_leading_axis=False)

    num_params = sum(np.size(x) for x in jax.tree.leaves(problem.params))
    harness.log(f"shampoo: {problem.description}, {num_params:,} parameters")
    variants = [harness.Variant(_SGD, _sgd_step(problem.loss), (params(),), batch)]
    for name, optimizer, skip in ordinary:
        p = params()
        variants.append(
            harness.Variant(
                name, _train_step(problem.loss, optimizer), (p, state(optimizer, skip, p)), batch
            )
        )
    steps = harness.measure(variants, settings)

    grads = jax.jit(jax.grad(problem.loss))(params(), *batch)
    variants = []
    for name, optimizer, skip in ordinary:
        p = params()
        variants.append(
            harness.Variant(
                name,
                _update_step(optimizer),
                (p, state(optimizer, skip, p)),
                (jax.tree.map(jnp.copy, grads),),
            )
        )
    harness.log("shampoo: optimizer update alone")
    updates = harness.measure(variants, dataclasses.replace(settings, compile_repeats=1))

    amortized = _benchmark_amortized(problem, block_sizes, batch, settings)
    return _speed_report(problem, num_params, steps, updates, amortized, settings)


def _benchmark_amortized(problem, block_sizes, batch, settings):
    """Loops of ``root_every`` steps holding one root step (and SOAP's refreshes), per step."""
    mesh = settings.mesh
    every, refresh = _ROOT_EVERY.value, _REFRESH_EVERY.value
    root_method = _ROOT_METHOD.value
    soap_on = _SOAP_AMORTIZED.value
    lr = _SPEED_LEARNING_RATE
    loops = [(_ADAM, optax.adam(lr))]
    for b in block_sizes:
        loops.append(
            (f"metaopt.shampoo, block {b}", _shampoo(lr, b, every, every, root_method=root_method))
        )
    if soap_on:
        for b in block_sizes:
            loops.append((f"metaopt.soap, block {b}", _soap(lr, b, refresh)))
    variants = []
    for name, optimizer in loops:
        p = harness.place(problem.params, mesh, shard_leading_axis=False)
        s = harness.init_state(optimizer.init, p, mesh, shard_leading_axis=False)
        step = _loop(_train_step(problem.loss, optimizer), every)
        variants.append(harness.Variant(name, step, (p, s), batch))
    harness.log(f"shampoo: loops of {every} steps, roots by {root_method}")
    loop_settings = dataclasses.replace(
        settings, repeats=min(settings.repeats, _AMORTIZED_REPEATS.value), compile_repeats=1
    )
    return harness.measure(variants, loop_settings), root_method, soap_on


def _speed_report(problem, num_params, steps, updates, amortized, settings) -> str:
    amortized, root_method, soap_on = amortized
    every, refresh = _ROOT_EVERY.value, _REFRESH_EVERY.value
    adam = steps[_ADAM]
    rows, verdicts = [], []
    for name, m in steps.items():
        ratio = harness.step_time_ratio(m, adam)
        compile_ratio = m.compile_time / adam.compile_time
        shampoo = name.startswith("metaopt.shampoo")
        target = ""
        compile_target = ""
        if shampoo:
            target = f"≤ {_STEP_TARGET}: " + harness.verdict(ratio, _STEP_TARGET, at_most=True)
            met = compile_ratio <= _COMPILE_TARGET
            compile_target = f"≤ {_COMPILE_TARGET:g}: " + ("met" if met else "**missed**")
            verdicts.append((name, ratio, compile_ratio))
        update = updates.get(name)
        rows.append(
            [
                name,
                harness.format_time(m),
                harness.format_interval(ratio),
                target,
                "" if update is None else harness.format_time(update),
                ""
                if update is None
                else harness.format_interval(harness.step_time_ratio(update, updates[_ADAM])),
                f"{m.compile_time:.2f}",
                f"{compile_ratio:.2f}",
                compile_target,
                harness.format_bytes(None if m.memory is None else m.memory.peak_bytes),
            ]
        )
    table = harness.markdown_table(
        [
            "step",
            "training step, ms: median (IQR)",
            "÷ Adam",
            "target",
            "update alone, ms",
            "update ÷ Adam's",
            "compile, s",
            "compile ÷ Adam",
            "target",
            "XLA peak buffers",
        ],
        rows,
    )
    loop_adam = amortized[_ADAM]
    loop_rows = []
    for name, m in amortized.items():
        if name == _ADAM:
            events, extra = "—", ""
        else:
            shampoo = name.startswith("metaopt.shampoo")
            events = f"1 root step (step {every})" if shampoo else f"{every // refresh} refreshes"
            extra = f"{(m.step_time - every * steps[name].step_time) * 1e3:.3g}"
        loop_rows.append(
            [
                name,
                events,
                f"{m.step_time * 1e3 / every:.3g}",
                harness.format_interval(harness.step_time_ratio(m, loop_adam)),
                extra,
            ]
        )
    loop_table = harness.markdown_table(
        [
            f"loop of {every} steps",
            "roots / refreshes in the loop",
            "per step, ms",
            "÷ Adam's loop",
            f"loop − {every} ordinary steps, ms",
        ],
        loop_rows,
    )
    placement = (
        "on one device"
        if settings.mesh is None
        else (f"batch sharded over {settings.mesh.size} devices")
    )
    notes = [f' Roots by `root_method="{root_method}"`.']
    if not soap_on:
        notes.append(" SOAP's loop is not timed (`--soap_amortized` times it).")
    summary = "; ".join(
        f"{name}: step {harness.format_interval(ratio)} "
        f"({harness.verdict(ratio, _STEP_TARGET, at_most=True)}), compile {compile_ratio:.2f} "
        f"({'met' if compile_ratio <= _COMPILE_TARGET else '**missed**'})"
        for name, ratio, compile_ratio in verdicts
    )
    return (
        f"### Speed: {problem.description} ({num_params:,} float32 parameters)\n\n"
        f"Each row of the first table is one jitted training step (loss gradient, update, "
        f"apply; parameters and state donated), {placement}, timed in the same "
        f"{len(adam.step_seconds)} interleaved rounds. Shampoo (Adam grafting) and SOAP are "
        f"timed on *ordinary* steps: Shampoo is built with `start_preconditioning_step=1` and "
        f"`preconditioning_frequency=2**30` and started from its initial state with the step "
        f"counter at 1, so every timed step applies the preconditioners (count ≥ start) and "
        f"none computes a root (one is due only when (count − 1) mod 2³⁰ = 0); SOAP likewise "
        f"with its refresh frequency at 2³⁰ and identity bases in place of its first "
        f"eigendecomposition. The values of the preconditioners do not change what a step "
        f'costs. "Update alone" times the optimizer update + apply from fixed gradients '
        f"(compiled separately); `{_SGD}` is the gradient and an SGD apply, the floor under "
        f"every training step. Compile time: median of "
        f"{len(adam.compile_seconds)} trace + lower + compile of the training step.\n\n"
        + table
        + "\n"
        f"Amortized cost: one jitted `fori_loop` of {every} training steps on the same batch, "
        f"from the real initial state, per step, in {len(loop_adam.step_seconds)} interleaved "
        f"rounds. Shampoo uses `preconditioning_frequency={every}` (start {every}), so each "
        f"timed loop (steps {every}k+1 … {every}k+{every}) computes the roots once, at its "
        f"last step; "
        f"SOAP refreshes its bases every {refresh} steps. The last column is the loop's median "
        f"minus {every} ordinary steps from the first table: the cost of the roots (or "
        f"refreshes) and of looping.{''.join(notes)}\n\n" + loop_table + "\n"
        f"Targets (Shampoo): ordinary step ≤ {_STEP_TARGET} × Adam's, compile ≤ "
        f"{_COMPILE_TARGET:g} × Adam's. {summary}.\n"
    )


# Quality: steps to a target loss.


def _methods(frequency: int) -> list[tuple[str, Callable[[Any], optax.GradientTransformation]]]:
    """The compared methods as functions of the learning rate (a traced scalar)."""
    return [
        (_ADAM, optax.adam),
        (_ADAMW, optax.adamw),
        (
            f"metaopt.shampoo (Adam grafting, roots every {frequency})",
            lambda lr: _shampoo(lr, frequency=frequency),
        ),
        ("metaopt.soap (bases refreshed every 10)", lambda lr: _soap(lr)),
    ]


def _trainer(make_optimizer, loss, sample_batch, evaluate, steps: int, every: int):
    """``train(params, learning_rate)``: evaluations every ``every`` steps (and at step 0), and
    Shampoo's count of rejected roots; jitted once, whatever the learning rate."""

    @jax.jit
    def train(params, learning_rate):
        optimizer = make_optimizer(learning_rate)

        def step(carry, t):
            params, state = carry
            grads = jax.grad(loss)(params, *sample_batch(t))
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        def segment(carry, k):
            carry, _ = jax.lax.scan(step, carry, k * every + jnp.arange(every))
            return carry, evaluate(carry[0])

        carry = (params, optimizer.init(params))
        (_, state), values = jax.lax.scan(segment, carry, jnp.arange(steps // every))
        failures = getattr(state[0], "root_failures", jnp.zeros([], jnp.int32))
        return jnp.concatenate([evaluate(params)[None], values]), failures

    return train


@dataclasses.dataclass(frozen=True)
class Curve:
    """One training run: held-out or full-batch losses every ``every`` steps from step 0."""

    method: str
    learning_rate: float
    losses: np.ndarray
    every: int
    root_failures: int

    def steps_to(self, target: float) -> int | None:
        """Steps after which every evaluation is at most ``target`` (None if the last is not):
        a run that touches the target and leaves it again has not reached it."""
        above = np.flatnonzero(~(self.losses <= target))
        if above.size and above[-1] == self.losses.size - 1:
            return None
        return 0 if above.size == 0 else (int(above[-1]) + 1) * self.every

    @property
    def final(self) -> float:
        return float(self.losses[-1])


def _run_grid(loss, params, sample_batch, evaluate, steps, every, learning_rates, target):
    """Every method at every learning rate; returns all curves and each method's best one
    (fewest steps to the target, then lowest final loss; a diverged run is never best)."""
    curves: dict[str, list[Curve]] = {}
    for method, make_optimizer in _methods(_QUALITY_FREQUENCY.value):
        train = _trainer(make_optimizer, loss, sample_batch, evaluate, steps, every)
        curves[method] = []
        start = time.perf_counter()
        for lr in learning_rates:
            losses, failures = train(params, jnp.float32(lr))
            curves[method].append(Curve(method, lr, np.asarray(losses), every, int(failures)))
        harness.log(f"shampoo quality: {method}, {time.perf_counter() - start:.1f} s")

    def rank(curve):
        steps_to = curve.steps_to(target)
        final = curve.final if np.isfinite(curve.final) else np.inf
        return (steps_to is None, steps_to or 0, final)

    best = {method: min(runs, key=rank) for method, runs in curves.items()}
    return curves, best


def _quality_table(curves, best, target, learning_rates) -> str:
    adam_steps = best[_ADAM].steps_to(target)
    rows = []
    for method, curve in best.items():
        steps_to = curve.steps_to(target)
        ratio = f"{steps_to / adam_steps:.2f}" if steps_to is not None and adam_steps else "n/a"
        rows.append(
            [
                method,
                f"{curve.learning_rate:g}",
                "not reached" if steps_to is None else str(steps_to),
                ratio,
                f"{curve.final:.4g}",
                str(curve.root_failures) if method.startswith("metaopt.shampoo") else "",
            ]
        )
    best_table = harness.markdown_table(
        [
            "method",
            "best learning rate",
            "steps to target",
            "÷ Adam's",
            "final loss",
            "rejected roots",
        ],
        rows,
    )
    grid_rows = []
    for method, runs in curves.items():
        cells = []
        for curve in runs:
            steps_to = curve.steps_to(target)
            final = f"{curve.final:.3g}" if np.isfinite(curve.final) else "diverged"
            cells.append(f"{'—' if steps_to is None else steps_to} ({final})")
        grid_rows.append([method, *cells])
    grid_table = harness.markdown_table(
        ["steps to target (final loss)", *(f"lr {lr:g}" for lr in learning_rates)], grid_rows
    )
    return best_table + "\n" + grid_table


def _plot(
    curves_by_method: dict[str, Curve],
    offset: float,
    title: str,
    ylabel: str,
    target: float,
    path: Path,
) -> None:
    """Loss above ``offset`` against steps, log scale, one line per method at its best rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for method, curve in curves_by_method.items():
        steps = np.arange(curve.losses.size) * curve.every
        excess = np.maximum(curve.losses - offset, 1e-8)
        axes.plot(steps, excess, label=f"{method}, lr {curve.learning_rate:g}")
    axes.axhline(target - offset, color="gray", linestyle="--", linewidth=1, label="target")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def _quality_intro(learning_rates: Sequence[float]) -> str:
    return (
        "### Quality: steps to a target loss\n\n"
        f"Each method is run once per learning rate of the grid "
        f"{', '.join(f'{lr:g}' for lr in learning_rates)} (the same grid for all), from the same "
        f"initialization and on the same data; the best rate is the one that reaches the target "
        f"in the fewest steps (then the lowest final loss). Steps to target count the steps after "
        f"which every later evaluation of the loss is at or below the target, so a run that "
        f"touches the target and leaves it again (an unstable rate) has not reached it. "
        f"`optax.adam` and `optax.adamw` "
        f"(weight decay 1e-4) with their defaults; `metaopt.shampoo` with its defaults (Adam "
        f"grafting, block size 1024, so each matrix here is one block, roots by `eigh`) and "
        f"`preconditioning_frequency={_QUALITY_FREQUENCY.value}`; `metaopt.soap` with its "
        f"defaults (b1 = b2 = 0.95, weight decay 0.01, refresh every 10). Constant learning "
        f"rates, no warm-up. Each run is one jitted `lax.scan`, compiled once per method (the "
        f"learning rate is a traced argument).\n"
    )


def digits_data() -> np.ndarray:
    """scikit-learn's 8x8 digits (bundled, no download), scaled to [0, 1] and centered."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float64) / 16.0
    return (x - x.mean(axis=0)).astype(np.float32)


def linear_autoencoder_loss(params, x) -> jax.Array:
    """Mean squared reconstruction error per entry of a deep linear autoencoder without biases."""
    h = x
    for w in params:
        h = h @ w
    return jnp.mean(jnp.square(h - x))


def quality_digits(hidden: Sequence[int], learning_rates: Sequence[float], plot_dir: Path) -> str:
    """Steps to (1 + target) times the PCA optimum, full batch, on the digits autoencoder."""
    x = digits_data()
    sizes = [x.shape[1], *hidden, x.shape[1]]
    rng = np.random.default_rng(1)
    params = [
        (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        for n_in, n_out in itertools.pairwise(sizes)
    ]
    # A linear autoencoder with a bottleneck of k units is at best the projection on the top k
    # principal components (Eckart-Young): the loss left is the sum of the other eigenvalues.
    eigenvalues = np.linalg.eigvalsh(x.astype(np.float64).T @ x / x.shape[0])[::-1]
    k = min(hidden)
    optimum = float(eigenvalues[k:].sum() / x.shape[1])
    target = optimum * (1.0 + _DIGITS_TARGET.value)
    data = jnp.asarray(x)
    curves, best = _run_grid(
        linear_autoencoder_loss,
        [jnp.asarray(w) for w in params],
        lambda t: (data,),
        lambda p: linear_autoencoder_loss(p, data),
        _DIGITS_STEPS.value,
        _DIGITS_EVAL_EVERY,
        learning_rates,
        target,
    )
    name = "digits_autoencoder"
    _plot(
        best,
        optimum,
        f"digits linear autoencoder {'-'.join(map(str, sizes))}",
        "loss − PCA optimum",
        target,
        plot_dir / f"shampoo_{name}.png",
    )
    spread = eigenvalues[0] / eigenvalues[k - 1]
    return (
        f"\n#### Deep linear autoencoder {'-'.join(map(str, sizes))} on the digits "
        f"({x.shape[0]} images, full batch, {_DIGITS_STEPS.value} steps)\n\n"
        f"Pixels scaled to [0, 1] and centered; no biases; weights drawn N(0, 1/fan-in); the "
        f"full-batch loss is evaluated every {_DIGITS_EVAL_EVERY} steps. "
        f"The best loss is the PCA reconstruction error with {k} components, {optimum:.5g} "
        f"(mean squared error per pixel); the target is {1 + _DIGITS_TARGET.value:g} × that, "
        f"{target:.5g}. The top {k} eigenvalues of the data covariance span a factor of "
        f"{spread:.0f}, and the product of four matrices adds its own ill-conditioning.\n\n"
        + _quality_table(curves, best, target, learning_rates)
        + "\n![Loss above the optimum against steps, digits autoencoder]"
        f"(_static/shampoo_{name}.png)\n"
    )


def markov_table(rng: np.random.Generator, vocab: int, support: int) -> np.ndarray:
    """A second-order chain: after tokens (a, b), the next one is drawn from ``support`` random
    tokens with Dirichlet(1) weights. Returns probabilities ``[vocab, vocab, vocab]``."""
    table = np.zeros((vocab, vocab, vocab))
    for a, b in itertools.product(range(vocab), repeat=2):
        successors = rng.choice(vocab, size=support, replace=False)
        table[a, b, successors] = rng.dirichlet(np.ones(support))
    return table


def markov_sequences(
    rng: np.random.Generator, table: np.ndarray, count: int, length: int
) -> np.ndarray:
    """``count`` sequences of ``length`` tokens: two uniform tokens, then the chain."""
    vocab = table.shape[0]
    tokens = np.zeros((count, length), np.int32)
    tokens[:, :2] = rng.integers(0, vocab, (count, 2))
    cumulative = np.cumsum(table, axis=-1)
    for t in range(2, length):
        rows = cumulative[tokens[:, t - 2], tokens[:, t - 1]]
        draws = rng.random((count, 1))
        tokens[:, t] = np.minimum((draws > rows).sum(axis=-1), vocab - 1)
    return tokens


def markov_chain_loss(table: np.ndarray, tokens: np.ndarray) -> float:
    """The chain's own mean next-token loss on ``tokens``: log(vocab) for the second token (the
    first one says nothing about it), -log p(next | previous two) after it."""
    vocab = table.shape[0]
    probabilities = table[tokens[:, :-2], tokens[:, 1:-1], tokens[:, 2:]]
    losses = np.concatenate(
        [np.full((tokens.shape[0], 1), np.log(vocab)), -np.log(probabilities)], axis=1
    )
    return float(losses.mean())


_MARKOV_SUPPORT, _MARKOV_POOL, _MARKOV_EVAL = 3, 16384, 256
_DIGITS_EVAL_EVERY = 5


def quality_markov(learning_rates: Sequence[float], plot_dir: Path) -> str:
    """Steps to the chain's own loss + target on held-out sequences, for the transformer block."""
    vocab, length = _MARKOV_VOCAB.value, _MARKOV_SEQUENCE.value
    width, heads, batch = _MARKOV_WIDTH.value, _MARKOV_HEADS.value, _MARKOV_BATCH.value
    steps, every = _MARKOV_STEPS.value, _MARKOV_EVAL_EVERY.value
    if width % heads:
        raise ValueError(
            f"shampoo_markov_d_model must be divisible by shampoo_markov_heads, got {width} "
            f"and {heads}."
        )
    rng = np.random.default_rng(2)
    table = markov_table(rng, vocab, _MARKOV_SUPPORT)
    pool = jnp.asarray(markov_sequences(rng, table, _MARKOV_POOL, length + 1))
    held_out = markov_sequences(rng, table, _MARKOV_EVAL, length + 1)
    floor = markov_chain_loss(table, held_out)
    target = floor + _MARKOV_TARGET.value
    params = jax.tree.map(jnp.asarray, transformer_parameters(rng, vocab, width, length))
    loss = functools.partial(transformer_loss, heads=heads)
    key = jax.random.key(3)
    evaluation = jnp.asarray(held_out)

    def sample_batch(t):
        rows = pool[jax.random.randint(jax.random.fold_in(key, t), (batch,), 0, _MARKOV_POOL)]
        return rows[:, :-1], rows[:, 1:]

    curves, best = _run_grid(
        loss,
        params,
        sample_batch,
        lambda p: loss(p, evaluation[:, :-1], evaluation[:, 1:]),
        steps,
        every,
        learning_rates,
        target,
    )
    name = "markov_transformer"
    _plot(
        best,
        floor,
        f"transformer block, order-2 Markov chain over {vocab} tokens",
        "held-out loss − chain's own loss, nats",
        target,
        plot_dir / f"shampoo_{name}.png",
    )
    num_params = sum(np.size(x) for x in jax.tree.leaves(params))
    return (
        f"\n#### Transformer block on a second-order Markov chain ({vocab} tokens; "
        f"{steps} steps of {batch} sequences)\n\n"
        f"The transformer of the speed benchmark at d_model {width}, {heads} heads, "
        f"{length} tokens ({num_params:,} parameters), trained on next-token prediction. "
        f"Sequences start with two uniform tokens; each next token is drawn, given the two "
        f"before it, from {_MARKOV_SUPPORT} fixed random successors with Dirichlet(1) weights, "
        f"so the model must attend to the previous token. Minibatches are drawn from "
        f"{_MARKOV_POOL:,} sequences; the loss is measured every {every} steps on "
        f"{_MARKOV_EVAL} held-out sequences, whose loss under the chain itself is "
        f"{floor:.4f} nats (uniform guessing: {np.log(vocab):.3f}); the target is that plus "
        f"{_MARKOV_TARGET.value:g}, {target:.4f}, and steps to it are resolved to {every}.\n\n"
        + _quality_table(curves, best, target, learning_rates)
        + f"\n![Held-out loss above the chain's own against steps, Markov transformer]"
        f"(_static/shampoo_{name}.png)\n"
    )
