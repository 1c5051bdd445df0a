"""The example notebooks run end to end at a small size, and are committed with their outputs."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {EXAMPLES}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_with_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code), (
        f"{path.name} is committed unexecuted; run it (jupyter execute --inplace "
        f"{path.relative_to(EXAMPLES.parent)}) and commit the outputs."
    )
    images = [
        output
        for cell in code
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{path.name} shows no plot"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_at_the_small_size(path, monkeypatch, tmp_path):
    monkeypatch.setenv("METAOPT_EXAMPLE_SIZE", "small")
    # A plot cell may retrain what a table cell trained (learned_optimizer.ipynb): JAX's
    # persistent cache, in this test's own folder, compiles each program once.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    # A fresh kernel: one device, the CPU settings the library wants, no test-suite x64, and
    # the CPU backend without LLVM optimization (FAST_COMPILE, as in test_learned_lr_schedule):
    # at the small size the notebooks are mostly compilation.
    monkeypatch.setenv(
        "XLA_FLAGS",
        "--xla_cpu_enable_concurrency_optimized_scheduler=false --xla_backend_optimization_level=0",
    )
    monkeypatch.setenv("JAX_ENABLE_X64", "0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": EXAMPLES}}
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors
    assert os.environ["METAOPT_EXAMPLE_SIZE"] == "small"
