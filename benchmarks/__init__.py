"""metaopt's benchmark suites (run with ``python -m benchmarks.run``)."""

import metaopt

# Shampoo and SOAP on several simulated CPU devices need XLA's scheduler flag (one device needs
# nothing); it also keeps child processes' OpenBLAS on one thread. Done here, when the package
# is imported and before any suite runs a JAX computation.
metaopt.prepare_cpu_environment()
