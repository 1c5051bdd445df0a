"""Meta-trains a learned optimizer on a distribution of small training tasks.

The learned optimizer is :class:`metaopt.learned.PerParameterMLP`; each meta-step draws one of a
pool of task configurations from :func:`metaopt.tasks.sample_training_task`, estimates the
meta-gradient of the mean log training loss over a truncated unroll (PES by default, or
truncated backpropagation, or antithetic ES) on a batch of tasks of that configuration, clips it
and applies Adam. Everything is a flag, so the same code runs at laptop size (the defaults, a
few minutes on two CPU cores) and large on accelerators::

    python examples/train_learned_optimizer.py --meta_steps=2000 --output=lopt.npz
    python examples/train_learned_optimizer.py --checkpoint_dir=/tmp/ckpt  # resumes if present

With several devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` simulates 8 on the
CPU) the tasks axis of every estimator state is sharded over a one-axis mesh ``("tasks",)``; the
meta-parameters are replicated. An Orbax checkpoint holds the meta-parameters, the meta-optimizer
state and every estimator state; a resumed run continues bit for bit, because every random
number is drawn from ``fold_in(seed, step)``.

Install: ``pip install "metaopt-jax[examples]"`` (Orbax for ``--checkpoint_dir``:
``pip install orbax-checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    from absl import app, flags, logging
    from tqdm import tqdm
except ImportError as error:  # pragma: no cover - depends on the environment
    raise SystemExit(
        f"This example needs absl-py and tqdm ({error}); install them with "
        'pip install "metaopt-jax[examples]".'
    ) from None

from metaopt import learned, tasks

ESTIMATORS = ("pes", "tbptt", "es")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a meta-training run (the flags of the script)."""

    meta_steps: int = 300
    estimator: str = "pes"
    truncation_length: int = 20
    horizon: int = 200
    std: float = 0.01
    num_tasks: int = 8
    num_task_configs: int = 4
    meta_learning_rate: float = 3e-3
    clip_norm: float = 1.0
    seed: int = 0
    hidden_size: int = 16
    hidden_layers: int = 1
    parameterization: str = "standard"
    widths: tuple[int, ...] = (8, 16, 32)
    depths: tuple[int, ...] = (1, 2)
    batch_sizes: tuple[int, ...] = (32, 64)
    datasets: tuple[str, ...] = tasks.TRAINING_DATASETS
    transformer_probability: float = 0.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    output: str | None = None
    stop_after: int | None = None  # stop early at this meta-step (an interruption, for tests)


@dataclasses.dataclass
class Result:
    """What a run produced."""

    optimizer: learned.PerParameterMLP
    meta_params: dict
    meta_losses: list[float]
    nonfinite_tasks: int
    wall_time_s: float
    task_names: list[str]


def _estimator(config: Config, problem: learned.InnerProblem):
    if config.estimator == "pes":
        return learned.PES(problem, config.truncation_length, config.std)
    if config.estimator == "es":
        return learned.AntitheticES(problem, config.truncation_length, config.std)
    if config.estimator == "tbptt":
        return learned.TruncatedBackprop(problem, config.truncation_length)
    raise ValueError(f"--estimator must be one of {ESTIMATORS}, got {config.estimator!r}.")


def _task_pool(config: Config) -> list:
    """The task configurations of the run, drawn from the seed (the same on resume)."""
    keys = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed), 1), config.num_task_configs
    )
    parameterization = "mup" if config.parameterization == "mulo" else "standard"
    return [
        tasks.sample_training_task(
            key,
            datasets=config.datasets,
            widths=config.widths,
            depths=config.depths,
            batch_sizes=config.batch_sizes,
            parameterization=parameterization,
            transformer_probability=config.transformer_probability,
        )
        for key in keys
    ]


def _mesh_shardings(num_tasks: int):
    """Shardings of the leading tasks axis over every device and of replicated values, or
    (None, None) on one device."""
    devices = jax.devices()
    if len(devices) == 1:
        return None, None
    if num_tasks % len(devices):
        raise ValueError(
            f"--num_tasks={num_tasks} must be a multiple of the {len(devices)} devices, so that "
            "the tasks axis splits evenly over the mesh."
        )
    mesh = jax.sharding.Mesh(np.array(devices), ("tasks",))
    spec = jax.sharding.PartitionSpec
    return (
        jax.sharding.NamedSharding(mesh, spec("tasks")),
        jax.sharding.NamedSharding(mesh, spec()),
    )


