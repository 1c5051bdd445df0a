"""metaopt's benchmark suites (run with ``python -m benchmarks.run``)."""

import os

# jaxlib 0.10's XLA:CPU can deadlock on Shampoo's and SOAP's root steps; this flag avoids it
# (see metaopt.optimizers._common.CPU_SCHEDULER_FLAG). Set here, before any suite imports JAX.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
