"""Learned-optimizer benchmarks: step cost against Adam, state size, meta-training throughput.

Four measurements of :class:`metaopt.learned.PerParameterMLP`, each with
:func:`benchmarks.harness.measure` (interleaved rounds, compile excluded and reported):

1. **Training step ÷ Adam's**, on the Shampoo suite's 4M-parameter MLP and transformer block
   (:func:`benchmarks.shampoo.speed.mlp_problem` and ``transformer_problem``, with this suite's
   size flags): one jitted training step (gradient, update, apply; parameters and state donated)
   of ``optax.adam`` and of the learned optimizer at several network sizes
   (``--learned_networks``, ``HxL`` = hidden size x hidden layers), beside the gradient + SGD
   floor; then the optimizer update alone, from fixed gradients. A least-squares line through
   the one-layer sizes' update times splits the update into a part that does not depend on the
   hidden size (moments, features, their per-tensor normalization, the output and the apply)
   and the per-parameter network's matmuls, which grow with it.
2. **Optimizer state per parameter**: bytes of the state's leaves over the number of parameters.
3. **Meta-training throughput**: one jitted :func:`metaopt.learned.meta_train_step` with
   :class:`~metaopt.learned.PES` on a small :func:`metaopt.tasks.mlp_task`, in task-steps per
   second (tasks x truncation length per meta-step), on one device and on a mesh of
   ``--learned_devices`` devices with the task axis sharded by ``NamedSharding``. On a CPU
   backend the mesh is simulated (``--xla_force_host_platform_device_count``) in a child
   process, which times its first device alone and the whole mesh in the same rounds.
4. **Meta-gradient cost**: one ``gradient`` call of truncated backprop, antithetic ES and PES
   with the same task, truncation length and number of tasks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks import harness
from benchmarks.shampoo.speed import (
    Problem,
    _sgd_step,
    _train_step,
    _update_step,
    mlp_problem,
    transformer_problem,
)
from metaopt import learned, tasks

_SPEED_MODELS = flags.DEFINE_list(
    "learned_speed_models", ["mlp", "transformer"], "Models of the step benchmark, in order."
)
_MLP_INPUTS = flags.DEFINE_integer("learned_mlp_inputs", 784, "MLP input features.", lower_bound=1)
_MLP_WIDTH = flags.DEFINE_integer("learned_mlp_width", 1024, "MLP hidden width.", lower_bound=1)
_MLP_DEPTH = flags.DEFINE_integer("learned_mlp_depth", 4, "MLP hidden layers.", lower_bound=1)
_MLP_BATCH = flags.DEFINE_integer("learned_mlp_batch", 256, "MLP batch size.", lower_bound=1)
_MODEL_WIDTH = flags.DEFINE_integer("learned_d_model", 256, "Transformer width.", lower_bound=1)
_HEADS = flags.DEFINE_integer("learned_heads", 4, "Transformer attention heads.", lower_bound=1)
_SEQUENCE = flags.DEFINE_integer("learned_seq_len", 128, "Tokens per sequence.", lower_bound=1)
_VOCAB = flags.DEFINE_integer("learned_vocab", 1024, "Vocabulary size.", lower_bound=2)
_BATCH = flags.DEFINE_integer("learned_batch", 8, "Sequences per batch.", lower_bound=1)
_NETWORKS = flags.DEFINE_list(
    "learned_networks",
    ["16x1", "8x1", "32x1", "16x2"],
    "Learned-optimizer network sizes to time, each HIDDEN_SIZExHIDDEN_LAYERS.",
)
_MAX_REPEATS = flags.DEFINE_integer(
    "learned_max_repeats", 20, "Caps --repeats for this suite.", lower_bound=1
)
_MAX_COMPILE_REPEATS = flags.DEFINE_integer(
    "learned_max_compile_repeats", 3, "Caps --compile_repeats for this suite.", lower_bound=1
)
_TASK_DATASET = flags.DEFINE_enum(
    "learned_task_dataset",
    "blobs",
    list(tasks.DATASETS),
    "Data set of the meta-training task (blobs is synthetic: no scikit-learn needed).",
)
_TASK_HIDDEN = flags.DEFINE_list(
    "learned_task_hidden", ["32"], "Hidden widths of the meta-training task's MLP."
)
_TASK_BATCH = flags.DEFINE_integer(
    "learned_task_batch", 32, "Minibatch of the meta-training task.", lower_bound=1
)
_NUM_TASKS = flags.DEFINE_integer(
    "learned_num_tasks",
    16,
    "Tasks per meta-gradient (a multiple of --learned_devices).",
    lower_bound=1,
)
_TRUNCATION = flags.DEFINE_integer(
    "learned_truncation_length", 20, "Inner steps per meta-gradient.", lower_bound=1
)
_HORIZON = flags.DEFINE_integer(
    "learned_horizon",
    200,
    "Inner steps of one task (a multiple of --learned_truncation_length).",
    lower_bound=1,
)
_STD = flags.DEFINE_float("learned_std", 0.01, "PES and ES perturbation scale.", lower_bound=0.0)
_DEVICES = flags.DEFINE_integer(
    "learned_devices", 8, "Devices of the sharded throughput measurement.", lower_bound=1
)

flags.register_validator(
    "learned_speed_models",
    lambda values: set(values) <= {"mlp", "transformer"},
    message="--learned_speed_models takes a comma-separated subset of mlp,transformer.",
)
flags.register_validator(
    "learned_networks",
    lambda values: bool(values) and all(re.fullmatch(r"[1-9]\d*x[1-9]\d*", v) for v in values),
    message="--learned_networks takes HIDDEN_SIZExHIDDEN_LAYERS items, e.g. 16x1,8x1,32x1,16x2.",
)
flags.register_validator(
    "learned_task_hidden",
    lambda values: bool(values) and all(v.isdigit() and int(v) > 0 for v in values),
    message="--learned_task_hidden takes comma-separated positive integers, e.g. 32 or 32,32.",
)

_STEP_TARGET = 2.0
_LEARNING_RATE = 1e-3  # Adam's; the step's cost does not depend on it
_ADAM, _SGD = "optax.adam", "gradient + SGD apply (no optimizer state)"
_DEFAULT = learned.PerParameterMLP()
_TBPTT, _ES, _PES = "TruncatedBackprop", "AntitheticES", "PES"
_ONE_DEVICE, _PROCESS_DEVICE = "1 device", "1 device (this process)"
_CHILD_MARKER = "LEARNED_BENCHMARK_RESULT "


def run_suite(settings: harness.Settings) -> str:
    """Runs the four measurements at the sizes of the flags; returns the markdown section."""
    settings = dataclasses.replace(
        settings,
        repeats=min(settings.repeats, _MAX_REPEATS.value),
        compile_repeats=min(settings.compile_repeats, _MAX_COMPILE_REPEATS.value),
        mesh=None,
    )
    networks = [tuple(int(n) for n in value.split("x")) for value in _NETWORKS.value]
    networks = list(dict.fromkeys(networks))
    rng = np.random.default_rng(0)
    problems = {
        "mlp": lambda: mlp_problem(
            rng, _MLP_INPUTS.value, _MLP_WIDTH.value, _MLP_DEPTH.value, _MLP_BATCH.value
        ),
        "transformer": lambda: transformer_problem(
            rng, _VOCAB.value, _MODEL_WIDTH.value, _HEADS.value, _SEQUENCE.value, _BATCH.value
        ),
    }
    sections = [
        benchmark_steps(problems[name](), networks, settings)
        for name in dict.fromkeys(_SPEED_MODELS.value)
    ]
    config = _meta_config()
    sections.append(benchmark_meta_training(config, settings))
    return "\n".join(sections)


# 1 and 2: the training step and the state against Adam's.


def _network_name(network: tuple[int, int]) -> str:
    hidden_size, hidden_layers = network
    default = network == (_DEFAULT.hidden_size, _DEFAULT.hidden_layers)
    return f"learned {hidden_size}x{hidden_layers}" + (" (default)" if default else "")


def _learned_optimizer(network: tuple[int, int]) -> optax.GradientTransformation:
    lopt = learned.PerParameterMLP(hidden_size=network[0], hidden_layers=network[1])
    return lopt.transform(lopt.init(jax.random.key(0)))


def benchmark_steps(
    problem: Problem, networks: Sequence[tuple[int, int]], settings: harness.Settings
) -> str:
    """Times training steps and updates of Adam and the learned optimizers on ``problem``."""
    batch = tuple(jnp.asarray(b) for b in problem.batch)
    optimizers = [(_ADAM, optax.adam(_LEARNING_RATE))]
    optimizers += [(_network_name(n), _learned_optimizer(n)) for n in networks]
    num_params = sum(np.size(x) for x in jax.tree.leaves(problem.params))
    harness.log(f"learned: {problem.description}, {num_params:,} parameters")

    def params():
        return jax.tree.map(jnp.array, problem.params)

    variants = [harness.Variant(_SGD, _sgd_step(problem.loss), (params(),), batch)]
    state_bytes = {}
    for name, optimizer in optimizers:
        p = params()
        state = harness.init_state(optimizer.init, p, None, shard_leading_axis=False)
        state_bytes[name] = harness.tree_bytes(state) / num_params
        variants.append(
            harness.Variant(name, _train_step(problem.loss, optimizer), (p, state), batch)
        )
    steps = harness.measure(variants, settings)

    grads = jax.jit(jax.grad(problem.loss))(params(), *batch)
    variants = []
    for name, optimizer in optimizers:
        p = params()
        state = harness.init_state(optimizer.init, p, None, shard_leading_axis=False)
        grads_copy = jax.tree.map(jnp.copy, grads)
        variants.append(harness.Variant(name, _update_step(optimizer), (p, state), (grads_copy,)))
    harness.log("learned: the optimizer update alone")
    updates = harness.measure(variants, dataclasses.replace(settings, compile_repeats=1))
    return _steps_report(problem, num_params, networks, steps, updates, state_bytes)


def _split_update(networks, updates) -> str:
    """The least-squares line of update time against hidden size over the one-layer networks."""
    points = sorted(
        (size, updates[_network_name((size, layers))].step_time)
        for size, layers in networks
        if layers == 1
    )
    if len(points) < 2:
        return ""
    sizes, times = np.array(points).T
    slope, intercept = np.polyfit(sizes, times, 1)
    default = _DEFAULT.hidden_size
    network_share = slope * default / (intercept + slope * default)
    adam = updates[_ADAM].step_time
    return (
        f"Where the update's time goes: over the one-layer networks (hidden sizes "
        f"{', '.join(str(int(s)) for s in sizes)}) the update alone takes "
        f"{intercept * 1e3:.3g} ms + {slope * 1e3:.3g} ms per hidden unit (least squares). "
        f"The intercept, {intercept / adam:.1f} × Adam's whole update, is the part that does "
        f"not depend on the network: the moments, the per-entry features and their per-tensor "
        f"normalization, the output and the apply. At hidden size {default} the per-parameter "
        f"network's matmuls are {network_share:.0%} of the update.\n"
    )


def _steps_report(problem, num_params, networks, steps, updates, state_bytes) -> str:
    adam = steps[_ADAM]
    rows, verdicts = [], []
    for name, m in steps.items():
        ratio = harness.step_time_ratio(m, adam)
        target = ""
        if name.endswith("(default)"):
            verdict = harness.verdict(ratio, _STEP_TARGET, at_most=True)
            target = f"≤ {_STEP_TARGET:g}: {verdict}"
            verdicts.append(f"{name}: {harness.format_interval(ratio)}, {verdict}")
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
                f"{m.compile_time / adam.compile_time:.2f}",
                "" if name not in state_bytes else f"{state_bytes[name]:.2f}",
                "" if name not in state_bytes else f"{state_bytes[name] / state_bytes[_ADAM]:.2f}",
                harness.format_bytes(None if m.memory is None else m.memory.peak_bytes),
                ""
                if update is None or update.bytes_accessed is None
                else f"{update.bytes_accessed / num_params:.0f}",
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
            "state, bytes / parameter",
            "state ÷ Adam's",
            "XLA peak buffers",
            "update: bytes accessed / parameter",
        ],
        rows,
    )
    summary = "; ".join(verdicts) or "no default-size network was timed"
    return (
        f"### Training step: {problem.description} ({num_params:,} float32 parameters)\n\n"
        f"One jitted training step (loss gradient, update, apply; parameters and state donated) "
        f"on one device, {len(adam.step_seconds)} interleaved rounds; `learned HxL` is "
        f"`metaopt.learned.PerParameterMLP(hidden_size=H, hidden_layers=L)` at freshly "
        f'initialized meta-parameters (the values do not change the cost). "Update alone" is '
        f"the optimizer update + apply from fixed gradients, compiled separately; `{_SGD}` is "
        f"the floor under every training step. Compile time: median of "
        f"{len(adam.compile_seconds)} trace + lower + compile of the training step. State: "
        f"bytes of the optimizer state's leaves over the number of parameters. Bytes accessed: "
        f"XLA's cost-analysis estimate of the bytes one update alone reads and writes, over the "
        f"number of parameters (Adam's update reads 4 float32 arrays and writes 3, 28 bytes per "
        f"parameter).\n\n"
        + table
        + "\n"
        + _split_update(networks, updates)
        + "\n"
        + f"Target: the default network's training step ≤ {_STEP_TARGET:g} × Adam's. {summary}.\n"
    )


# 3 and 4: meta-training.


def _meta_config() -> dict[str, Any]:
    num_tasks, devices = _NUM_TASKS.value, _DEVICES.value
    if num_tasks % devices:
        raise ValueError(
            f"--learned_num_tasks={num_tasks} must be a multiple of --learned_devices={devices} "
            f"to shard the tasks evenly."
        )
    return {
        "dataset": _TASK_DATASET.value,
        "hidden": [int(w) for w in _TASK_HIDDEN.value],
        "batch": _TASK_BATCH.value,
        "num_tasks": num_tasks,
        "truncation_length": _TRUNCATION.value,
        "horizon": _HORIZON.value,
        "std": _STD.value,
        "devices": devices,
    }


def _problem(config):
    task = tasks.mlp_task(config["dataset"], tuple(config["hidden"]), batch_size=config["batch"])
    return task, learned.training_problem(_DEFAULT, task, config["horizon"])


def _estimators(config) -> dict[str, Any]:
    _, problem = _problem(config)
    length, std = config["truncation_length"], config["std"]
    return {
        _TBPTT: learned.TruncatedBackprop(problem, length),
        _ES: learned.AntitheticES(problem, length, std=std),
        _PES: learned.PES(problem, length, std=std),
    }


def _gradient_step(estimator):
    """``(previous grad, state, theta, key) -> (grad, state)``: the donated previous gradient
    only supplies the output buffer, and returning the gradient keeps XLA from dropping it."""

    def step(grad, state, theta, key):
        del grad
        grad, state, _ = estimator.gradient(theta, state, key)
        return grad, state

    return step


def _fresh_buffers(tree: Any) -> Any:
    """Every leaf copied into its own buffer: PES's two particles start as the same arrays,
    and a buffer cannot be donated twice."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _meta_train_variant(config, name, devices) -> harness.Variant:
    """One PES meta-training step, with the task axis of the estimator state over ``devices``."""
    estimator = _estimators(config)[_PES]
    meta_optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    step = learned.meta_train_step(estimator, meta_optimizer)
    mesh = Mesh(np.array(devices), ("tasks",))
    replicated = NamedSharding(mesh, PartitionSpec())
    by_task = NamedSharding(mesh, PartitionSpec("tasks"))
    theta = _DEFAULT.init(jax.random.key(0))
    state = _fresh_buffers(estimator.init(theta, jax.random.key(1), config["num_tasks"]))
    theta, opt_state, key = jax.device_put(
        (theta, meta_optimizer.init(theta), jax.random.key(2)), replicated
    )
    state = jax.device_put(state, by_task)

    def constrained(theta, opt_state, state, key):
        theta, opt_state, state, _ = step(theta, opt_state, state, key)
        constrain = jax.lax.with_sharding_constraint
        return (
            constrain(theta, replicated),
            constrain(opt_state, replicated),
            constrain(state, by_task),
        )

    return harness.Variant(name, constrained, (theta, opt_state, state), (key,))