def _checkpoint_manager(directory: str):
    try:
        import orbax.checkpoint as ocp
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "--checkpoint_dir needs Orbax: pip install orbax-checkpoint (or the test extra)."
        ) from None
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    return ocp, ocp.CheckpointManager(Path(directory).absolute(), options=options)


def meta_train(config: Config, *, progress: bool = True) -> Result:
    """Runs meta-training; returns the meta-parameters and the meta-loss curve."""
    optimizer = learned.PerParameterMLP(
        hidden_size=config.hidden_size,
        hidden_layers=config.hidden_layers,
        parameterization=config.parameterization,
    )
    key = jax.random.key(config.seed)
    theta = optimizer.init(jax.random.fold_in(key, 0))
    meta_optimizer = optax.chain(
        optax.clip_by_global_norm(config.clip_norm), optax.adam(config.meta_learning_rate)
    )
    meta_opt_state = meta_optimizer.init(theta)
    pool = _task_pool(config)
    estimators = [
        _estimator(config, learned.training_problem(optimizer, t, config.horizon)) for t in pool
    ]
    sharding, replicated = _mesh_shardings(config.num_tasks)
    if replicated is not None:
        # Placed where the step's outputs will be, so the second step does not compile anew.
        theta, meta_opt_state = jax.device_put((theta, meta_opt_state), replicated)
    states = []
    for i, estimator in enumerate(estimators):
        state = estimator.init(
            theta, jax.random.fold_in(jax.random.fold_in(key, 2), i), config.num_tasks
        )
        if sharding is not None:
            state = jax.device_put(state, sharding)
        states.append(state)
    steps = [jax.jit(learned.meta_train_step(e, meta_optimizer)) for e in estimators]

    carry = {
        "theta": theta,
        "meta_opt_state": meta_opt_state,
        "estimator_states": states,
        "meta_losses": jnp.full(config.meta_steps, jnp.nan, jnp.float32),
        "nonfinite_tasks": jnp.zeros((), jnp.int32),
    }
    if replicated is not None:
        carry["meta_losses"], carry["nonfinite_tasks"] = jax.device_put(
            (carry["meta_losses"], carry["nonfinite_tasks"]), replicated
        )
    start = 0
    manager = None
    if config.checkpoint_dir:
        ocp, manager = _checkpoint_manager(config.checkpoint_dir)
        latest = manager.latest_step()
        if latest is not None:
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, carry)
            carry = manager.restore(latest, args=ocp.args.StandardRestore(target))
            start = latest

    begin = time.perf_counter()
    bar = tqdm(
        range(start, config.meta_steps), desc="meta-training", unit="step", disable=not progress
    )
    for step in bar:
        if config.stop_after is not None and step >= config.stop_after:
            break
        index = step % len(pool)
        step_key = jax.random.fold_in(jax.random.fold_in(key, 3), step)
        theta, meta_opt_state, state, info = steps[index](
            carry["theta"], carry["meta_opt_state"], carry["estimator_states"][index], step_key
        )
        carry["estimator_states"][index] = state
        carry["theta"], carry["meta_opt_state"] = theta, meta_opt_state
        carry["meta_losses"] = carry["meta_losses"].at[step].set(info.meta_loss)
        carry["nonfinite_tasks"] = carry["nonfinite_tasks"] + info.num_nonfinite
        if progress and step % 10 == 0:
            bar.set_postfix(
                meta_loss=f"{float(info.meta_loss):.3f}", nonfinite=int(carry["nonfinite_tasks"])
            )
        done = step + 1
        if manager is not None and (
            done % config.checkpoint_every == 0 or done == config.meta_steps
        ):
            manager.save(done, args=ocp.args.StandardSave(carry))
    if manager is not None:
        manager.wait_until_finished()
    wall_time = time.perf_counter() - begin
    result = Result(
        optimizer=optimizer,
        meta_params=carry["theta"],
        meta_losses=[float(x) for x in np.asarray(carry["meta_losses"])],
        nonfinite_tasks=int(carry["nonfinite_tasks"]),
        wall_time_s=wall_time,
        task_names=[t.name for t in pool],
    )
    if config.output:
        learned.save_meta_params(
            config.output,
            optimizer,
            result.meta_params,
            command=" ".join(["python", "examples/train_learned_optimizer.py", *sys.argv[1:]]),
            seed=config.seed,
            meta_steps=config.meta_steps,
            meta_training_wall_time_s=round(wall_time, 1),
            final_meta_loss=final_meta_loss(result.meta_losses),
            tasks=result.task_names,
            config={
                k: v
                for k, v in dataclasses.asdict(config).items()
                if k not in ("output", "checkpoint_dir")
            },
        )
    return result


