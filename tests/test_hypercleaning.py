"""examples/hypercleaning.py at a tiny size: the learned weights find the corrupted labels."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import hypercleaning

TINY = hypercleaning.CleaningConfig(
    num_train=300,
    num_validation=100,
    outer_steps=60,
    inner_steps=20,
    eval_steps=500,
)


def test_f2sa_implicit_cg_and_slbamm_down_weight_the_corrupted_examples():
    # Measured (float64, seed 0, 150 of the 300 training labels corrupted):
    #   method        test accuracy  precision  recall  flagged (weight < 0.1)
    #   f2sa          86.1%          93.8%      80.0%   128
    #   implicit_cg   83.8%          90.7%      78.0%   129
    #   slbamm        90.3%          91.2%      89.3%   147
    #   no_weights    56.3%          -          0.0%    0
    methods = ("f2sa", "implicit_cg", "slbamm", "no_weights")
    results = hypercleaning.compare(TINY, methods, progress=False)
    baseline = results["no_weights"].test_accuracy
    assert 0.4 < baseline < 0.7
    for name in ("f2sa", "implicit_cg", "slbamm"):
        r = results[name]
        assert r.test_accuracy > baseline + 0.15, (name, r.test_accuracy, baseline)
        # Flagging at random would have precision 50%, and recall equal to the fraction flagged.
        assert r.precision > 0.8 and r.recall > 0.6, (name, r.precision, r.recall)
        assert r.warnings == 0 and r.step_seconds > 0
    # F2SA's estimate is within O(1/lambda) of the implicit hypergradient: the two methods end
    # with nearly the same weights (measured correlation 0.974).
    f2sa, cg = results["f2sa"].weights, results["implicit_cg"].weights
    assert np.corrcoef(f2sa, cg)[0, 1] > 0.95
    table = hypercleaning.markdown_table(results)
    assert table.count("\n") == 5 and "| no_weights | 56.3% | - | 0.0% | 0 |" in table


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown \\['cg'\\]"):
        hypercleaning.compare(TINY, ("cg",))


def test_the_script_runs_from_its_flags_and_prints_the_table():
    # The absl entry point (flags, main, the printed markdown table), at a size that only
    # checks the plumbing: 3 outer steps on 100 examples.
    command = [
        sys.executable,
        str(Path(hypercleaning.__file__)),
        "--methods=truncated,no_weights",
        "--num_train=100",
        "--num_validation=50",
        "--num_test=50",
        "--outer_steps=3",
        "--inner_steps=5",
        "--truncated_steps=2",
        "--eval_steps=20",
        "--progress=false",
    ]
    # The subprocess inherits the session's XLA_FLAGS (conftest.py: LLVM optimization off).
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ")[0] for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows == ["| method", "| ---", "| truncated", "| no_weights"]
    bad = subprocess.run(
        [*command[:2], "--methods=cg"], capture_output=True, text=True, check=False
    )
    assert bad.returncode != 0 and "unknown ['cg']" in bad.stderr
