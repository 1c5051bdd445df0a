"""The optimizer aliases read like optax's: a required learning rate first, the same names for
the same things, and a clear error for a name or position that changed."""

import inspect

import jax.numpy as jnp
import optax
import pytest

import metaopt
from metaopt import optimizers


def _aliases():
    """Every public ``<algo>`` that has a ``scale_by_<algo>`` core."""
    names = optimizers.__all__
    return [n for n in names if not n.startswith("scale_by_") and f"scale_by_{n}" in names]


# Wrappers of another optimizer: the learning rate is the base optimizer's.
_WRAPPERS = {"sam", "asam", "gam", "gradient_regularization"}


def test_the_alias_list_is_what_we_think():
    assert set(_aliases()) == _WRAPPERS | {"ademamix", "simplified_ademamix", "shampoo", "soap"}


@pytest.mark.parametrize("name", _aliases())
def test_the_first_argument_is_required(name):
    first, *_ = inspect.signature(getattr(metaopt, name)).parameters.values()
    expected = "base_optimizer" if name in _WRAPPERS else "learning_rate"
    assert first.name == expected
    assert first.default is inspect.Parameter.empty
    assert first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD


def test_shampoo_and_soap_share_names_and_order():
    shampoo = inspect.signature(metaopt.shampoo).parameters
    soap = inspect.signature(metaopt.soap).parameters
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    for parameters in (shampoo, soap):
        assert [p.name for p in parameters.values() if p.kind is positional] == [
            "learning_rate",
            "b1",
            "b2",
        ]
        assert "epsilon" not in parameters  # optax's eps (outside a root) / eps_root (inside)
    for name in ("b1", "b2", "weight_decay", "mask", "preconditioning_frequency", "blocking"):
        assert name in shampoo and name in soap, name
    # Weight decay is off unless asked for, as in every metaopt alias and optax.adam.
    for name in ("ademamix", "simplified_ademamix", "shampoo", "soap"):
        assert inspect.signature(getattr(metaopt, name)).parameters["weight_decay"].default == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: metaopt.shampoo(1e-3, epsilon=1e-12), "eps_root=1e-12"),
        (lambda: metaopt.scale_by_shampoo(epsilon=0.0), "eps_root=0.0"),
        (lambda: metaopt.soap(1e-3, 0.95, 0.95, 0.99), "shampoo_b2 and eps are keyword-only"),
        (lambda: metaopt.scale_by_soap(0.95, 0.95, 0.99), "shampoo_b2 and eps are keyword-only"),
        (lambda: metaopt.soap(), "learning_rate"),
    ],
)
def test_a_changed_argument_fails_with_its_new_form(make, message):
    with pytest.raises(TypeError, match=message):
        make()


def test_renamed_arguments_work_under_inject_hyperparams():
    tx = optax.inject_hyperparams(metaopt.shampoo)(learning_rate=0.1, eps_root=1e-10)
    assert float(tx.init(jnp.zeros((2, 2))).hyperparams["eps_root"]) == pytest.approx(1e-10)
    tx = optax.inject_hyperparams(metaopt.soap)(learning_rate=0.1, shampoo_b2=0.9)
    assert float(tx.init(jnp.zeros((2, 2))).hyperparams["shampoo_b2"]) == pytest.approx(0.9)
