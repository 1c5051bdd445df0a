"""Smoke test of the benchmark harness: a tiny run writes the expected report section."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--repeats=3", "--warmup=1", "--compile_repeats=1", "--min_repeat_seconds=0.001"]
TINY = [
    "--suite=optimizers",
    "--ademamix_params=8192",
    "--sam_width=16",
    "--sam_inputs=8",
    "--sam_batch=16",
    *SETTINGS,
]
TINY_IMPLICIT = [
    "--suite=implicit",
    "--ridge_features=16",
    "--ridge_samples=64",
    "--ridge_validation_samples=32",
    "--bilevel_features=8",
    "--bilevel_samples=32",
    "--bilevel_steps=3,30",
    *SETTINGS,
]
SAM_ROWS = [
    "plain step: optax.sgd(momentum)",
    "metaopt.sam",
    "optax.contrib.sam (opaque)",
    "metaopt.asam",
    "metaopt.gam",
    "metaopt.gradient_regularization",
]
INTRO = "# Benchmarks\n\nHand-written introduction that the generator must keep.\n\n"
OTHER_SECTION = (
    "<!-- BEGIN GENERATED: shampoo -->\nshampoo table\n<!-- END GENERATED: shampoo -->\n"
)


def _run_harness(report: Path, *extra: str, arguments: list[str] = TINY) -> str:
    """Runs the harness in a fresh interpreter (absl parses flags once), warnings fatal."""
    command = [sys.executable, "-W", "error", "-m", "benchmarks.run", *arguments, *extra]
    command.append(f"--output={report}")
    # The timeout only guards against a hang: the tiny Shampoo run takes 75 s alone on two
    # cores and about twice that beside the rest of the suite.
    completed = subprocess.run(
        command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return report.read_text()


def _table(text: str, first_header: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose first header cell is ``first_header``, by first cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _number(cell: str) -> float:
    """The leading value of a cell such as "1.02 [0.97–1.08]" or "55%": finite and > 0.

    The bounds of an interval must be finite and >= 0: printed with two decimals, a bootstrap
    bound of a ratio measured at a tiny size on a loaded machine can read 0.00.
    """
    values = [float(token.rstrip("%")) for token in re.split(r"[\s\[\]–]+", cell) if token]
    assert values and all(math.isfinite(v) and v >= 0 for v in values), cell
    assert values[0] > 0, cell
    return values[0]


@pytest.mark.parametrize("shard", [False, True], ids=["one_device", "sharded"])
def test_tiny_run_writes_report_section(tmp_path, shard):
    report = tmp_path / "benchmarks.md"
    stale = "<!-- BEGIN GENERATED: optimizers -->\nstale\n<!-- END GENERATED: optimizers -->\n"
    report.write_text(INTRO + stale + "\n" + OTHER_SECTION)
    text = _run_harness(report, *(["--shard"] if shard else []))

    # Only the optimizers section is replaced; the introduction and other suites survive.
    assert text.startswith(INTRO)
    assert "stale" not in text
    assert text.count("<!-- BEGIN GENERATED: optimizers -->") == 1
    assert text.rstrip().endswith(OTHER_SECTION.rstrip())
    assert "python -m benchmarks.run --suite=optimizers --ademamix_params=8192" in text
    assert "Date: " in text
    machine = _table(text, "machine")
    for key in ["jax / jaxlib", "backend", "device kind", "device count (local)", "CPU count"]:
        assert key in machine
    assert ("sharded over 8 devices" in text) == shard

    ademamix = _table(text, "AdEMAMix step")
    for label in [
        "step time, ms: median (IQR)",
        "compile time, s",
        "XLA peak buffers",
        "fraction of copy bandwidth",
    ]:
        _number(ademamix[label][2])  # the ratio column
    assert _number(ademamix["fraction of copy bandwidth"][0]) > 0
    # The report explains XLA:CPU's one kernel per output (m1, m2, nu, parameter): keep it true.
    kernels = ademamix["XLA kernels writing parameter-sized arrays, per leaf"]
    assert kernels[:3] == ["4", "4", "1.00"], kernels

    sam = _table(text, "step")
    assert list(sam) == SAM_ROWS
    assert [sam[name][0] for name in SAM_ROWS] == ["1", "2", "2", "2", "4", "2"]
    for cells in sam.values():
        for column in (2, 3, 4, 6, 8):  # the ratio columns
            _number(cells[column])
    assert sam["plain step: optax.sgd(momentum)"][2] == "0.50 [0.50–0.50]"


IMPLICIT_ROWS = [
    "metaopt custom_root + CG",
    'metaopt, on_failure="ignore"',
    "metaopt custom_root + reused Cholesky factor",
    "metaopt, reused factor, check=True",
    "jaxopt custom_root + solve_cg",
    "closed form: autodiff of jnp.linalg.solve",
    "forward only (Cholesky)",
]
DIFF_NAMES = ["Unrolled()", "Unrolled(checkpoint=True)", "Implicit(CG)"]


def _error(cell: str) -> float:
    value = float(cell)
    assert math.isfinite(value) and value >= 0, cell
    return value


def _median(cell: str) -> float:
    """The median of a time cell such as "0.314 (0.31–0.326)", which must be finite > 0."""
    value = float(cell.split()[0])
    assert math.isfinite(value) and value > 0, cell
    return value


def _kib(cell: str) -> float:
    value, unit = cell.split()
    return float(value) * {"B": 1 / 1024, "KiB": 1, "MiB": 1024, "GiB": 1024**2}[unit]


def test_tiny_implicit_run_writes_its_own_section(tmp_path):
    report = tmp_path / "benchmarks.md"
    optimizers = OTHER_SECTION.replace("shampoo", "optimizers")
    report.write_text(INTRO + optimizers)
    text = _run_harness(report, arguments=TINY_IMPLICIT)

    # The new section is appended; the introduction and the optimizers section are untouched.
    assert text.startswith(INTRO + optimizers)
    assert text.count("<!-- BEGIN GENERATED: implicit -->") == 1
    assert text.rstrip().endswith("<!-- END GENERATED: implicit -->")
    assert "python -m benchmarks.run --suite=implicit --ridge_features=16" in text

    ridge = _table(text, "hypergradient")
    assert list(ridge) == IMPLICIT_ROWS
    for name in IMPLICIT_ROWS:
        _median(ridge[name][0])
        _number(ridge[name][1])  # ratio to jaxopt
    assert ridge["jaxopt custom_root + solve_cg"][1] == "1.00 [1.00–1.00]"
    for name in IMPLICIT_ROWS[:5]:
        # The ratio of the differentiation parts (time minus the forward-only time): at this
        # tiny size the difference is within timing noise and may come out negative, so only
        # its being a number is checked.
        cell = ridge[name][3]
        values = [float(t) for t in re.split(r"[\s\[\]–]+", cell) if t]
        assert values and all(math.isfinite(v) for v in values), cell
    # Same CG recurrence, budget and tolerance (1e-5): both implicit derivatives agree with the
    # float64 closed form to about the tolerance times the condition number, and so do the
    # reused Cholesky factor and the float32 closed form.
    for name in IMPLICIT_ROWS[:6]:
        assert _error(ridge[name][5]) < 1e-3, (name, ridge[name][5])
    assert _error(ridge["closed form: autodiff of jnp.linalg.solve"][4]) == 0
    assert text.count('on_failure="warn" ÷ on_failure="ignore" = ') == 1
    assert text.count("Reusing the forward Cholesky factor: ÷ jaxopt = ") == 1

    # One row per (k, diff), k = 3 then 30; the table is keyed by its first cell, k.
    lines = text.splitlines()
    rows = [line.split("|")[1:-1] for k in (3, 30) for line in lines if line.startswith(f"| {k} |")]
    assert [cells[1].strip() for cells in rows] == DIFF_NAMES * 2
    for cells in rows:
        _median(cells[2])
        _number(cells[3])  # ratio to Implicit(CG)
        _error(cells[6])  # error against the exact hypergradient
    memory = _table(text, "XLA temporaries")
    assert list(memory) == DIFF_NAMES
    unrolled, implicit = memory["Unrolled()"], memory["Implicit(CG)"]
    # Unrolling stores every step: its temporaries grow with k; the implicit ones do not.
    assert _kib(unrolled[1]) > _kib(unrolled[0])
    assert _kib(implicit[1]) == _kib(implicit[0])
    assert _number(unrolled[2]) > 1


TINY_SHAMPOO = [
    "--suite=shampoo",
    "--shampoo_speed_models=transformer",
    "--shampoo_block_sizes=16",
    "--shampoo_d_model=16",
    "--shampoo_heads=2",
    "--shampoo_seq_len=8",
    "--shampoo_vocab=16",
    "--shampoo_batch=2",
    "--shampoo_root_every=4",
    "--shampoo_learning_rates=1e-2",
    "--shampoo_digits_hidden=8",
    "--shampoo_digits_steps=10",
    "--shampoo_markov_vocab=8",
    "--shampoo_markov_seq_len=8",
    "--shampoo_markov_d_model=8",
    "--shampoo_markov_heads=2",
    "--shampoo_markov_batch=4",
    "--shampoo_markov_steps=10",
    "--shampoo_markov_eval_every=5",
    *SETTINGS,
]
SHAMPOO_STEPS = [
    "gradient + SGD apply (no optimizer state)",
    "optax.adam",
    "optax.adamw",
    "metaopt.shampoo, block 16",
    "metaopt.soap, block 16",
    "metaopt.shampoo root step, block 16",
]
QUALITY_METHODS = [
    "optax.adam",
    "optax.adamw",
    "metaopt.shampoo (Adam grafting, roots every 10)",
    "metaopt.soap (bases refreshed every 10)",
]
PLOTS = ["shampoo_digits_autoencoder.png", "shampoo_markov_transformer.png"]


def test_tiny_shampoo_run_writes_its_section_and_plots(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text(INTRO + OTHER_SECTION.replace("shampoo", "implicit"))
    plots = tmp_path / "plots"
    text = _run_harness(report, f"--shampoo_plot_dir={plots}", arguments=TINY_SHAMPOO)

    assert text.startswith(INTRO + OTHER_SECTION.replace("shampoo", "implicit"))
    assert text.count("<!-- BEGIN GENERATED: shampoo -->") == 1
    assert text.rstrip().endswith("<!-- END GENERATED: shampoo -->")
    assert "python -m benchmarks.run --suite=shampoo --shampoo_speed_models=transformer" in text

    steps = _table(text, "step")
    assert list(steps) == SHAMPOO_STEPS
    for name, cells in steps.items():
        _median(cells[0])
        _number(cells[1])  # step time ÷ Adam's
        _number(cells[6])  # compile time ÷ Adam's
        if name not in (SHAMPOO_STEPS[0], SHAMPOO_STEPS[-1]):  # the root step: training only
            _number(cells[4])  # the update alone ÷ Adam's
    assert steps["optax.adam"][1] == "1.00 [1.00–1.00]"
    for name in ("metaopt.shampoo, block 16", "metaopt.shampoo root step, block 16"):
        assert steps[name][2].split(":")[1].strip() in (
            "met",
            "**missed**",
            "**missed** (within noise)",
        )
    # FLOP rates: the gradient step against Shampoo's block matmuls alone, in the same rounds.
    rates = _table(text, "computation")
    assert list(rates) == [SHAMPOO_STEPS[0], "Shampoo's block matmuls, block 16"]
    for cells in rates.values():
        _median(cells[1])
    loops = _table(text, "loop of 4 steps")
    assert list(loops) == ["optax.adam", "metaopt.shampoo, block 16", "metaopt.soap, block 16"]
    for cells in loops.values():
        _number(cells[1])  # per step, ms
        _number(cells[2])  # ÷ Adam's loop

    # One best-rate table and one grid per problem, each with every method; plots beside them.
    digits, markov = text.split("#### ")[1:3]
    for part, plot in zip((digits, markov), PLOTS, strict=True):
        best = _table(part, "method")
        assert list(best) == QUALITY_METHODS
        for cells in best.values():
            assert float(cells[0]) == 1e-2  # the only learning rate of the grid
            assert math.isfinite(float(cells[3]))  # final loss
        assert list(_table(part, "steps to target (final loss)")) == QUALITY_METHODS
        assert f"](_static/{plot})" in part
        assert (plots / plot).read_bytes().startswith(b"\x89PNG")


TINY_META = [
    "--suite=meta",
    "--meta_inner_steps=2",
    "--meta_tasks=3",
    "--meta_shots=4",
    "--meta_hidden=8",
    *SETTINGS,
]
META_NAMES = [
    "MAML (unrolled)",
    "hand-written MAML (jax.jit + vmap + lax.scan)",
    "MAML, checkpoint=True",
    "FOMAML",
    'metaopt iMAML, on_failure="ignore"',
    'metaopt iMAML, default on_failure="warn"',
    "jaxopt iMAML (GradientDescent + solve_cg)",
    "optimistix iMAML (GradientDescent + ImplicitAdjoint(CG))",
]


def test_tiny_meta_run_writes_its_own_section(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text(INTRO + OTHER_SECTION)
    text = _run_harness(report, arguments=TINY_META)

    assert text.startswith(INTRO + OTHER_SECTION)
    assert text.count("<!-- BEGIN GENERATED: meta -->") == 1
    assert text.rstrip().endswith("<!-- END GENERATED: meta -->")
    assert "python -m benchmarks.run --suite=meta --meta_inner_steps=2" in text

    # One row per variant (k = 2 only, to keep the test short); every library ran.
    lines = text.splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| 2 |")]
    assert [cells[1].strip() for cells in rows] == META_NAMES
    for cells in rows:
        _median(cells[2])
        _number(cells[3])  # ratio to metaopt iMAML
        _kib(cells[6])  # XLA temporaries
    by_name = {(cells[0].strip(), cells[1].strip()): cells for cells in rows}
    for k in ("2",):
        assert by_name[k, META_NAMES[4]][3].strip() == "1.00 [1.00–1.00]"
        # Same inner iterates and the same CG: the meta-gradients agree to float32 rounding.
        for name in META_NAMES[1:3] + META_NAMES[5:]:
            assert _error(by_name[k, name][4].split()[0]) < 1e-3, (k, name, by_name[k, name][4])
    assert text.count("metaopt iMAML ÷ jaxopt iMAML = ") == 1
    # The targets of the default check and of MAML's overhead, one verdict each.
    assert text.count('on_failure="warn" ÷ on_failure="ignore" = ') == 1
    assert text.count("MAML ÷ hand-written MAML = ") == 1
    assert "checkpoint=True ÷ unrolled MAML = " in text
    assert list(_table(text, "XLA temporaries")) == META_NAMES


TINY_LEARNED = [
    "--suite=learned",
    "--learned_speed_models=mlp",
    "--learned_mlp_inputs=8",
    "--learned_mlp_width=16",
    "--learned_mlp_depth=1",
    "--learned_mlp_batch=4",
    "--learned_networks=16x1,8x1",
    "--learned_task_hidden=4",
    "--learned_task_batch=4",
    "--learned_num_tasks=8",
    "--learned_truncation_length=2",
    "--learned_horizon=4",
    *SETTINGS,
]
LEARNED_STEPS = [
    "gradient + SGD apply (no optimizer state)",
    "optax.adam",
    "learned 16x1 (default)",
    "learned 8x1",
]


def test_tiny_learned_run_writes_its_own_section(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text(INTRO + OTHER_SECTION)
    text = _run_harness(report, arguments=TINY_LEARNED)

    assert text.startswith(INTRO + OTHER_SECTION)
    assert text.count("<!-- BEGIN GENERATED: learned -->") == 1
    assert text.rstrip().endswith("<!-- END GENERATED: learned -->")
    assert "python -m benchmarks.run --suite=learned --learned_speed_models=mlp" in text

    steps = _table(text, "step")
    assert list(steps) == LEARNED_STEPS
    for name, cells in steps.items():
        _median(cells[0])
        _number(cells[1])  # step time ÷ Adam's
        _number(cells[6])  # compile time ÷ Adam's
        if name != LEARNED_STEPS[0]:
            _number(cells[4])  # the update alone ÷ Adam's
    assert steps["optax.adam"][1] == "1.00 [1.00–1.00]"
    assert steps["learned 16x1 (default)"][2].split(":")[1].strip() in (
        "met",
        "**missed**",
        "**missed** (within noise)",
    )
    # Adam keeps two moments (8 bytes per float32 parameter and a step counter); the learned
    # optimizer three momenta and a second moment (16) plus its factored statistics.
    assert 8 < float(steps["optax.adam"][7]) < 9
    assert float(steps["learned 8x1"][7]) > 16
    for name in LEARNED_STEPS[1:]:
        assert float(steps[name][10]) > 0  # bytes accessed per parameter by the update
    assert "Where the update's time goes" in text

    gradients = _table(text, "meta-gradient")
    assert list(gradients) == ["`TruncatedBackprop`", "`AntitheticES`", "`PES`"]
    for cells in gradients.values():
        _median(cells[1])
        _number(cells[2])  # ÷ truncated backprop
    throughput = _table(text, "PES meta-training step")
    assert list(throughput) == [
        "1 device (this process)",
        "child process: 1 device",
        "child process: 8 devices, tasks sharded",
    ]
    for cells in throughput.values():
        _median(cells[0])
        assert float(cells[1].replace(",", "")) > 0  # task-steps per second
    _number(throughput["child process: 8 devices, tasks sharded"][4])  # the speed-up


TINY_BILEVEL = [
    "--suite=bilevel",
    "--cleaning_methods=f2sa,implicit_cg,unrolled",
    "--cleaning_l2=1e-2",
    "--cleaning_num_train=100",
    "--cleaning_num_validation=50",
    "--cleaning_inner_steps=5",
    "--cleaning_time_budget=0.3",
    "--cleaning_seeds=0",
    "--cleaning_eval_steps=100",
    "--cleaning_memory_steps=5,20",
    "--bilevel_applications=",
    *SETTINGS,
]


def test_tiny_bilevel_run_writes_its_own_section(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text(INTRO + OTHER_SECTION)
    text = _run_harness(report, arguments=TINY_BILEVEL)

    assert text.startswith(INTRO + OTHER_SECTION)
    assert text.count("<!-- BEGIN GENERATED: bilevel -->") == 1
    assert "python -m benchmarks.run --suite=bilevel --cleaning_methods=f2sa" in text
    # Time per outer step: one row per method, CG is the unit.
    lines = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| 0.01 (")]
    times = {cells[1].strip(): cells for cells in lines}
    assert list(times) == ["f2sa", "implicit_cg", "unrolled", "(the inner solve alone: 5 steps)"]
    assert times["implicit_cg"][3].strip() == "1.00 [1.00–1.00]"
    for cells in times.values():
        _number(cells[3])
    assert text.count("F2SA ÷ CG = ") == 1 and text.count("F2SA − CG = ") == 1
    # Accuracy after the budget: every method's weights beat the unweighted baseline (measured
    # with 5 inner steps and 0.2 s: 71-83% against 37%).
    budget = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| 0.01 |")]
    accuracy = {cells[1].strip(): float(cells[3].split("%")[0]) for cells in budget}
    assert set(accuracy) == {"f2sa", "implicit_cg", "unrolled", "no_weights"}
    for method in ("f2sa", "implicit_cg", "unrolled"):
        assert accuracy[method] > accuracy["no_weights"] + 10, accuracy
    # Memory: unrolled backprop stores every iterate, F2SA and implicit CG do not.
    memory = _table(text, "method")
    assert _kib(memory["unrolled"][1]) > 1.5 * _kib(memory["unrolled"][0])
    for method in ("f2sa", "implicit_cg"):
        assert memory[method][0] == memory[method][1], memory[method]


ACCELERATOR = ROOT / "benchmarks" / "accelerator.sh"
SECTION = re.compile(r"<!-- BEGIN GENERATED: (.+?) -->\n(.*?)\n<!-- END GENERATED: \1 -->", re.S)


def _accelerator(*arguments: str) -> None:
    completed = subprocess.run(
        ["bash", str(ACCELERATOR), *arguments],
        cwd=ROOT,
        env=dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="error"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


def test_accelerator_script_writes_its_sections_beside_the_cpu_ones(tmp_path):
    device_report = tmp_path / "device.md"
    device_report.write_text(INTRO + OTHER_SECTION)
    # Every suite's tiny flags are parsed and validated, but only the fastest suite runs: all
    # six take minutes even at the tiny sizes (compilation), and each has its own tiny test.
    _accelerator("--tiny", f"--output={device_report}", "--suite=optimizers")

    # The CPU section is left as it was; the suite adds its own "(accelerator)" section.
    assert device_report.read_text().startswith(INTRO + OTHER_SECTION)
    sections = dict(SECTION.findall(device_report.read_text()))
    names = ["optimizers (accelerator)"]
    assert list(sections) == ["shampoo", *names]
    for name in names:
        body = sections[name]
        assert body.startswith(f"## {name}\n"), body[:200]
        assert "This suite failed" not in body, body
        assert "'--section_suffix= (accelerator)'" in body
        assert _table(body, "machine")["device kind"]
        assert re.search(r"This suite ran in \d+ s", body)

    # --merge brings the device's sections into this machine's report, keeping its own.
    report = tmp_path / "benchmarks.md"
    cpu_section = OTHER_SECTION.replace("shampoo table", "CPU shampoo table")
    report.write_text(INTRO + cpu_section)
    _accelerator("--merge", str(device_report), f"--output={report}")
    assert report.read_text().startswith(INTRO + cpu_section)
    merged = dict(SECTION.findall(report.read_text()))
    assert merged == {**sections, "shampoo": "CPU shampoo table"}
