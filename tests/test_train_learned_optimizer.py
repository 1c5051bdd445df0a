"""examples/train_learned_optimizer.py at a tiny size: on 8 simulated devices, resumed from an
Orbax checkpoint bit for bit, and the same meta-parameters as on one device."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

from metaopt import learned

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--meta_steps=4",
    "--horizon=4",
    "--truncation_length=2",
    "--num_task_configs=1",
    "--num_tasks=8",
    "--widths=8",
    "--depths=1",
    "--batch_sizes=16",
    "--datasets=blobs",
    "--hidden_size=4",
    "--checkpoint_every=2",
    "--progress=false",
]


def _run(tmp_path, name, *flags, devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    # The runs of one test compile the same programs: JAX's persistent cache (this test's
    # own folder) compiles each once. The executables are the same either way, so the
    # bit-for-bit comparisons below mean what they did.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    output = tmp_path / f"{name}.npz"
    command = [
        sys.executable,
        str(REPO_ROOT / "examples" / "train_learned_optimizer.py"),
        *TINY,
        f"--output={output}",
        *flags,
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert f"devices: {devices} (cpu)" in result.stdout
    return result.stdout, output


def _meta_params(path):
    return learned.load_meta_params(path)[1]


def test_meta_training_on_eight_devices_resumes_bit_for_bit(tmp_path):
    ckpt = tmp_path / "ckpt"
    _run(tmp_path, "first_half", f"--checkpoint_dir={ckpt}", "--stop_after=2", devices=8)
    assert (ckpt / "2").exists()
    stdout, resumed = _run(tmp_path, "resumed", f"--checkpoint_dir={ckpt}", devices=8)
    _, straight = _run(tmp_path, "straight", devices=8)

    match = re.search(
        r"meta-loss \(mean log training loss\): first (\S+) -> final ([^;\s]+)", stdout
    )
    assert match and all(np.isfinite(float(v)) for v in match.groups()), stdout
    for a, b in zip(_leaves(_meta_params(resumed)), _leaves(_meta_params(straight)), strict=True):
        np.testing.assert_array_equal(a, b)

    # One device: the same numbers up to float32 round-off in the mean over tasks, which Adam's
    # normalized meta-step amplifies: measured 8.6e-6 at most after 4 meta-steps of rate 3e-3;
    # a wrong split of the tasks would move the meta-parameters by whole steps (3e-3).
    _, single = _run(tmp_path, "single", devices=1)
    sharded, unsharded = _meta_params(straight), _meta_params(single)
    for a, b in zip(_leaves(sharded), _leaves(unsharded), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=3e-5)
    metadata = learned.load_meta_params(single)[2]
    assert metadata["seed"] == 0 and metadata["meta_steps"] == 4
    assert "--meta_steps=4" in metadata["command"]


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
