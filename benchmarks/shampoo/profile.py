"""Where Shampoo's step time goes: an XLA profile of one training step, by kind of operation.

Usage, from the repository root::

    python -m benchmarks.shampoo.profile                      # writes "shampoo (profile)"
    python -m benchmarks.shampoo.profile --profile_block_sizes=128 --nowrite

The speed suite measures *how much* a Shampoo step costs against Adam's; this measures *why*.
It compiles one training step of Adam and one ordinary Shampoo step per block size (the
speed suite's MLP, parameters and state donated), runs a few under ``jax.profiler`` and sums
the time XLA's CPU thread pool spends in each compiled operation, grouped as

* **model matmuls**: dots without batch dimensions (the forward and backward products);
* **block matmuls**: batched dots, Shampoo's Gram matrices and preconditioner products;
* **transposes and copies**: operations XLA names ``transpose``/``copy`` (block layouts);
* **other**: elementwise and reduction fusions (moments, grafting, norms, the loss).

Each dot's floating-point operations are counted from its shapes in the compiled HLO, so the
report gives the achieved rate of both kinds of matmul *in the same step*, and the floor that
arithmetic alone sets on the step ratio: at the model's matmul rate, and at the rate the block
matmuls reach. Thread time is summed over the pool's threads, so it exceeds the wall time when
operations overlap. It also times the root computation's compile alone (the stacked inverse
roots of the step's statistics), the part of Shampoo's compile time that ordinary steps never
run, and one eigendecomposition of a block, which bounds the root step.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import re
import shlex
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks import harness
from benchmarks.shampoo.common import make_shampoo
from benchmarks.shampoo.speed import _NO_ROOT, _skip_first_step, _train_step, mlp_problem
from metaopt.optimizers._blocking import Blocking, plan_blocks
from metaopt.optimizers._shampoo_roots import stacked_inverse_roots

_PROFILE_BLOCKS = flags.DEFINE_list(
    "profile_block_sizes", ["128", "512"], "Shampoo block sizes to profile."
)
_PROFILE_WIDTH = flags.DEFINE_integer("profile_width", 1024, "MLP hidden width.", lower_bound=1)
_PROFILE_DEPTH = flags.DEFINE_integer("profile_depth", 4, "MLP hidden layers.", lower_bound=1)
_PROFILE_BATCH = flags.DEFINE_integer("profile_batch", 256, "MLP batch size.", lower_bound=1)
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps",
    9,
    "Profiled rounds: one step of every variant each, interleaved.",
    lower_bound=1,
)
_WRITE = flags.DEFINE_bool("write", True, "Write the section into docs/benchmarks.md.")

SECTION = "shampoo (profile)"
KINDS = ("model matmuls", "block matmuls", "transposes and copies", "other")


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """Thread milliseconds and floating-point operations per step, by kind of operation."""

    milliseconds: dict[str, float]
    flops: dict[str, float]
    wall_milliseconds: float

    def rate(self, kind: str) -> float:
        """Achieved FLOP/s of ``kind`` (0 when it took no time)."""
        seconds = self.milliseconds[kind] / 1e3
        return self.flops[kind] / seconds if seconds > 0 else 0.0


def _instructions(hlo: str) -> dict[str, str]:
    """Every instruction of a compiled module's text, by name (names are module-unique)."""
    out = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if match:
            out[match[1]] = line.strip()
    return out


def _computations(hlo: str) -> dict[str, list[str]]:
    """The instruction lines of each computation, by the computation's name."""
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if header:
            current = header[1]
            out[current] = []
        elif current is not None and line.strip() not in ("", "}"):
            out[current].append(line.strip())
    return out


def _dims(shape_text: str) -> list[int]:
    match = re.match(r"\w+\[([\d,]*)\]", shape_text)
    return [int(d) for d in match[1].split(",") if d] if match else []


def _dot_cost(line: str, instructions: dict[str, str]) -> tuple[float, bool]:
    """(FLOPs, has batch dimensions) of one ``dot`` instruction line."""
    output = _dims(line.split(" = ", 1)[1].split(" ", 1)[0])
    lhs = re.search(r"dot\(%([\w.\-]+)", line)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    lhs_dims = _dims(instructions[lhs[1]].split(" = ", 1)[1].split(" ", 1)[0]) if lhs else []
    size = math.prod(lhs_dims[int(d)] for d in contracting[1].split(",") if d) if contracting else 1
    return 2.0 * math.prod(output) * size, "lhs_batch_dims" in line


