"""The example scripts run end to end at a tiny size."""

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_demo_runs_and_reports_every_optimizer(tmp_path):
    plot_path = tmp_path / "demo.png"
    command = [
        sys.executable,
        str(REPO_ROOT / "examples" / "demo.py"),
        "--epochs=2",
        "--hidden_width=32",
        f"--plot_path={plot_path}",
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"

    assert plot_path.stat().st_size > 1000
    assert plot_path.read_bytes().startswith(PNG_SIGNATURE)

    # Each optimizer has a table row: name, train loss, test accuracy, compile and train time.
    row = r"^{name}\s+(\S+)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)$"
    for name in ("AdamW", "AdEMAMix", r"SAM \(AdamW\)"):
        match = re.search(row.format(name=name), result.stdout, flags=re.MULTILINE)
        assert match, f"no table row for {name} in:\n{result.stdout}"
        loss, test_accuracy = float(match.group(1)), float(match.group(2))
        assert 0.0 < loss < 2.3  # below the loss of a uniform guess over ten classes
        assert 0.0 <= test_accuracy <= 100.0
