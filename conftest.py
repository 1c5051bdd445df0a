"""Test session set-up shared by tests/, doctests in metaopt/ and docs/.

The simulated 8-device CPU mesh must be configured before JAX is imported anywhere, so it is
set here, at the root, where pytest loads it first.
"""

import os

# The suite's time is mostly XLA:CPU compiling small programs; LLVM's optimizations of the
# generated kernels are most of that and buy nothing at test sizes. XLA's own HLO passes
# (fusion included) still run. The caller's XLA_FLAGS come after it, so a level set there wins.
os.environ["XLA_FLAGS"] = (
    "--xla_backend_optimization_level=0 "
    + os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

import metaopt

# Shampoo and SOAP on XLA:CPU: no deadlock-prone scheduler, one OpenBLAS thread (see the
# function's docstring). JAX has not started its backend yet, so the settings take effect.
metaopt.prepare_cpu_environment()

# Float64 is available for reference comparisons; tests that check float32/bfloat16 behaviour
# create their arrays with explicit dtypes.
jax.config.update("jax_enable_x64", True)
# Strict dtype promotion is not switched on: optax's own primitives (for example the bias
# correction ``decay ** count`` with an int32 count) are rejected by it. Dtype discipline is
# checked directly instead: the optimizer contract test asserts that bfloat16, float32 and
# float64 parameters keep their dtype through every transform.
