"""The example scripts run end to end at a tiny size."""

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_example(script: str, plot_path: Path, *flags: str) -> str:
    """Runs ``examples/<script>``; checks the exit code and the PNG; returns the output."""
    command = [sys.executable, str(REPO_ROOT / "examples" / script), *flags]
    command.append(f"--plot_path={plot_path}")
    # The subprocess inherits the session's XLA_FLAGS (conftest.py: LLVM optimization off,
    # which compiles these tiny runs in two thirds of the time; the demo prints the same
    # numbers).
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert plot_path.stat().st_size > 1000
    assert plot_path.read_bytes().startswith(PNG_SIGNATURE)
    return result.stdout


def _validation_mse_before_and_after(stdout: str) -> tuple[float, float]:
    match = re.search(r"validation MSE: ([\d.]+) before tuning -> ([\d.]+) after", stdout, re.I)
    assert match, f"no validation MSE line in:\n{stdout}"
    return float(match.group(1)), float(match.group(2))


def test_demo_runs_and_reports_every_optimizer(tmp_path):
    stdout = _run_example(
        "demo.py",
        tmp_path / "demo.png",
        "--epochs=2",
        "--hidden_width=32",
        "--tuning_steps=20",
        "--meta_steps=50",
    )

    # Each optimizer has a table row: name, train loss, test accuracy, compile and train time.
    row = r"^{name}\s+(\S+)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)$"
    for name in ("AdamW", "AdEMAMix", r"SAM \(AdamW\)"):
        match = re.search(row.format(name=name), stdout, flags=re.MULTILINE)
        assert match, f"no table row for {name} in:\n{stdout}"
        loss, test_accuracy = float(match.group(1)), float(match.group(2))
        assert 0.0 < loss < 2.3  # below the loss of a uniform guess over ten classes
        assert 0.0 <= test_accuracy <= 100.0

    # The hyperparameter-tuning section ran and lowered the validation loss.
    before, after = _validation_mse_before_and_after(stdout)
    assert 0.0 < after < before

    # The meta-learning section reports both learners' query error after adaptation.
    match = re.search(r"MAML ([\d.]+), network trained on all tasks ([\d.]+)", stdout)
    assert match, f"no meta-learning line in:\n{stdout}"
    assert all(0.0 < float(value) < 1e3 for value in match.groups())

    # The learned-optimizer section trains the unseen breast-cancer task with both optimizers.
    for name in (r"AdamW \(lr [\d.e-]+\)", r"learned \(pretrained\)"):
        match = re.search(rf"^{name}\s+(\S+)\s+([\d.]+)%$", stdout, flags=re.MULTILINE)
        assert match, f"no learned-optimizer row for {name} in:\n{stdout}"
        assert 0.0 < float(match.group(1)) < 0.69  # below log 2, a uniform guess
        assert 50.0 <= float(match.group(2)) <= 100.0


def test_hyperparameter_tuning_lowers_the_validation_loss(tmp_path):
    stdout = _run_example(
        "hyperparameter_tuning.py",
        tmp_path / "tuning.png",
        "--outer_steps=40",
        "--grid_size=3",
        "--print_every=10",
    )

    before, after = _validation_mse_before_and_after(stdout)
    assert 0.0 < after < before
    # The summary scores all three choices of penalty: validation MSE, test MSE, test R2.
    for label in ("no penalty", r"shared \S+ \(grid best\)", r"per-feature \(tuned\)"):
        row = rf"^{label}\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)\s+\d+\s+"
        assert re.search(row, stdout, flags=re.MULTILINE), f"no row {label!r}"
    # The first hypergradient agrees with the closed-form ridge solution (float32, inner
    # solve to gradient norm 1e-5).
    match = re.search(r"closed-form ridge solution: relative error (\S+)\.$", stdout, re.M)
    assert match and float(match.group(1)) < 1e-2, stdout