def _throughput_on_devices(config: dict[str, Any], settings: harness.Settings) -> dict:
    """PES meta-training steps on the first device and on ``config["devices"]`` devices,
    measured in the same rounds; returns their step and compile times."""
    devices = jax.devices()[: config["devices"]]
    mesh_name = f"{len(devices)} devices, tasks sharded"
    variants = [
        _meta_train_variant(config, _ONE_DEVICE, devices[:1]),
        _meta_train_variant(config, mesh_name, devices),
    ]
    measured = harness.measure(variants, settings)
    return {
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "measurements": [
            {
                "name": m.name,
                "step_seconds": list(m.step_seconds),
                "steps_per_repeat": m.steps_per_repeat,
                "compile_seconds": list(m.compile_seconds),
            }
            for m in measured.values()
        ],
    }


def _child_environment(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def child_main() -> None:
    """Entry point of the child process: reads the configuration and settings (JSON) from
    stdin, measures, and prints the result on a marked line of stdout."""
    request = json.loads(sys.stdin.read())
    settings = harness.Settings(**request["settings"])
    result = _throughput_on_devices(request["config"], settings)
    print(_CHILD_MARKER + json.dumps(result), flush=True)


def _throughput_simulated(config: dict[str, Any], settings: harness.Settings) -> dict:
    """:func:`_throughput_on_devices` in a child process with simulated CPU devices."""
    request = {
        "config": config,
        "settings": {
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "compile_repeats": settings.compile_repeats,
            "min_repeat_seconds": settings.min_repeat_seconds,
        },
    }
    command = [sys.executable, "-c", "from benchmarks.learned import child_main; child_main()"]
    completed = subprocess.run(
        command,
        input=json.dumps(request),
        cwd=Path(__file__).resolve().parents[1],
        env=_child_environment(config["devices"]),
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"the simulated-device child process failed:\n{completed.stderr[-4000:]}"
        )
    line = next(line for line in completed.stdout.splitlines() if line.startswith(_CHILD_MARKER))
    return json.loads(line[len(_CHILD_MARKER) :])


def _measurement(record: dict) -> harness.Measurement:
    return harness.Measurement(
        name=record["name"],
        step_seconds=tuple(record["step_seconds"]),
        steps_per_repeat=record["steps_per_repeat"],
        compile_seconds=tuple(record["compile_seconds"]),
        memory=None,
        bytes_accessed=None,
    )


def benchmark_meta_training(config: dict[str, Any], settings: harness.Settings) -> str:
    """Times the three estimators' meta-gradients and PES meta-training on 1 and N devices."""
    task, _ = _problem(config)
    theta = _DEFAULT.init(jax.random.key(0))
    num_tasks, length = config["num_tasks"], config["truncation_length"]
    harness.log(f"learned: meta-gradients on {task.name}, {num_tasks} tasks x {length} steps")
    variants = []
    for name, estimator in _estimators(config).items():
        state = _fresh_buffers(estimator.init(theta, jax.random.key(1), num_tasks))
        grad = jax.tree.map(jnp.zeros_like, theta)
        variants.append(
            harness.Variant(
                name,
                _gradient_step(estimator),
                (grad, state),
                (jax.tree.map(jnp.copy, theta), jax.random.key(2)),
            )
        )
    variants.append(_meta_train_variant(config, _PROCESS_DEVICE, jax.devices()[:1]))
    gradients = harness.measure(variants, settings)

    devices = config["devices"]
    harness.log(f"learned: PES meta-training on 1 and {devices} devices")
    if jax.default_backend() == "cpu":
        simulated = True
        child = _throughput_simulated(config, settings)
    elif jax.device_count() >= devices:
        simulated = False
        child = _throughput_on_devices(config, settings)
    else:
        simulated, child = False, None
    return _meta_report(task, config, gradients, child, simulated)


def _meta_report(task, config, gradients, child, simulated) -> str:
    num_tasks, length, devices = (
        config["num_tasks"],
        config["truncation_length"],
        config["devices"],
    )
    num_params = sum(np.size(x) for x in jax.tree.leaves(task.init(jax.random.key(0))))
    tbptt = gradients[_TBPTT]
    forwards = {_TBPTT: "1 forward + 1 backward", _ES: "3 forward", _PES: "2 forward"}
    rows = []
    for name in (_TBPTT, _ES, _PES):
        m = gradients[name]
        rows.append(
            [
                f"`{name}`",
                forwards[name],
                harness.format_time(m),
                harness.format_interval(harness.step_time_ratio(m, tbptt)),
                f"{m.compile_time:.2f}",
                harness.format_bytes(None if m.memory is None else m.memory.temp_bytes),
            ]
        )
    gradient_table = harness.markdown_table(
        [
            "meta-gradient",
            "passes of the window per task",
            "ms: median (IQR)",
            "÷ TruncatedBackprop",
            "compile, s",
            "XLA temporaries",
        ],
        rows,
    )

    def throughput_row(m, ratio):
        seconds = m.step_time
        return [
            m.name,
            harness.format_time(m),
            f"{num_tasks * length / seconds:,.0f}",
            f"{2 * num_tasks * length / seconds:,.0f}",
            f"{m.compile_time:.2f}",
            ratio,
        ]

    process = gradients[_PROCESS_DEVICE]
    throughput_rows = [throughput_row(process, "")]
    if child is None:
        child_text = (
            f"The {devices}-device measurement was skipped: the {jax.default_backend()} backend "
            f"has {jax.device_count()} devices.\n"
        )
    else:
        measured = [_measurement(record) for record in child["measurements"]]
        one, mesh = measured
        prefix = "child process: " if simulated else ""
        throughput_rows.append(throughput_row(dataclasses.replace(one, name=prefix + one.name), ""))
        speedup = harness.step_time_ratio(one, mesh)
        throughput_rows.append(
            throughput_row(
                dataclasses.replace(mesh, name=prefix + mesh.name),
                harness.format_interval(speedup),
            )
        )
        if simulated:
            child_text = (
                f"The {devices} devices are simulated: a child process with "
                f"`XLA_FLAGS=--xla_force_host_platform_device_count={devices}` times its first "
                f"device alone and the {devices}-device mesh in the same "
                f'{len(one.step_seconds)} interleaved rounds. Its {devices} CPU "devices" '
                f"share this machine's {child['cpu_count']} cores, so the speed-up measures "
                f"how the sharded program divides the work, not what {devices} real "
                f"accelerators would give: {devices} devices ÷ 1 = "
                f"{harness.format_interval(speedup)}.\n"
            )
        else:
            child_text = (
                f"1 device and {devices} devices measured in the same rounds: speed-up "
                f"{harness.format_interval(speedup)}.\n"
            )
    throughput_table = harness.markdown_table(
        [
            "PES meta-training step",
            "ms: median (IQR)",
            "task-steps / s",
            "inner steps computed / s (2 particles)",
            "compile, s",
            "speed-up over 1 device",
        ],
        throughput_rows,
    )
    pes = harness.step_time_ratio(gradients[_PES], tbptt)
    es = harness.step_time_ratio(gradients[_ES], tbptt)
    return (
        f"### Meta-training: {task.name} ({num_params:,} parameters), {num_tasks} tasks × "
        f"{length} inner steps\n\n"
        f"The inner problem is `learned.training_problem(PerParameterMLP(), task, "
        f"horizon={config['horizon']})` on `tasks.mlp_task({config['dataset']!r}, "
        f"{tuple(config['hidden'])}, batch_size={config['batch']})`. Each row of the first table "
        f"is one jitted `gradient(theta, state, key)` of an estimator (truncation length "
        f"{length}, {num_tasks} tasks, std {config['std']:g} for ES and PES; carried state "
        f"donated) on one device, in {len(tbptt.step_seconds)} interleaved rounds. XLA "
        f"temporaries are the compiled call's scratch buffers: truncated backprop keeps the "
        f"window's activations for its backward pass.\n\n"
        + gradient_table
        + "\n"
        + f"One PES meta-gradient costs {harness.format_interval(pes)} truncated-backprop "
        f"meta-gradients, one antithetic-ES meta-gradient {harness.format_interval(es)}.\n\n"
        f"Meta-training throughput: one jitted `learned.meta_train_step(PES(...), "
        f"chain(clip_by_global_norm(1), adam(1e-3)))` (estimator state donated). A task-step "
        f"is one inner step of one task ({num_tasks} × {length} per meta-step); PES runs two "
        f"particles per task, so it computes twice as many inner steps.\n\n"
        + throughput_table
        + "\n"
        + child_text
    )
