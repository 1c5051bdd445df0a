"""Smoke test of the benchmark harness: a tiny run writes the expected report section."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--suite=optimizers",
    "--ademamix_params=8192",
    "--sam_width=16",
    "--sam_inputs=8",
    "--sam_batch=16",
    "--repeats=3",
    "--warmup=1",
    "--compile_repeats=1",
    "--min_repeat_seconds=0.001",
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


def _run_harness(report: Path, *extra: str) -> str:
    """Runs the harness in a fresh interpreter (absl parses flags once), warnings fatal."""
    command = [sys.executable, "-W", "error", "-m", "benchmarks.run", *TINY, *extra]
    command.append(f"--output={report}")
    completed = subprocess.run(
        command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120
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
    """The leading value of a cell such as "1.02 [0.97–1.08]" or "55%"; all must be finite > 0."""
    values = [float(token.rstrip("%")) for token in re.split(r"[\s\[\]–]+", cell) if token]
    assert values and all(math.isfinite(v) and v > 0 for v in values), cell
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

    sam = _table(text, "step")
    assert list(sam) == SAM_ROWS
    assert [sam[name][0] for name in SAM_ROWS] == ["1", "2", "2", "2", "4", "2"]
    for cells in sam.values():
        for column in (2, 3, 4, 6, 8):  # the ratio columns
            _number(cells[column])
    assert sam["plain step: optax.sgd(momentum)"][2] == "0.50 [0.50–0.50]"
