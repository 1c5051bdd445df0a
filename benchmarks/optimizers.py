"""Optimizer benchmarks: AdEMAMix and the SAM family against their optax references.

Two measurements, each timed with :func:`benchmarks.harness.measure` (interleaved rounds,
median step time of compiled, donated steps):

1. ``metaopt.ademamix`` against ``optax.contrib.ademamix`` on a pytree of float32 parameters: one
   jitted step computes the update from fixed gradients and applies it, with parameters and state
   donated. Besides the time ratio, it reports the fraction of memory bandwidth reached: the bytes
   the step must move, divided by its time, against the bandwidth of a jitted ``x * s`` over an
   array of the same total traffic, measured in the same rounds.
2. ``metaopt.sam`` (and ``asam``, ``gam``, ``gradient_regularization``) with
   ``optax.sgd(momentum=0.9)`` as the base optimizer on an MLP, against two plain steps of the
   base optimizer and against ``optax.contrib.sam`` in opaque mode. Every variant is one jitted
   function that computes the loss gradient, the update and the new parameters.
"""

from __future__ import annotations

import itertools
import math
import re

import jax
import numpy as np
import optax
from absl import flags

import metaopt
from benchmarks import harness

_ADEMAMIX_PARAMS = flags.DEFINE_integer(
    "ademamix_params", 16 * 2**20, "Total float32 parameters of the AdEMAMix pytree.", lower_bound=1
)
_ADEMAMIX_LEAVES = flags.DEFINE_integer(
    "ademamix_leaves", 4, "Number of leaves the AdEMAMix parameters are split into.", lower_bound=1
)
_SAM_WIDTH = flags.DEFINE_integer(
    "sam_width", 512, "Width of the MLP's hidden layers.", lower_bound=1
)
_SAM_DEPTH = flags.DEFINE_integer(
    "sam_depth", 2, "Number of hidden layers of the MLP.", lower_bound=1
)
_SAM_BATCH = flags.DEFINE_integer(
    "sam_batch", 256, "Examples in the synthetic batch.", lower_bound=1
)
_SAM_INPUTS = flags.DEFINE_integer("sam_inputs", 512, "Input features of the MLP.", lower_bound=1)
_SAM_CLASSES = flags.DEFINE_integer("sam_classes", 10, "Output classes of the MLP.", lower_bound=2)

# Same hyperparameters for both implementations; the timing does not depend on their values.
_ADEMAMIX_HYPERPARAMETERS = dict(
    learning_rate=1e-3, b1=0.9, b2=0.999, b3=0.9999, alpha=5.0, eps=1e-8, weight_decay=0.0
)
_LEARNING_RATE, _MOMENTUM, _RHO = 0.01, 0.9, 0.05
_BANDWIDTH_TARGET, _ADEMAMIX_TIME_TARGET, _SAM_TIME_TARGET = 0.85, 1.05, 1.1


def run_suite(settings: harness.Settings) -> str:
    """Runs both optimizer benchmarks at the sizes given by the flags; returns the markdown."""
    ademamix = benchmark_ademamix(_ADEMAMIX_PARAMS.value, _ADEMAMIX_LEAVES.value, settings)
    sam = benchmark_sam(
        width=_SAM_WIDTH.value,
        depth=_SAM_DEPTH.value,
        batch=_SAM_BATCH.value,
        inputs=_SAM_INPUTS.value,
        classes=_SAM_CLASSES.value,
        settings=settings,
    )
    return ademamix + "\n" + sam


# AdEMAMix.


