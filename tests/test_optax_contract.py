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

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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


# ----------------------------------------------------------------------------- with grad_fn
# The same properties for the sharpness-aware optimizers, whose update needs grad_fn. Radii and
# penalties are small so that the methods' minimizers lie within optax's tolerance (3e-2) of the
# unmodified loss's minimizer; the base optimizer is Adam at optax's learning rates.
SHARPNESS_AWARE = {
    "sam": lambda base, r: metaopt.sam(base, rho=r),
    "asam": lambda base, r: metaopt.asam(base, rho=r),
    "gam": lambda base, r: metaopt.gam(base, rho=r, alpha=0.1),
    "gradient_regularization": lambda base, r: metaopt.gradient_regularization(
        base, gamma=r, epsilon=r
    ),
}
RADIUS = 1e-3
TARGETS = {
    "parabola": optax_contract._setup_parabola,
    "rosenbrock": optax_contract._setup_rosenbrock,
    "matrix_parabola": optax_contract._setup_matrix_parabola,
    "mixed_tensor_target": optax_contract._setup_mixed_tensor_target,
}


def _sharpness_aware(name, learning_rate=1e-2, radius=RADIUS):
    return SHARPNESS_AWARE[name](optax.adam(learning_rate), radius)


def _squared_norm(x):
    return optax.tree.norm(x, squared=True)


@pytest.mark.parametrize("name", sorted(SHARPNESS_AWARE))
def test_sharpness_aware_accepts_extra_args_without_recompiling(name):
    opt = _sharpness_aware(name)
    initial, _, objective = optax_contract._setup_rosenbrock(jnp.float32)

    @jax.jit
    def step(params, state):
        grads = jax.grad(objective)(params)
        updates, state = opt.update(
            grads, state, params, grad_fn=jax.grad(objective), an_argument_it_does_not_expect=1
        )
        return optax.apply_updates(params, updates), state

    params, state = step(initial, opt.init(initial))
    with optax_contract.test_utils.log_compilations() as compilations:
        step(params, state)
    assert not compilations, "the update recompiles on its second call"


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("name", sorted(SHARPNESS_AWARE))
def test_sharpness_aware_tree_map_params_and_convergence(name, target):
    opt = _sharpness_aware(name)
    initial, final, objective = TARGETS[target](jnp.float32)
    grad_fn = jax.grad(objective)
    state = optax.tree.map_params(opt, lambda v: v, opt.init(initial))

    def step(carry, _):
        params, state = carry
        updates, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=30_000))((initial, state))
    optax_contract.test_utils.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", sorted(SHARPNESS_AWARE))
def test_sharpness_aware_inject_hyperparams_gives_the_same_step(name):
    factory = {
        "sam": (metaopt.sam, {"rho": 0.05}),
        "asam": (metaopt.asam, {"rho": 0.5, "eta": 0.01}),
        "gam": (metaopt.gam, {"rho": 0.05, "alpha": 0.1}),
        "gradient_regularization": (
            metaopt.gradient_regularization,
            {"gamma": 0.05, "epsilon": 0.05},
        ),
    }[name]
    function, hyperparameters = factory
    kwargs = {"base_optimizer": optax.adam(1e-3), **hyperparameters}
    opt = function(**kwargs)
    injected = optax.inject_hyperparams(function)(**kwargs)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
    grad_fn = jax.grad(_squared_norm)
    updates, state = jax.jit(functools.partial(opt.update, grad_fn=grad_fn))(
        grads, jax.jit(opt.init)(params), params
    )
    updates_injected, state_injected = jax.jit(functools.partial(injected.update, grad_fn=grad_fn))(
        grads, jax.jit(injected.init)(params), params
    )
    optax_contract.test_utils.assert_trees_all_close(updates_injected, updates, rtol=1e-5)
    optax_contract.test_utils.assert_trees_all_close(
        state_injected.inner_state, state, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", sorted(SHARPNESS_AWARE))
def test_sharpness_aware_preserves_dtype(name, dtype):
    opt = _sharpness_aware(name)
    params = jnp.array([1.0, 2.0], dtype=dtype)
    grad_fn = jax.grad(lambda x: jnp.sum(x**2))
    update = jax.jit(functools.partial(opt.update, grad_fn=grad_fn))
    updates, _ = update(grad_fn(params), jax.jit(opt.init)(params), params)
    assert updates.dtype == params.dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", sorted(SHARPNESS_AWARE))
def test_sharpness_aware_gradient_accumulation(name, dtype):
    opt = optax.MultiSteps(_sharpness_aware(name), every_k_schedule=4)
    params = jnp.array([1.0, 2.0], dtype=dtype)
    grad_fn = jax.grad(lambda x: jnp.sum(x**2))
    update = jax.jit(functools.partial(opt.update, grad_fn=grad_fn))
    updates, _ = update(grad_fn(params), jax.jit(opt.init)(params), params)
    optax_contract.test_utils.assert_trees_all_equal(updates, jnp.zeros_like(params))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", sorted(SHARPNESS_AWARE))
def test_sharpness_aware_state_dtype_is_stable(name, dtype):
    opt = _sharpness_aware(name)
    initial, _, objective = optax_contract._setup_parabola(dtype)
    grad_fn = jax.grad(objective)

    @jax.jit
    def step(params, state):
        # lax.cond fails to trace unless both branches give the same dtypes and shapes.
        take = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        updates, state = jax.lax.cond(
            take,
            lambda: opt.update(grad_fn(params), state, params, grad_fn=grad_fn),
            lambda: (params, state),
        )
        return optax.apply_updates(params, updates), state

    params, state = initial, opt.init(initial)
    for _ in range(2):
        params, new_state = step(params, state)
        assert params.dtype == dtype
        keep = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        state = jax.lax.cond(keep, lambda s=state: s, lambda s=new_state: s)


@pytest.mark.parametrize("name", sorted(SHARPNESS_AWARE))
def test_sharpness_aware_accepts_schedules(name):
    # optax checks a learning-rate schedule; these transforms take their radius or penalty as a
    # schedule too (the learning rate belongs to the base optimizer).
    initial, _, objective = optax_contract._setup_parabola(jnp.float32)
    grad_fn = jax.grad(objective)
    results = []
    for radius in (RADIUS, optax.constant_schedule(RADIUS)):
        opt = _sharpness_aware(name, learning_rate=1e-3, radius=radius)
        params, state = initial, opt.init(initial)
        for _ in range(10):
            updates, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
            params = optax.apply_updates(params, updates)
        results.append(params)
    optax_contract.test_utils.assert_trees_all_close(*results)
    assert np.max(np.abs(np.asarray(results[0] - initial))) > 1e-3