def classify(hlo: str) -> dict[str, tuple[str, float]]:
    """Kind and FLOPs of every operation XLA runs as one kernel (an instruction outside fused
    computations; a fusion's kind and FLOPs are those of the dots inside it)."""
    instructions, computations = _instructions(hlo), _computations(hlo)
    fused = {
        called
        for line in instructions.values()
        if " fusion(" in line
        for called in re.findall(r"calls=%([\w.\-]+)", line)
    }
    out = {}
    for computation, lines in computations.items():
        if computation in fused:
            continue
        for line in lines:
            name = re.match(r"(?:ROOT )?%([\w.\-]+) = ", line)
            if not name:
                continue
            called = re.search(r"calls=%([\w.\-]+)", line)
            body = computations.get(called[1], []) if called and " fusion(" in line else [line]
            dots = [b for b in body if " dot(" in b]
            if dots:
                costs = [_dot_cost(d, instructions) for d in dots]
                kind = "block matmuls" if any(b for _, b in costs) else "model matmuls"
                out[name[1]] = (kind, sum(f for f, _ in costs))
            elif re.match(r"(transpose|copy)", name[1]):
                out[name[1]] = ("transposes and copies", 0.0)
            else:
                out[name[1]] = ("other", 0.0)
    return out


def _profile_once(compiled, carry: tuple, constants: tuple, kinds) -> tuple:
    """One step of ``compiled`` under the profiler: (new carry, ms by kind, FLOPs, wall ms)."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        start = time.perf_counter()
        carry = jax.block_until_ready(compiled(*carry, *constants))
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(path)
    milliseconds = dict.fromkeys(KINDS, 0.0)
    flops = dict.fromkeys(KINDS, 0.0)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name not in kinds:
                    continue  # the client, Python, the thread pool's own events
                kind, cost = kinds[event.name]
                milliseconds[kind] += event.duration_ns / 1e6
                flops[kind] += cost
    return carry, milliseconds, flops, wall * 1e3


def profile_steps(variants: dict[str, tuple], rounds: int) -> dict[str, Breakdown]:
    """Profiles one step of each variant ``(compiled, carry, constants)`` per round, the
    variants interleaved (so load on a shared machine falls on all of them alike); each kind's
    time is its median over the rounds."""
    state = {}
    for name, (compiled, carry, constants) in variants.items():
        for _ in range(2):  # untimed: the first calls allocate and warm up
            carry = jax.block_until_ready(compiled(*carry, *constants))
        state[name] = [compiled, carry, constants, classify(compiled.as_text()), []]
    for _ in range(rounds):
        for entry in state.values():
            compiled, carry, constants, kinds, samples = entry
            entry[1], *sample = _profile_once(compiled, carry, constants, kinds)
            samples.append(sample)
    out = {}
    for name, (_, _, _, _, samples) in state.items():
        out[name] = Breakdown(
            {k: float(np.median([s[0][k] for s in samples])) for k in KINDS},
            samples[0][1],
            float(np.median([s[2] for s in samples])),
        )
    return out


def _compiled_step(problem, optimizer, skip: bool):
    params = jax.tree.map(jnp.asarray, problem.params)
    state = optimizer.init(params)
    if skip:
        state = _skip_first_step(state)
    batch = tuple(jnp.asarray(b) for b in problem.batch)
    step = jax.jit(_train_step(problem.loss, optimizer), donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = step.lower(params, state, *batch).compile()
    return compiled, time.perf_counter() - start, (params, state), batch


def root_compile_seconds(params, block_size: int) -> tuple[float, int]:
    """Compile time of the stacked inverse roots of Shampoo's statistics for ``params`` alone,
    and the number of matrices they root."""
    matrices, exponents = [], []
    for leaf in jax.tree.leaves(params):
        plan = plan_blocks(leaf.shape, Blocking(block_size=block_size))
        for shape in plan.matrix_shapes():
            matrices.append(jax.ShapeDtypeStruct(shape, jnp.float32))
            exponents.append(2 * len(plan.preconditioned))

    def roots(*stacks):
        # The roots and their MatrixRootInfo (the step reads both to accept or reject a root).
        return stacked_inverse_roots(stacks, exponents, damping=1e-6, epsilon=1e-12, method="eigh")

    start = time.perf_counter()
    jax.jit(roots).lower(*matrices).compile()
    count = sum(math.prod(m.shape[:-2]) for m in matrices)
    return time.perf_counter() - start, count


def eigh_milliseconds(size: int, repeats: int = 20) -> float:
    """Median time of one float32 eigendecomposition of a ``size`` x ``size`` Gram matrix."""
    x = np.random.default_rng(0).standard_normal((size, 2 * size)).astype(np.float32)
    gram = jnp.asarray(x @ x.T)
    eigh = jax.jit(jnp.linalg.eigh)
    jax.block_until_ready(eigh(gram))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(eigh(gram))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def report(
    adam: Breakdown,
    shampoo: dict[int, Breakdown],
    compiles: dict[str, float],
    roots: dict[int, tuple[float, int, float]],
    description: str,
) -> str:
    """The markdown section: time by kind, rates, floors, compile and root-step bounds."""
    rows = []
    for kind in KINDS:
        row = [kind, f"{adam.milliseconds[kind]:.1f}"]
        for b in shampoo.values():
            row.append(f"{b.milliseconds[kind]:.1f}")
        rows.append(row)
    rows.append(["**wall time of a step**", f"{adam.wall_milliseconds:.1f}"])
    rows[-1] += [f"{b.wall_milliseconds:.1f}" for b in shampoo.values()]
    header = ["thread ms per step", "optax.adam"] + [f"shampoo, block {k}" for k in shampoo]
    text = [f"### Shampoo's step, profiled ({description})\n", harness.markdown_table(header, rows)]
    model_rate = adam.rate("model matmuls")
    model_flops = adam.flops["model matmuls"]
    adam_total = sum(adam.milliseconds.values())
    floor_rows = []
    for block, b in shampoo.items():
        extra, rate = b.flops["block matmuls"], b.rate("block matmuls")
        at_model_rate = extra / model_rate * 1e3 if model_rate else float("nan")
        floor_rows.append(
            [
                str(block),
                f"{extra / 1e9:.2f} / {model_flops / 1e9:.2f}",
                f"{rate / 1e9:.0f} / {model_rate / 1e9:.0f} ({rate / model_rate:.0%})",
                f"{(adam_total + at_model_rate) / adam_total:.2f}",
                f"{(adam_total + b.milliseconds['block matmuls']) / adam_total:.2f}",
                f"{sum(b.milliseconds.values()) / adam_total:.2f}",
                f"{b.wall_milliseconds / adam.wall_milliseconds:.2f}",
            ]
        )
    text.append(
        harness.markdown_table(
            [
                "block",
                "GFLOP per step: block / model matmuls",
                "GFLOP/s: block / model matmuls",
                "floor: Adam + block matmuls at the model's rate",
                "floor: Adam + block matmuls as measured",
                "Shampoo ÷ Adam, thread time",
                "Shampoo ÷ Adam, wall time",
            ],
            floor_rows,
        )
    )
    text.append(
        "Ratios are to Adam's step. A floor is what Shampoo's step would cost if everything it "
        "adds to Adam's step except the block matmuls were free; the gap between the second "
        "floor and the thread-time ratio is Shampoo's own elementwise work and layout "
        "changes (the *other* and *transposes* rows, less Adam's).\n"
    )
    compile_rows = [[name, f"{seconds:.2f}"] for name, seconds in compiles.items()]
    for block, (seconds, count, eigh_ms) in roots.items():
        compile_rows.append(
            [f"the roots alone, block {block} ({count} matrices)", f"{seconds:.2f}"]
        )
        text_bound = f"{count} eighs × {eigh_ms:.2f} ms = {count * eigh_ms / 1e3:.2f} s"
        compile_rows[-1].append(text_bound)
    for row in compile_rows:
        row += [""] * (3 - len(row))
    text.append(
        harness.markdown_table(
            ["compiled", "seconds", "root step bound: eigendecompositions alone"], compile_rows
        )
    )
    return "\n".join(text)


def run(block_sizes: Sequence[int], width: int, depth: int, batch: int, steps: int) -> str:
    """Profiles Adam and Shampoo's ordinary step on the MLP; returns the markdown section."""
    rng = np.random.default_rng(0)
    problem = mlp_problem(rng, 784, width, depth, batch)
    compiled, seconds, carry, constants = _compiled_step(problem, optax.adam(1e-3), False)
    compiles = {"optax.adam step": seconds}
    variants = {"adam": (compiled, carry, constants)}
    roots = {}
    for block in block_sizes:
        optimizer = make_shampoo(1e-3, block, _NO_ROOT, 1)
        compiled, seconds, carry, constants = _compiled_step(problem, optimizer, True)
        compiles[f"shampoo step, block {block}"] = seconds
        variants[block] = (compiled, carry, constants)
        root_seconds, count = root_compile_seconds(problem.params, block)
        roots[block] = (root_seconds, count, eigh_milliseconds(min(block, width)))
    harness.log(f"profile: {steps} interleaved rounds of Adam and Shampoo at blocks {block_sizes}")
    measured = profile_steps(variants, steps)
    adam = measured.pop("adam")
    shampoo = measured
    num_params = sum(np.size(x) for x in jax.tree.leaves(problem.params))
    return report(adam, shampoo, compiles, roots, f"MLP, {num_params:,} parameters")


def main(argv: Sequence[str]) -> None:
    body = run(
        [int(b) for b in _PROFILE_BLOCKS.value],
        _PROFILE_WIDTH.value,
        _PROFILE_DEPTH.value,
        _PROFILE_BATCH.value,
        _PROFILE_STEPS.value,
    )
    print(body)
    if _WRITE.value and jax.process_index() == 0:
        command = " ".join(
            ["python -m benchmarks.shampoo.profile", *(shlex.quote(a) for a in argv[1:])]
        )
        provenance = harness.provenance(command, harness.machine_description())
        section = f"## {SECTION}\n\n{provenance}\n{body}"
        harness.write_section(harness.REPORT_PATH, SECTION, section)


if __name__ == "__main__":
    app.run(main)
