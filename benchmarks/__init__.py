"""metaopt's benchmark suites (run with ``python -m benchmarks.run``)."""

import metaopt

# Shampoo and SOAP on XLA:CPU need it (no deadlock-prone scheduler, one OpenBLAS thread). Done
# here, when the package is imported and before any suite runs a JAX computation.
metaopt.prepare_cpu_environment()
