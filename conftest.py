"""Test session set-up shared by tests/, doctests in metaopt/ and docs/.

The simulated 8-device CPU mesh must be configured before JAX is imported anywhere, so it is
set here, at the root, where pytest loads it first.
"""

import os

# The second flag avoids a deadlock of jaxlib 0.10's XLA:CPU in programs with several
# eigendecompositions (Shampoo, SOAP); see metaopt.optimizers._common.CPU_SCHEDULER_FLAG.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

# Float64 is available for reference comparisons; tests that check float32/bfloat16 behaviour
# create their arrays with explicit dtypes.
jax.config.update("jax_enable_x64", True)
# Strict dtype promotion is not switched on: optax's own primitives (for example the bias
# correction ``decay ** count`` with an int32 count) are rejected by it. Dtype discipline is
# checked directly instead: the optimizer contract test asserts that bfloat16, float32 and
# float64 parameters keep their dtype through every transform.
