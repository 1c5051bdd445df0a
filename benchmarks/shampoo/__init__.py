"""Shampoo and SOAP benchmarks: cost per step against Adam, and steps to a target loss.

Two kinds of measurement:

1. **Speed**, on an MLP (default about 4M float32 parameters) and on one pre-LN transformer block
   (embedding, causal self-attention, MLP, unembedding) over synthetic tokens. Every variant is
   one jitted training step (loss gradient, optimizer update, apply) with parameters and state
   donated, timed with :func:`benchmarks.harness.measure` in the same interleaved rounds as
   ``optax.adam`` and ``optax.adamw``:

   * *ordinary steps*, which compute no inverse root (Shampoo) or eigenbasis refresh (SOAP) but
     do apply the preconditioners; their compile times; and the optimizer update alone, from
     fixed gradients;
   * *amortized steps*: one jitted loop of ``root_every`` training steps whose last step
     recomputes Shampoo's roots (or, for SOAP, refreshes its bases every ``soap_refresh_every``
     steps), per step, against the same loop of Adam steps.

2. **Quality**: steps to reach a target loss, at each method's best learning rate of one grid,
   on a deep linear autoencoder of scikit-learn's digits (full batch; an ill-conditioned problem
   whose optimum is known in closed form from PCA) and on the transformer block learning a
   second-order Markov chain (minibatches; the target is set above the chain's own loss).
"""

from __future__ import annotations

from benchmarks import harness
from benchmarks.shampoo import quality, speed


def run_suite(settings: harness.Settings) -> str:
    """Runs the speed and quality benchmarks at the sizes given by the flags; returns markdown."""
    return "\n".join([*speed.run(settings), *quality.run()])
