"""Every metaopt transform, registered once for the shared optimizer contract test.

A new optimizer joins the contract by adding one ``Entry`` here. ``make(learning_rate, key)``
builds the transform from the learning rate and the method's own key hyperparameter, both of
which may be traced arrays; ``inject`` builds the same transform through
``optax.inject_hyperparams``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import metaopt
import metaopt.learned


@dataclasses.dataclass(frozen=True)
class Entry:
    """One optimizer configuration in the contract.

    Attributes:
      name: test id.
      make: ``(learning_rate, key_value) -> transform``.
      inject: ``(learning_rate, key_value) -> transform`` built with ``inject_hyperparams``.
      key: name of the method's key hyperparameter (differentiated in the contract).
      key_value: its value in the contract runs.
      adaptive: True for Adam-like methods (picks the learning rates of the convergence runs).
      grad_evaluations: gradient evaluations per step, including the caller's own.
      convergence_key_value: the key hyperparameter in the convergence runs, where a smaller
        radius or penalty lets the methods reach the minimizer of the unmodified loss.
      inject_ulps: 0 when ``inject`` must reproduce ``make`` bit for bit; otherwise the
        float64 round-off allowed (for example XLA fuses GAM's chained products of constants
        differently from products of traced scalars, a difference of one unit in the last
        place).
      nonfinite: what a NaN or inf in the gradient does, as documented: ``"skips"`` (the step
        is skipped: zero update, the state stays finite and the next clean step proceeds) or
        ``"propagates"`` (every leaf whose gradient held the non-finite value gets a
        non-finite update, so the failure is visible; ``optax.apply_if_finite`` skips it).
      huge_gradient: a gradient entry of 1e30 in float32. ``"exact"``: the update equals the
        float64 update of the same transform (rtol 1e-5). ``"second_moment_overflows"``: the
        method squares gradient entries into float32 state, which overflows above about
        1.8e19 (as in ``optax.adam``); only "no crash, parameters stay finite" is required.
        ``"scale_dependent"``: gradient regularization steps ``epsilon * g`` away from the
        parameters by design (see its page); only "no crash" is required.
      sharded_rtol: relative tolerance of sharded against unsharded parameters (float64).
    """

    name: str
    make: Callable[..., optax.GradientTransformation]
    inject: Callable[..., optax.GradientTransformation]
    key: str
    key_value: float
    adaptive: bool
    grad_evaluations: int = 1
    convergence_key_value: float | None = None
    inject_ulps: int = 0
    nonfinite: str = "propagates"
    huge_gradient: str = "exact"
    sharded_rtol: float = 1e-12


def _momentum(learning_rate):
    return optax.sgd(learning_rate, momentum=0.9)


ENTRIES = [
    Entry(
        name="ademamix",
        huge_gradient="second_moment_overflows",
        make=lambda lr, a: metaopt.ademamix(lr, b3=0.999, alpha=a, weight_decay=1e-4),
        inject=lambda lr, a: optax.inject_hyperparams(metaopt.ademamix)(
            learning_rate=lr, b3=0.999, alpha=a, weight_decay=1e-4
        ),
        key="alpha",
        key_value=2.0,
        adaptive=True,
    ),
    Entry(
        name="ademamix_warmups",
        huge_gradient="second_moment_overflows",
        make=lambda lr, a: metaopt.ademamix(
            lr, b3=0.999, alpha=a, alpha_warmup_steps=500, b3_warmup_steps=500
        ),
        inject=lambda lr, a: optax.inject_hyperparams(metaopt.ademamix)(
            learning_rate=lr, b3=0.999, alpha=a, alpha_warmup_steps=500, b3_warmup_steps=500
        ),
        key="alpha",
        key_value=2.0,
        adaptive=True,
    ),
    Entry(
        name="simplified_ademamix",
        huge_gradient="second_moment_overflows",
        make=lambda lr, a: metaopt.simplified_ademamix(lr * 0.1, b1=0.9, b2=0.99, alpha=a),
        inject=lambda lr, a: optax.inject_hyperparams(metaopt.simplified_ademamix)(
            learning_rate=lr * 0.1, b1=0.9, b2=0.99, alpha=a
        ),
        key="alpha",
        key_value=1.0,
        adaptive=True,
    ),
    Entry(
        name="sam",
        make=lambda lr, rho: metaopt.sam(_momentum(lr), rho),
        inject=lambda lr, rho: optax.inject_hyperparams(metaopt.sam)(
            base_optimizer=_momentum(lr), rho=rho
        ),
        key="rho",
        key_value=0.02,
        convergence_key_value=0.005,
        adaptive=False,
        grad_evaluations=2,
    ),
    Entry(
        name="sam_over_adamw",
        huge_gradient="second_moment_overflows",
        make=lambda lr, rho: metaopt.sam(optax.adamw(lr, weight_decay=1e-4), rho),
        inject=lambda lr, rho: optax.inject_hyperparams(metaopt.sam)(
            base_optimizer=optax.adamw(lr, weight_decay=1e-4), rho=rho
        ),
        key="rho",
        key_value=0.02,
        convergence_key_value=0.005,
        adaptive=True,
        grad_evaluations=2,
    ),
    Entry(
        name="asam",
        make=lambda lr, rho: metaopt.asam(_momentum(lr), rho, eta=0.01),
        inject=lambda lr, rho: optax.inject_hyperparams(metaopt.asam)(
            base_optimizer=_momentum(lr), rho=rho, eta=0.01
        ),
        key="rho",
        key_value=0.05,
        convergence_key_value=0.01,
        adaptive=False,
        grad_evaluations=2,
    ),
    Entry(
        name="gam",
        make=lambda lr, alpha: metaopt.gam(_momentum(lr), rho=0.02, alpha=alpha),
        inject=lambda lr, alpha: optax.inject_hyperparams(metaopt.gam)(
            base_optimizer=_momentum(lr), rho=0.02, alpha=alpha
        ),
        key="alpha",
        key_value=0.1,
        adaptive=False,
        grad_evaluations=4,
        inject_ulps=4,
    ),
    Entry(
        name="gradient_regularization",
        huge_gradient="scale_dependent",
        make=lambda lr, gamma: metaopt.gradient_regularization(_momentum(lr), gamma, 1e-3),
        inject=lambda lr, gamma: optax.inject_hyperparams(metaopt.gradient_regularization)(
            base_optimizer=_momentum(lr), gamma=gamma, epsilon=1e-3
        ),
        key="gamma",
        key_value=0.02,
        convergence_key_value=1e-4,
        adaptive=False,
        grad_evaluations=2,
    ),
    Entry(
        name="gradient_regularization_normalized",
        huge_gradient="scale_dependent",
        make=lambda lr, gamma: metaopt.gradient_regularization(
            _momentum(lr), gamma, 0.01, direction="central", normalize=True
        ),
        inject=lambda lr, gamma: optax.inject_hyperparams(
            metaopt.gradient_regularization, static_args=("direction", "normalize")
        )(
            base_optimizer=_momentum(lr),
            gamma=gamma,
            epsilon=0.01,
            direction="central",
            normalize=True,
        ),
        key="gamma",
        key_value=0.02,
        convergence_key_value=1e-4,
        adaptive=False,
        grad_evaluations=3,
    ),
]

# Shampoo with roots from step 2 and every 3 steps, so the contract's 5- to 20-step runs use
# (and differentiate through) several roots; the key hyperparameter is the damping, which
# exercises the root's derivative with respect to its shift.
_SHAMPOO_STRUCTURE = {
    "preconditioning_frequency": 3,
    "start_preconditioning_step": 2,
}
_SHAMPOO_STATIC = (
    "preconditioning_frequency",
    "start_preconditioning_step",
    "blocking",
    "grafting",
)

ENTRIES += [
    Entry(
        name="shampoo",
        nonfinite="skips",
        huge_gradient="second_moment_overflows",
        make=lambda lr, damping: metaopt.shampoo(
            lr, damping=damping, weight_decay=1e-4, **_SHAMPOO_STRUCTURE
        ),
        inject=lambda lr, damping: optax.inject_hyperparams(metaopt.shampoo)(
            learning_rate=lr, damping=damping, weight_decay=1e-4, **_SHAMPOO_STRUCTURE
        ),
        key="damping",
        key_value=1e-2,
        adaptive=True,
        # Without a conditional around the step (a non-finite step is skipped by selects, which
        # saves half an Adam step on a 4M-parameter MLP), XLA fuses the Gram-matrix update with
        # a constant rate differently from one with a traced rate: the statistics differ in the
        # last bit after two steps, 1.2e-14 relative after 20 (55 ulp).
        inject_ulps=64,
    ),
    Entry(
        # Blocks of 4 with padding (the contract's MLP has 16-long axes and a [16, 8] matrix),
        # SGD grafting and Nesterov momentum.
        name="shampoo_blocked",
        nonfinite="skips",
        huge_gradient="second_moment_overflows",
        make=lambda lr, damping: metaopt.shampoo(
            lr,
            damping=damping,
            nesterov=True,
            blocking=metaopt.Blocking(block_size=4),
            grafting=metaopt.Grafting("rmsprop", b2=0.99),
            **_SHAMPOO_STRUCTURE,
        ),
        inject=lambda lr, damping: optax.inject_hyperparams(metaopt.shampoo)(
            learning_rate=lr,
            damping=damping,
            nesterov=True,
            blocking=metaopt.Blocking(block_size=4),
            grafting=metaopt.Grafting("rmsprop", b2=0.99),
            **_SHAMPOO_STRUCTURE,
        ),
        key="damping",
        key_value=1e-2,
        adaptive=True,
    ),
    Entry(
        # The eigenbasis is held constant under differentiation (see scale_by_soap). With a
        # refresh every 10 steps the contract's 8-step derivative check uses only the first
        # basis, built from the first gradient, which does not depend on the hyperparameters;
        # the derivative is then exact and finite differences must agree.
        name="soap",
        nonfinite="skips",
        huge_gradient="second_moment_overflows",
        # Adam in the eigenbasis divides rotated entries by their own size: at the first step
        # the rotated gradient is diagonal up to the eigenvectors' round-off, which that
        # division amplifies (sharded against unsharded: 1.6e-6 of the parameters after 5
        # steps on the [16, 8] matrix, preconditioned since small matrices are no longer
        # merged into vectors). See docs/optimizers/soap.md.
        sharded_rtol=1e-5,
        make=lambda lr, b2: metaopt.soap(lr, b1=0.9, b2=b2, weight_decay=1e-4),
        inject=lambda lr, b2: optax.inject_hyperparams(metaopt.soap)(
            learning_rate=lr, b1=0.9, b2=b2, weight_decay=1e-4
        ),
        key="b2",
        key_value=0.99,
        adaptive=True,
    ),
]


def _adam_like_meta_params(lopt):
    """Meta-parameters with which the learned optimizer's network computes a hand-designed
    rule: direction = Adam's bias-corrected direction m/sqrt(v) (the first momentum over the
    RMS; ReLU units 0 and 1 carry +x and -x of that feature), and log-magnitude
    a = 1 - 10 relu(-s), where s = clip(log(mean g^2 / sigma^2) / 2, -5, 5) / 5 is the
    gradient-shrinkage tensor feature (unit 2; sigma^2 is the running mean square). With
    lambda_2 = 0.5 the step shrinks like rms(g) / sigma once the gradient falls below its
    running average."""
    import numpy as np

    meta = jax.tree.map(np.zeros_like, jax.tree.map(np.asarray, lopt.init(jax.random.key(0))))
    feature = 3 + len(lopt.momentum_decays)  # m_1 / sqrt(v) in the feature order
    meta["input"]["w"][feature, 0], meta["input"]["w"][feature, 1] = 1.0, -1.0
    for layer in meta["hidden"]:
        layer["w"][0, 0], layer["w"][1, 1] = 1.0, 1.0
    meta["tensor"]["w"][-1, 2] = -1.0  # unit 2 = relu(-s)
    for layer in meta["hidden"]:
        layer["w"][2, 2] = 1.0
    meta["output"]["w"][0, 0], meta["output"]["w"][1, 0] = 1.0, -1.0
    meta["output"]["w"][2, 1] = -10.0
    meta["output"]["b"][1] = 1.0
    return jax.tree.map(jnp.asarray, meta)


_LEARNED = metaopt.learned.PerParameterMLP(hidden_size=4, hidden_layers=2)
_LEARNED_META = _adam_like_meta_params(_LEARNED)

ENTRIES += [
    Entry(
        # A learned optimizer with hand-set meta-parameters (Adam's direction), so that the
        # contract's convergence runs are meaningful; the pretrained optimizer has its own tests
        # in tests/test_learned_*.py. The key hyperparameter is the log-magnitude multiplier
        # lambda_2 (the network's log-magnitude output is 1).
        name="learned_per_parameter_mlp",
        nonfinite="skips",
        huge_gradient="second_moment_overflows",
        # The direction is Adam's bias-corrected m/sqrt(v), so lambda_1 = lr is Adam's rate.
        # Final gap / initial gap (thresholds 1e-3, 1e-2, 1e-3, 5e-2): quadratic 7.7e-8,
        # Rosenbrock 2.6e-9, least squares ~0, MLP 1.6e-4.
        make=lambda lr, lam2: _LEARNED.transform(
            _LEARNED_META, step_multiplier=lr, magnitude_multiplier=lam2
        ),
        inject=lambda lr, lam2: optax.inject_hyperparams(_LEARNED.transform)(
            meta_params=_LEARNED_META, step_multiplier=lr, magnitude_multiplier=lam2
        ),
        key="magnitude_multiplier",
        key_value=0.5,
        adaptive=True,
    ),
]

ENTRY_BY_NAME = {entry.name: entry for entry in ENTRIES}


def public_transforms() -> set[str]:
    """Names of the public transform factories the contract must cover."""
    return {
        name
        for name in metaopt.__all__
        if callable(getattr(metaopt, name)) and not name[0].isupper() and name not in NOT_TRANSFORMS
    }


# Public functions of layer 1 that are not transform factories.
NOT_TRANSFORMS = {
    "ademamix_alpha_warmup",
    "ademamix_b3_warmup",
    "eigenbasis",
    "matrix_inverse_pth_root",
    "nnx_grad_fn",  # builds the grad_fn argument of the SAM family (tests/test_nnx_grad_fn.py)
    "prepare_cpu_environment",
    "refresh_eigenbasis",
}


# Which registry entries exercise each public factory (a scale_by_* core is exercised through
# its alias, which is a chain of the core with learning rate and weight decay).
COVERAGE = {
    "ademamix": "ademamix",
    "scale_by_ademamix": "ademamix",
    "simplified_ademamix": "simplified_ademamix",
    "scale_by_simplified_ademamix": "simplified_ademamix",
    "sam": "sam",
    "scale_by_sam": "sam",
    "asam": "asam",
    "scale_by_asam": "asam",
    "gam": "gam",
    "scale_by_gam": "gam",
    "gradient_regularization": "gradient_regularization",
    "scale_by_gradient_regularization": "gradient_regularization",
    "shampoo": "shampoo",
    "scale_by_shampoo": "shampoo",
    "soap": "soap",
    "scale_by_soap": "soap",
}


# ----------------------------------------------------------------------------- constructors
# Every public factory (transforms and the configuration classes) with the arguments it needs,
# for the contract's checks of the constructor arguments. Every argument of a factory's
# signature is numeric (a string or other non-number must raise a TypeError naming it) unless
# it is listed in NON_NUMERIC_ARGUMENTS, so a new numeric argument is covered without editing
# this file.
_BASE = optax.sgd(0.1)
CONSTRUCTORS = {
    "ademamix": (metaopt.ademamix, {"learning_rate": 1e-3}),
    "scale_by_ademamix": (metaopt.scale_by_ademamix, {}),
    "simplified_ademamix": (metaopt.simplified_ademamix, {"learning_rate": 1e-3}),
    "scale_by_simplified_ademamix": (metaopt.scale_by_simplified_ademamix, {}),
    "sam": (metaopt.sam, {"base_optimizer": _BASE}),
    "scale_by_sam": (metaopt.scale_by_sam, {}),
    "asam": (metaopt.asam, {"base_optimizer": _BASE}),
    "scale_by_asam": (metaopt.scale_by_asam, {}),
    "gam": (metaopt.gam, {"base_optimizer": _BASE}),
    "scale_by_gam": (metaopt.scale_by_gam, {}),
    "gradient_regularization": (metaopt.gradient_regularization, {"base_optimizer": _BASE}),
    "scale_by_gradient_regularization": (metaopt.scale_by_gradient_regularization, {}),
    "shampoo": (metaopt.shampoo, {"learning_rate": 1e-3}),
    "scale_by_shampoo": (metaopt.scale_by_shampoo, {}),
    "soap": (metaopt.soap, {"learning_rate": 1e-3}),
    "scale_by_soap": (metaopt.scale_by_soap, {}),
    "Grafting": (metaopt.Grafting, {}),
    "Blocking": (metaopt.Blocking, {}),
}

# Arguments that are not numbers: transforms, masks, dtypes, flags, choices and mesh axes.
NON_NUMERIC_ARGUMENTS = {
    "base_optimizer",
    "mask",
    "mu_dtype",
    "statistics_dtype",
    "preconditioner_dtype",
    "axis_name",
    "direction",
    "normalize",
    "nesterov",
    "blocking",
    "grafting",
    "root_method",
    "kind",
    "merge_small_dimensions",
    "one_sided",
    "precondition_vectors",
}


def numeric_arguments(factory_name: str) -> list[str]:
    """The numeric arguments of a public factory, read from its signature."""
    factory, _ = CONSTRUCTORS[factory_name]
    return [
        name for name in inspect.signature(factory).parameters if name not in NON_NUMERIC_ARGUMENTS
    ]