def final_meta_loss(meta_losses: list[float], window: int = 50) -> float:
    """The mean meta-loss of the last ``window`` meta-steps (finite ones)."""
    tail = [x for x in meta_losses[-window:] if math.isfinite(x)]
    return float(np.mean(tail)) if tail else float("nan")


def _define_flags() -> None:
    d = Config()
    flags.DEFINE_integer("meta_steps", d.meta_steps, "Meta-gradient steps.", lower_bound=1)
    flags.DEFINE_enum("estimator", d.estimator, ESTIMATORS, "Meta-gradient estimator.")
    flags.DEFINE_integer(
        "truncation_length", d.truncation_length, "Inner steps per truncation.", lower_bound=1
    )
    flags.DEFINE_integer(
        "horizon", d.horizon, "Inner steps of one task before it restarts.", lower_bound=1
    )
    flags.DEFINE_float("std", d.std, "Perturbation standard deviation (PES, ES).", lower_bound=0.0)
    flags.DEFINE_integer(
        "num_tasks", d.num_tasks, "Tasks (particle pairs) per meta-gradient.", lower_bound=1
    )
    flags.DEFINE_integer(
        "num_task_configs", d.num_task_configs, "Task configurations in the pool.", lower_bound=1
    )
    flags.DEFINE_float(
        "meta_learning_rate", d.meta_learning_rate, "Adam's rate on the meta-parameters."
    )
    flags.DEFINE_float("clip_norm", d.clip_norm, "Global-norm clip of the meta-gradient.")
    flags.DEFINE_integer("seed", d.seed, "Seed of everything.")
    flags.DEFINE_integer(
        "hidden_size", d.hidden_size, "Width of the learned optimizer's MLP.", lower_bound=1
    )
    flags.DEFINE_integer(
        "hidden_layers", d.hidden_layers, "Hidden layers of its MLP.", lower_bound=1
    )
    flags.DEFINE_enum(
        "parameterization", d.parameterization, ("standard", "mulo"), "SP or muLO (muP tasks)."
    )
    flags.DEFINE_list("widths", [str(w) for w in d.widths], "Hidden widths of the sampled MLPs.")
    flags.DEFINE_list("depths", [str(w) for w in d.depths], "Hidden layers of the sampled MLPs.")
    flags.DEFINE_list("batch_sizes", [str(w) for w in d.batch_sizes], "Batch sizes of the tasks.")
    flags.DEFINE_list("datasets", list(d.datasets), "Data sets of the sampled tasks.")
    flags.DEFINE_float(
        "transformer_probability", d.transformer_probability, "Share of transformer tasks."
    )
    flags.DEFINE_string("checkpoint_dir", None, "Orbax checkpoints here; resumes from the latest.")
    flags.DEFINE_integer(
        "checkpoint_every", d.checkpoint_every, "Meta-steps between checkpoints.", lower_bound=1
    )
    flags.DEFINE_string("output", None, "Write the meta-parameters (.npz) here at the end.")
    flags.DEFINE_integer("stop_after", None, "Stop at this meta-step, as if interrupted.")
    flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")


def main(argv: list[str]) -> None:
    del argv
    values = flags.FLAGS
    if not values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = Config(
        **{
            field.name: getattr(values, field.name)
            for field in dataclasses.fields(Config)
            if field.name not in ("widths", "depths", "batch_sizes", "datasets")
        },
        widths=tuple(int(w) for w in values.widths),
        depths=tuple(int(w) for w in values.depths),
        batch_sizes=tuple(int(w) for w in values.batch_sizes),
        datasets=tuple(values.datasets),
    )
    print(f"devices: {jax.device_count()} ({jax.devices()[0].platform})")
    result = meta_train(config, progress=values.progress)
    losses = [x for x in result.meta_losses if math.isfinite(x)]
    first = float(np.mean(losses[: min(50, len(losses))])) if losses else float("nan")
    print(f"tasks: {', '.join(result.task_names)}")
    print(
        f"meta-loss (mean log training loss): first {first:.4f} -> final "
        f"{final_meta_loss(result.meta_losses):.4f}; non-finite tasks {result.nonfinite_tasks}; "
        f"wall time {result.wall_time_s:.1f} s"
    )
    if config.output:
        print(f"meta-parameters written to {config.output}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
