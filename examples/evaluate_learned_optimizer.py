"""Evaluates learned optimizers on tasks meta-training never saw, against Adam tuned per task.

Each task is trained from the same initializations (``--seeds``) by every learned optimizer
given (``--optimizers=name=path.npz,...``, or the package's pretrained ones by default) and by
Adam with its learning rate tuned per task over ``--adam_grid`` (the rate with the lowest mean
final training loss wins). The table reports the final training loss on the whole training set,
the test accuracy (or test loss for regression), and the steps each optimizer needed to reach
the target loss: 1.5 times tuned Adam's final training loss (training loss evaluated every
``horizon / 50`` steps)::

    python examples/evaluate_learned_optimizer.py
    python examples/evaluate_learned_optimizer.py --optimizers=mine=lopt.npz --seeds=5

The held-out tasks: the data sets the default meta-training distribution leaves out (wine,
breast cancer), MLPs 4x and 8x wider than the widest meta-training network, and a horizon 10x
longer than the meta-training unrolls. muLO optimizers (``parameterization="mulo"``) train the
same networks initialized in muP, with their update multipliers; everything else uses the
standard parameterization.

Install: ``pip install "metaopt-jax[examples]"``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import optax

try:
    from absl import app, flags
except ImportError as error:  # pragma: no cover - depends on the environment
    raise SystemExit(
        f"This example needs absl-py ({error}); install it with "
        'pip install "metaopt-jax[examples]".'
    ) from None

from metaopt import learned, tasks


@dataclasses.dataclass(frozen=True)
class HeldOutTask:
    """One evaluation task: a network, a data set and a horizon."""

    label: str
    dataset: str
    hidden_sizes: tuple[int, ...]
    horizon: int
    batch_size: int = 64


def held_out_tasks(meta_width: int = 32, meta_horizon: int = 200) -> list[HeldOutTask]:
    """The evaluation suite, relative to the meta-training widths and horizon."""
    w = meta_width
    return [
        HeldOutTask("wine (unseen data set)", "wine", (w, w), meta_horizon),
        HeldOutTask("breast cancer (unseen data set)", "breast_cancer", (w, w), meta_horizon),
        HeldOutTask(f"digits, width {4 * w} (4x)", "digits", (4 * w, 4 * w), meta_horizon),
        HeldOutTask(f"digits, width {8 * w} (8x)", "digits", (8 * w, 8 * w), meta_horizon),
        HeldOutTask(
            f"digits, {10 * meta_horizon} steps (10x)", "digits", (w, w), 10 * meta_horizon
        ),
    ]


def train_curve(task, tx, horizon: int, seed: int, points: int = 50):
    """Training-loss curve (``points`` evaluations) and the final evaluation of one run."""
    every = max(1, horizon // points)

    def step(carry, key):
        params, state = carry
        grads = jax.grad(task.loss)(params, task.sample_batch(key))
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    def chunk(carry, keys):
        carry, _ = jax.lax.scan(step, carry, keys)
        return carry, task.evaluate(carry[0])["train_loss"]

    @jax.jit
    def run(key):
        params = task.init(jax.random.fold_in(key, 0))
        keys = jax.random.split(jax.random.fold_in(key, 1), (horizon // every, every))
        (params, _), curve = jax.lax.scan(chunk, (params, tx.init(params)), keys)
        return curve, task.evaluate(params)

    curve, final = run(jax.random.key(seed))
    steps = every * np.arange(1, len(curve) + 1)
    return steps, np.asarray(curve), {k: float(v) for k, v in final.items()}


def _summary(runs):
    curves = np.stack([c for _, c, _ in runs])
    finals = {k: float(np.mean([f[k] for *_, f in runs])) for k in runs[0][2]}
    return runs[0][0], np.nanmean(np.where(np.isfinite(curves), curves, np.nan), axis=0), finals


def steps_to(steps, curve, target: float) -> int | None:
    below = np.nonzero(curve <= target)[0]
    return int(steps[below[0]]) if below.size else None


def evaluate(optimizers: dict, suite: list[HeldOutTask], seeds: int, adam_grid) -> list[dict]:
    """Rows of the held-out table: one per task and optimizer."""
    rows = []
    for spec in suite:
        standard = tasks.mlp_task(spec.dataset, spec.hidden_sizes, batch_size=spec.batch_size)
        adam = {}
        for rate in adam_grid:
            runs = [train_curve(standard, optax.adam(rate), spec.horizon, s) for s in range(seeds)]
            adam[rate] = _summary(runs)
        best_rate = min(
            adam,
            key=lambda r: (
                adam[r][2]["train_loss"] if math.isfinite(adam[r][2]["train_loss"]) else np.inf
            ),
        )
        target = 1.5 * adam[best_rate][2]["train_loss"]
        results = {f"Adam (tuned: {best_rate:g})": adam[best_rate]}
        for name, (optimizer, meta_params) in optimizers.items():
            mulo = optimizer.parameterization == "mulo"
            task = standard
            if mulo:
                task = tasks.mlp_task(
                    spec.dataset,
                    spec.hidden_sizes,
                    batch_size=spec.batch_size,
                    parameterization="mup",
                )
            params = jax.eval_shape(task.init, jax.random.key(0))
            tx = optimizer.transform(
                meta_params, update_multipliers=task.update_multipliers(params) if mulo else None
            )
            results[name] = _summary([train_curve(task, tx, spec.horizon, s) for s in range(seeds)])
        for name, (steps, curve, final) in results.items():
            rows.append(
                {
                    "task": spec.label,
                    "optimizer": name,
                    "final_train_loss": final["train_loss"],
                    "test_accuracy": final.get("test_accuracy"),
                    "test_loss": final["test_loss"],
                    "steps_to_target": steps_to(steps, curve, target),
                    "horizon": spec.horizon,
                    "target": target,
                }
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| task | optimizer | final train loss | test accuracy / loss | steps to target |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        test = (
            f"{100 * row['test_accuracy']:.1f}%"
            if row["test_accuracy"] is not None
            else f"{row['test_loss']:.4f}"
        )
        reached = row["steps_to_target"]
        steps = f"{reached}" if reached is not None else f"not in {row['horizon']}"
        loss = f"{row['final_train_loss']:.4f}"
        lines.append(f"| {row['task']} | {row['optimizer']} | {loss} | {test} | {steps} |")
    return "\n".join(lines)


def _load(spec: str) -> dict:
    optimizers = {}
    for item in spec.split(","):
        name, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--optimizers takes name=path.npz entries, got {item!r}.")
        optimizer, meta_params, _ = learned.load_meta_params(path)
        optimizers[name] = (optimizer, meta_params)
    return optimizers


def _define_flags() -> None:
    flags.DEFINE_string(
        "optimizers", None, "name=path.npz,... of learned optimizers; default: the pretrained ones."
    )
    flags.DEFINE_integer("seeds", 3, "Initializations per task.", lower_bound=1)
    flags.DEFINE_list(
        "adam_grid", ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1"], "Adam rates."
    )
    flags.DEFINE_integer("meta_width", 32, "Widest network of meta-training.", lower_bound=1)
    flags.DEFINE_integer("meta_horizon", 200, "Meta-training unroll horizon.", lower_bound=2)
    flags.DEFINE_list("only", [], "Evaluate only the tasks whose label contains one of these.")


def main(argv: list[str]) -> None:
    del argv
    values = flags.FLAGS
    if values.optimizers:
        optimizers = _load(values.optimizers)
    else:
        optimizers = {name: learned.load_pretrained(name) for name in learned.PRETRAINED}
    suite = held_out_tasks(values.meta_width, values.meta_horizon)
    if values.only:
        suite = [t for t in suite if any(o in t.label for o in values.only)]
    rows = evaluate(optimizers, suite, values.seeds, [float(r) for r in values.adam_grid])
    print(markdown_table(rows))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