def parameter_shapes(num_params: int, num_leaves: int) -> list[tuple[int, ...]]:
    """Shapes of ``num_leaves`` matrices holding ``num_params`` values in total.

    Leaves are as equal as possible; each is ``(rows, columns)`` with ``columns`` the largest
    power of two up to 1024 that divides its size, like the weight matrices of a network.
    """
    if num_leaves > num_params:
        raise ValueError(
            f"ademamix_leaves must be at most ademamix_params, got {num_leaves} leaves for "
            f"{num_params} parameters; lower --ademamix_leaves."
        )
    base = num_params // num_leaves
    sizes = [base] * (num_leaves - 1) + [num_params - base * (num_leaves - 1)]
    return [(size // math.gcd(size, 1024), math.gcd(size, 1024)) for size in sizes]


def _optimizer_step(optimizer: optax.GradientTransformation):
    """``step(params, state, grads)``: one update from fixed gradients, applied to params."""

    def step(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _scale(array, factor):
    """One read and one write of ``array``: the bandwidth baseline (``factor`` is a runtime 1.0,
    so XLA cannot remove the multiplication)."""
    return (array * factor,)


_FUSION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+fusion\(", re.MULTILINE)
_ARRAY = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")


def large_fusions(hlo_text: str, min_elements: int) -> int:
    """Number of XLA fusions (kernels) in an optimized HLO module that write an array of at least
    ``min_elements`` elements: each one is a pass over parameter-sized memory.

    Example:
      >>> hlo = "%f = (f32[64,1024]{1,0}, f32[64,1024]{1,0}) fusion(%a, %b), kind=kLoop\n"
      >>> hlo += "%g = f32[] fusion(%c), kind=kLoop\n%h = f32[64,1024]{1,0} fusion(%f), kind=kLoop"
      >>> large_fusions(hlo, 65536)
      2
    """
    count = 0
    for match in _FUSION.finditer(hlo_text):
        sizes = [
            math.prod(int(d) for d in dims.split(",") if d) for dims in _ARRAY.findall(match[1])
        ]
        count += any(size >= min_elements for size in sizes)
    return count


def benchmark_ademamix(num_params: int, num_leaves: int, settings: harness.Settings) -> str:
    """Times metaopt's AdEMAMix step against optax.contrib's and a copy of equal traffic.

    The step reads the gradients, the parameters and the three moment buffers (m1, m2, nu) and
    writes the parameters and the three buffers: 5 reads and 4 writes of a parameter-sized
    buffer, ``9 * 4 * num_params`` bytes in float32 (the int32 step counter is ignored). A step
    moving these bytes at the speed of the ``x * s`` baseline would reach 100 %; anything XLA
    fails to fuse (intermediates written and read back) shows up as a lower fraction.

    Returns:
      A markdown section with the table and the bandwidth figures.
    """
    mesh = settings.mesh
    shapes = parameter_shapes(num_params, num_leaves)
    rng = np.random.default_rng(0)
    host_params = {
        f"w{i}": rng.standard_normal(shape, np.float32) for i, shape in enumerate(shapes)
    }
    host_grads = {key: rng.standard_normal(v.shape, np.float32) for key, v in host_params.items()}

    variants = []
    optimizers = {
        "metaopt.ademamix": metaopt.ademamix(**_ADEMAMIX_HYPERPARAMETERS),
        "optax.contrib.ademamix": optax.contrib.ademamix(**_ADEMAMIX_HYPERPARAMETERS),
    }
    devices = 1 if mesh is None else mesh.size
    smallest_leaf = min(math.prod(shape) for shape in shapes) // devices
    fusions = {}
    for name, optimizer in optimizers.items():
        params = harness.place(host_params, mesh, shard_leading_axis=True)
        state = harness.init_state(optimizer.init, params, mesh, shard_leading_axis=True)
        grads = harness.place(host_grads, mesh, shard_leading_axis=True)
        step = _optimizer_step(optimizer)
        # The kernels XLA made of the step (lowering does not consume the donated buffers).
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
        fusions[name] = large_fusions(compiled.as_text(), smallest_leaf) / num_leaves
        variants.append(harness.Variant(name, step, (params, state), (grads,)))

    param_bytes = harness.tree_bytes(host_params)
    step_bytes = 5 * param_bytes + 4 * param_bytes  # reads g, p, m1, m2, nu; writes p, m1, m2, nu
    copy_size = max(devices, step_bytes // 8 // devices * devices)  # float32, read + write
    copy_bytes = 2 * 4 * copy_size
    copy = harness.Variant(
        "copy",
        _scale,
        (harness.place(np.ones(copy_size, np.float32), mesh, shard_leading_axis=True),),
        (harness.place(np.float32(1.0), mesh, shard_leading_axis=False),),
    )
    harness.log(f"ademamix: {num_params:,} parameters in shapes {shapes}")
    results = harness.measure([*variants, copy], settings)
    ours, reference, baseline = (results[name] for name in [*optimizers, "copy"])

    copy_bandwidth = copy_bytes / baseline.step_time
    # fraction = (step_bytes / t) / (copy_bytes / t_copy) = t_copy / t * step_bytes / copy_bytes
    fractions = [
        harness.step_time_ratio(baseline, m, scale=copy_bytes / step_bytes)
        for m in (ours, reference)
    ]
    # The same with the bytes XLA's kernels actually access: how fast the kernels themselves run.
    # cost_analysis() describes the per-device program, so the traffic of all devices is
    # ``devices`` times it.
    kernel_fractions = [
        None
        if m.bytes_accessed is None
        else devices * m.bytes_accessed / m.step_time / copy_bandwidth
        for m in (ours, reference)
    ]
    time_ratio = harness.step_time_ratio(ours, reference)

    def memory(m: harness.Measurement, field: str) -> float | None:
        return None if m.memory is None else getattr(m.memory, field)

    def row(label, a, b, fmt, target=""):
        return [label, fmt(a), fmt(b), harness.format_ratio(a, b), target]

    rows = [
        [
            "step time, ms: median (IQR)",
            harness.format_time(ours),
            harness.format_time(reference),
            harness.format_interval(time_ratio),
            f"≤ {_ADEMAMIX_TIME_TARGET}: "
            + harness.verdict(time_ratio, _ADEMAMIX_TIME_TARGET, at_most=True),
        ],
        row("compile time, s", ours.compile_time, reference.compile_time, lambda s: f"{s:.3f}"),
        row(
            "XLA peak buffers",
            memory(ours, "peak_bytes"),
            memory(reference, "peak_bytes"),
            harness.format_bytes,
        ),
        row(
            "XLA temporaries",
            memory(ours, "temp_bytes"),
            memory(reference, "temp_bytes"),
            harness.format_bytes,
        ),
        row(
            "XLA cost-analysis bytes accessed, per device",
            ours.bytes_accessed,
            reference.bytes_accessed,
            harness.format_bytes,
        ),
        row(
            "bandwidth, GB/s (9 buffers moved)",
            step_bytes / ours.step_time / 1e9,
            step_bytes / reference.step_time / 1e9,
            lambda x: f"{x:.1f}",
        ),
        [
            "fraction of copy bandwidth",
            harness.format_interval(fractions[0], percent=True),
            harness.format_interval(fractions[1], percent=True),
            harness.format_ratio(fractions[0][0], fractions[1][0]),
            f"≥ {_BANDWIDTH_TARGET:.0%}: "
            + harness.verdict(fractions[0], _BANDWIDTH_TARGET, at_most=False),
        ],
        row(
            "same, counting XLA's bytes accessed",
            *kernel_fractions,
            lambda x: "n/a" if x is None else f"{x:.0%}",
        ),
        row(
            "XLA kernels writing parameter-sized arrays, per leaf",
            *(fusions[name] for name in optimizers),
            lambda x: f"{x:.3g}",
        ),
    ]
    table = harness.markdown_table(
        ["AdEMAMix step", "metaopt.ademamix", "optax.contrib.ademamix", "ratio", "target"], rows
    )
    placement = "on one device" if mesh is None else f"sharded over {mesh.size} devices"
    return (
        f"### AdEMAMix: {num_params:,} float32 parameters in {num_leaves} leaves\n\n"
        f"One jitted update + apply step from fixed gradients, parameters and state donated, "
        f"{placement}; {len(ours.step_seconds)} interleaved repeats of "
        f"{ours.steps_per_repeat} steps (median and interquartile range of the time per step). "
        f"Time ratios are ratios of medians, with a 95 % bootstrap interval over the paired "
        f"rounds in brackets.\n\n" + table + "\n"
        f"Bytes the step must move: {harness.format_bytes(step_bytes)} = 9 × "
        f"{harness.format_bytes(param_bytes)} (reads gradients, parameters, m1, m2, nu; "
        f"writes parameters, m1, m2, nu). "
        f"Baseline: a jitted, donated `x * s` over {copy_size:,} float32 values "
        f"({harness.format_bytes(copy_bytes)} read + written) took "
        f"{harness.format_time(baseline)} ms, {copy_bandwidth / 1e9:.1f} GB/s. "
        f"Bandwidth = bytes moved / median step time. "
        f"XLA peak buffers = arguments + outputs − donated aliases + temporaries from "
        f"`compiled.memory_analysis()`, per device; bytes accessed (summed over devices in the "
        f"bandwidth figures) from "
        f"`compiled.cost_analysis()` count every buffer each fused kernel reads or writes, so "
        f"they exceed the 9-buffer minimum by whatever XLA did not fuse"
        + (
            ""
            if ours.bytes_accessed is None
            else f" (here {devices * ours.bytes_accessed / param_bytes:.3g} parameter-sized "
            f"buffers for metaopt, {devices * (reference.bytes_accessed or 0) / param_bytes:.3g} "
            f"for optax)"
        )
        + ". Kernels per leaf: the fusions of the optimized HLO "
        f"(`compiled.as_text()`) that write an array at least as large as a leaf, divided by the "
        f"{num_leaves} leaves. One multi-output kernel per leaf that reads gradient, parameter and "
        f"the three moments and writes the four new arrays would move the 9 buffers; XLA:CPU "
        f"makes one kernel per output (m1, m2, nu: each reads the gradient; the parameter: reads "
        f"the three new moments again), 14 buffers, which caps the step at 9/14 = 64 % of copy "
        f"bandwidth. XLA:GPU's multi-output fusion can merge them into one. On the CPU, "
        f"`XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion` (process-wide; "
        f"no per-function option exists) merges the three moment kernels of each leaf into one "
        f"(sibling fusion: the gradient is read once) and the parameter kernels of all leaves "
        f"into one: 12 buffers, with bit-identical results.\n"
    )


# SAM family.


def mlp_parameters(
    rng: np.random.Generator, inputs: int, width: int, depth: int, classes: int
) -> list[dict[str, np.ndarray]]:
    """He-initialized float32 weights and zero biases of an MLP with ``depth`` hidden layers."""
    sizes = [inputs] + [width] * depth + [classes]
    return [
        {
            "w": (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32),
            "b": np.zeros(n_out, np.float32),
        }
        for n_in, n_out in itertools.pairwise(sizes)
    ]


def mlp_loss(params: list[dict[str, jax.Array]], inputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of a ReLU MLP."""
    hidden = inputs
    for layer in params[:-1]:
        hidden = jax.nn.relu(hidden @ layer["w"] + layer["b"])
    logits = hidden @ params[-1]["w"] + params[-1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _plain_step(optimizer: optax.GradientTransformation):
    def step(params, state, inputs, labels):
        grads = jax.grad(mlp_loss)(params, inputs, labels)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _sharpness_step(optimizer: optax.GradientTransformationExtraArgs):
    def step(params, state, inputs, labels):
        # metaopt calls grad_fn(params); optax.contrib.sam in opaque mode calls grad_fn(params, i).
        def grad_fn(p, *adversarial_step):
            del adversarial_step
            return jax.grad(mlp_loss)(p, inputs, labels)

        grads = grad_fn(params)
        updates, state = optimizer.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    return step


def benchmark_sam(
    *, width: int, depth: int, batch: int, inputs: int, classes: int, settings: harness.Settings
) -> str:
    """Times SAM-type steps against plain steps of the base optimizer and optax.contrib.sam.

    A SAM step evaluates the gradient twice (GAM four times), so the natural yardstick is two
    (or four) plain steps: gradient + ``optax.sgd(momentum=0.9)`` update + apply. A ratio near 1
    means the transform adds nothing beyond the extra gradient evaluations.

    Returns:
      A markdown section with the table.
    """
    mesh = settings.mesh
    if mesh is not None and batch % mesh.size:
        raise ValueError(
            f"sam_batch must be divisible by the {mesh.size} devices to shard the batch, got "
            f"sam_batch={batch}; pick a multiple of {mesh.size} or run without --shard."
        )
    rng = np.random.default_rng(1)
    host_params = mlp_parameters(rng, inputs, width, depth, classes)
    host_inputs = rng.standard_normal((batch, inputs), np.float32)
    host_labels = rng.integers(0, classes, batch).astype(np.int32)

    def base() -> optax.GradientTransformation:
        return optax.sgd(_LEARNING_RATE, momentum=_MOMENTUM)

    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(_RHO))
    plain_name = "plain step: optax.sgd(momentum)"
    candidates = [
        # (label, optimizer, gradient evaluations per step)
        (plain_name, base(), 1),
        ("metaopt.sam", metaopt.sam(base(), _RHO), 2),
        (
            "optax.contrib.sam (opaque)",
            optax.contrib.sam(base(), adversary, sync_period=2, opaque_mode=True),
            2,
        ),
        ("metaopt.asam", metaopt.asam(base()), 2),
        ("metaopt.gam", metaopt.gam(base()), 4),
        ("metaopt.gradient_regularization", metaopt.gradient_regularization(base()), 2),
    ]
    batch_arrays = (
        harness.place(host_inputs, mesh, shard_leading_axis=True),
        harness.place(host_labels, mesh, shard_leading_axis=True),
    )
    variants = []
    for name, optimizer, _ in candidates:
        step = _plain_step(optimizer) if name == plain_name else _sharpness_step(optimizer)
        params = harness.place(host_params, mesh, shard_leading_axis=False)
        state = harness.init_state(optimizer.init, params, mesh, shard_leading_axis=False)
        variants.append(harness.Variant(name, step, (params, state), batch_arrays))

    num_params = sum(w.size for layer in host_params for w in layer.values())
    harness.log(f"sam: MLP {inputs}-{'-'.join([str(width)] * depth)}-{classes}, batch {batch}")
    results = harness.measure(variants, settings)
    plain = results[plain_name]
    reference = results["optax.contrib.sam (opaque)"]

    rows = []
    for name, _, evaluations in candidates:
        m = results[name]
        peak = None if m.memory is None else m.memory.peak_bytes
        reference_peak = None if reference.memory is None else reference.memory.peak_bytes
        rows.append(
            [
                name,
                str(evaluations),
                harness.format_time(m),
                harness.format_interval(harness.step_time_ratio(m, plain, 2)),
                harness.format_interval(harness.step_time_ratio(m, plain, evaluations)),
                harness.format_interval(harness.step_time_ratio(m, reference)),
                f"{m.compile_time:.3f}",
                harness.format_ratio(m.compile_time, reference.compile_time),
                harness.format_bytes(peak),
                harness.format_ratio(peak, reference_peak),
            ]
        )
    table = harness.markdown_table(
        [
            "step",
            "gradient evaluations",
            "time, ms: median (IQR)",
            "÷ 2 plain steps",
            "÷ (evaluations) plain steps",
            "÷ optax.contrib.sam",
            "compile, s",
            "compile ÷ optax.contrib.sam",
            "XLA peak buffers",
            "peak ÷ optax.contrib.sam",
        ],
        rows,
    )
    sam_ratio = harness.step_time_ratio(results["metaopt.sam"], plain, 2)
    placement = (
        "on one device"
        if mesh is None
        else f"batch sharded over {mesh.size} devices (data parallel)"
    )
    return (
        f"### SAM family: MLP {inputs}-{'-'.join([str(width)] * depth)}-{classes} "
        f"({num_params:,} float32 parameters), batch {batch}\n\n"
        f"Base optimizer `optax.sgd({_LEARNING_RATE}, momentum={_MOMENTUM})`, rho = {_RHO} for "
        f"SAM and the optax reference (adversary `chain(normalize(), sgd(rho))`, sync_period 2, "
        f"opaque mode); ASAM, GAM and gradient regularization (forward) use their default "
        f"hyperparameters. Each row is one jitted step (loss gradient, update, apply) with "
        f"parameters and state donated, {placement}; all rows are timed in the same interleaved "
        f"rounds, {len(plain.step_seconds)} repeats. Time ratios are ratios of medians, with a "
        f"95 % bootstrap interval over the paired rounds in brackets.\n\n" + table + "\n"
        f"metaopt.sam ÷ 2 plain steps = {harness.format_interval(sam_ratio)} "
        f"(target ≤ {_SAM_TIME_TARGET}: "
        f"{harness.verdict(sam_ratio, _SAM_TIME_TARGET, at_most=True)}). "
        f"The ÷ (evaluations) column divides by as many plain steps as the row evaluates "
        f"gradients: GAM's 4 evaluations make its ÷ 2 ratio about 2 by construction. "
        f"XLA peak buffers as in the AdEMAMix table.\n"
    )
