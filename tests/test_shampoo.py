"""Shampoo and SOAP against the NumPy transcriptions in tests/shampoo_references.py, in float64.

Every comparison is step by step on the directions of the core transforms (``scale_by_shampoo``,
``scale_by_soap``). The tolerance is rtol 1e-9 (with atol 1e-9 times the largest entry, for
entries that cancel to round-off): the preconditioners are inverse roots of statistics whose
condition numbers reach about 1e6 (the damping 1e-6 bounds them), so float64 round-off of 1e-16
is amplified to at most about 1e-10; a wrong exponent, bias correction, block or grafting norm
changes the directions at order one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaopt
from tests import shampoo_references as ref

_BLOCKING_KEYS = (
    "block_size",
    "merge_small_dimensions",
    "max_preconditioned_dimension",
    "one_sided",
    "precondition_vectors",
)
_GRAFTING_KEYS = {"graft_kind": "kind", "graft_b2": "b2", "graft_eps": "eps"}


def _problem(shapes, steps, seed, zero_rows=None):
    """Seeded float64 parameters and per-step gradients; ``zero_rows`` {name: row} zeroes a row
    of that gradient at every step."""
    rng = np.random.default_rng(seed)
    params = {name: rng.normal(size=shape) for name, shape in shapes.items()}
    grads = []
    for _ in range(steps):
        g = {name: rng.normal(size=shape) for name, shape in shapes.items()}
        for name, row in (zero_rows or {}).items():
            g[name][row] = 0.0
        grads.append(g)
    return params, grads


def _blocking(config, precondition_vectors):
    kwargs = {k: config[k] for k in _BLOCKING_KEYS if k in config}
    kwargs.setdefault("precondition_vectors", precondition_vectors)
    return metaopt.Blocking(**kwargs)


def _shampoo(config):
    grafting = metaopt.Grafting(**{v: config[k] for k, v in _GRAFTING_KEYS.items() if k in config})
    rest = {k: v for k, v in config.items() if k not in _BLOCKING_KEYS and k not in _GRAFTING_KEYS}
    # The reference's threshold default is None (finiteness only); say so explicitly.
    rest.setdefault("root_error_threshold", None)
    return metaopt.scale_by_shampoo(
        blocking=_blocking(config, precondition_vectors=True),
        grafting=grafting,
        statistics_dtype=jnp.float64,
        preconditioner_dtype=jnp.float64,
        **rest,
    )


def _soap(config):
    rest = {k: v for k, v in config.items() if k not in _BLOCKING_KEYS}
    return metaopt.scale_by_soap(blocking=_blocking(config, precondition_vectors=False), **rest)


def _directions(tx, params, grads):
    """The transform's outputs at every step (parameters held fixed), and the final state."""
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads:
        updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
        out.append(jax.tree.map(np.asarray, updates))
    return out, state


def _assert_close(got, want, rtol=1e-9, names=None):
    for t, (got_step, want_step) in enumerate(zip(got, want, strict=True), start=1):
        for name in names or want_step:
            expected = want_step[name]
            scale = np.abs(expected).max() if expected.size else 0.0
            np.testing.assert_allclose(
                got_step[name],
                expected,
                rtol=rtol,
                atol=rtol * scale,
                err_msg=f"step {t}, parameter {name!r}",
            )


# ------------------------------------------------------------------------------- Shampoo
# name: (parameter shapes, reference configuration). Roots are taken every 2 steps from step 2
# unless a case says otherwise, so that seven steps see three preconditioner refreshes.
SHAMPOO_CASES = {
    # 10x7 in 4x4 blocks: 3x2 blocks, the last row and column of blocks zero-padded.
    "blocked_and_padded": ({"w": (10, 7)}, dict(block_size=4)),
    # [2, 3, 5] merges to [6, 5] under block_size 8; one 6x5 block.
    "merged_small_dimensions": ({"w": (2, 3, 5)}, dict(block_size=8)),
    # Three preconditioned axes (p = 6), the last one padded from 5 to 8 in two blocks.
    "three_dimensional": ({"w": (3, 4, 5)}, dict(block_size=4, merge_small_dimensions=False)),
    # Vectors are preconditioned by default and blocked like any axis; the unit dims of
    # (1, 7, 1) are dropped; the scalar is grafted only.
    "vectors_and_scalar": (
        {"v": (6,), "long": (11,), "unit_dims": (1, 7, 1), "s": ()},
        dict(block_size=4),
    ),
    "vectors_not_preconditioned": (
        {"v": (6,), "w": (4, 5)},
        dict(precondition_vectors=False, merge_small_dimensions=False),
    ),
    # The 40 axis exceeds max_preconditioned_dimension: it is neither preconditioned nor blocked,
    # the 5 axis is blocked into two padded blocks of 4, and p = 2.
    "one_axis_too_large": (
        {"w": (5, 40)},
        dict(max_preconditioned_dimension=10, block_size=4, merge_small_dimensions=False),
    ),
    # One-sided keeps the smallest preconditioned axis: 6 of (6, 9), 3 of (5, 3, 4), the first
    # of (5, 5).
    "one_sided": (
        {"w": (6, 9), "u": (5, 3, 4), "tie": (5, 5)},
        dict(one_sided=True, merge_small_dimensions=False),
    ),
    "exponent_override_int": (
        {"w": (4, 6), "v": (5,)},
        dict(exponent_override=2, merge_small_dimensions=False),
    ),
    # (2, 8): vectors use p = 2, matrices p = 8, the 3-D tensor has no entry and uses 2c = 6.
    "exponent_override_sequence": (
        {"v": (5,), "w": (4, 6), "u": (2, 3, 4)},
        dict(exponent_override=(2, 8), merge_small_dimensions=False),
    ),
    # A non-positive entry falls back to 2c: vectors p = 2, matrices p = 3.
    "exponent_override_sequence_with_zero": (
        {"v": (5,), "w": (4, 6)},
        dict(exponent_override=[0, 3], merge_small_dimensions=False),
    ),
    "nesterov": ({"w": (10, 7), "v": (3,)}, dict(nesterov=True, block_size=4)),
    "no_momentum": ({"w": (5, 6)}, dict(b1=0.0, merge_small_dimensions=False)),
    "strong_damping": (
        {"w": (5, 6)},
        dict(damping=1e-2, eps_root=1e-3, b2=0.9, merge_small_dimensions=False),
    ),
    # Statistics at steps 1, 3, 5, ..., roots at steps 2, 5, 8: a root step (5) where the
    # statistics were just updated and one (2, 8) where they were not.
    "frequencies": (
        {"w": (5, 6), "v": (4,)},
        dict(
            statistics_frequency=2,
            preconditioning_frequency=3,
            start_preconditioning_step=2,
            merge_small_dimensions=False,
        ),
    ),
    # The original Shampoo sums the statistics (no decay, no bias correction).
    "summed_statistics": ({"w": (5, 6)}, dict(b2=1.0, merge_small_dimensions=False)),
    "error_threshold_met": (
        {"w": (10, 7)},
        dict(block_size=4, root_error_threshold=1e-6),
    ),
}


@pytest.mark.parametrize("case", sorted(SHAMPOO_CASES))
def test_shampoo_matches_reference(case):
    shapes, config = SHAMPOO_CASES[case]
    config = {"preconditioning_frequency": 2, **config}
    steps = 9 if case == "frequencies" else 7
    params, grads = _problem(shapes, steps, seed=sorted(SHAMPOO_CASES).index(case))
    expected, failures = ref.shampoo_reference(params, grads, **config)
    got, state = _directions(_shampoo(config), params, grads)
    _assert_close(got, expected)
    assert failures == 0 and int(state.root_failures) == 0


@pytest.mark.parametrize("kind", ["none", "sgd", "adagrad", "rmsprop", "adam"])
def test_shampoo_grafting_matches_reference(kind):
    shapes = {"w": (10, 7), "v": (3,), "s": ()}
    config = dict(
        graft_kind=kind,
        graft_b2=0.95,
        graft_eps=1e-6,
        block_size=4,
        preconditioning_frequency=2,
        start_preconditioning_step=3,
    )
    params, grads = _problem(shapes, steps=6, seed=100)
    expected, _ = ref.shampoo_reference(params, grads, **config)
    got, _ = _directions(_shampoo(config), params, grads)
    _assert_close(got, expected)


def test_before_preconditioning_shampoo_is_adam_grafting():
    shapes = {"w": (10, 7), "v": (3,), "s": ()}
    params, grads = _problem(shapes, steps=6, seed=200)
    config = dict(
        b1=0.8, graft_b2=0.97, graft_eps=1e-5, block_size=4, start_preconditioning_step=100
    )
    got, _ = _directions(_shampoo(config), params, grads)
    adam, _ = _directions(optax.scale_by_adam(b1=0.8, b2=0.97, eps=1e-5), params, grads)
    _assert_close(got, adam, rtol=1e-12)


def test_singular_statistics_give_finite_directions():
    # A gradient row that is always zero makes the left statistic singular; a gradient that is
    # zero everywhere makes both zero, where the root (with eps_root 0) is the zero matrix and
    # the direction falls back to the graft.
    shapes = {"w": (6, 5), "zero": (4, 3)}
    params, grads = _problem(shapes, steps=6, seed=300, zero_rows={"w": 2, "zero": slice(None)})
    for eps_root in (1e-12, 0.0):
        config = dict(preconditioning_frequency=2, merge_small_dimensions=False, eps_root=eps_root)
        expected, failures = ref.shampoo_reference(params, grads, **config)
        got, state = _directions(_shampoo(config), params, grads)
        _assert_close(got, expected)
        assert all(np.all(np.isfinite(step[name])) for step in got for name in step)
        np.testing.assert_array_equal(got[-1]["zero"], np.zeros((4, 3)))
        assert failures == 0 and int(state.root_failures) == 0


def test_root_rejected_by_threshold_keeps_identity():
    # A threshold below any float64 residual rejects every root: the preconditioners stay the
    # identity and each block's direction is its momentum rescaled to the graft's norm. (No
    # block here has diagonal statistics: for those, as for a padded block of a vector, the
    # residual can round to exactly 0 and the root is then rightly accepted.)
    shapes = {"w": (8, 8), "v": (8,)}
    config = dict(block_size=4, preconditioning_frequency=2, root_error_threshold=1e-30)
    params, grads = _problem(shapes, steps=5, seed=400)
    expected, failures = ref.shampoo_reference(params, grads, **config)
    got, state = _directions(_shampoo(config), params, grads)
    _assert_close(got, expected)
    # Roots at steps 2 and 4: w has 4 blocks with 2 matrices, v has 2 blocks with 1.
    assert failures == 2 * (4 * 2 + 2)
    assert int(state.root_failures) == failures


def test_root_rejected_by_threshold_keeps_previous_preconditioner():
    # With b2 = 0 the statistics are the last gradient's alone. Steps 1-2 have well-conditioned
    # gradients (residual about 1e-15, accepted at step 2); from step 3 the gradients have rank
    # 2, so with damping 1e-13 the statistics' condition number is about 1e13 and the residual
    # about 1e-3: the roots at steps 4 and 6 are rejected for both axes and the step-2
    # preconditioners stay in use.
    rng = np.random.default_rng(500)
    params = {"w": rng.normal(size=(4, 4))}
    grads = [{"w": np.eye(4) + 0.1 * rng.normal(size=(4, 4))} for _ in range(2)]
    grads += [{"w": rng.normal(size=(4, 2)) @ rng.normal(size=(2, 4))} for _ in range(5)]
    config = dict(
        b2=0.0,
        damping=1e-13,
        eps_root=1e-30,
        preconditioning_frequency=2,
        merge_small_dimensions=False,
        root_error_threshold=1e-8,
    )
    expected, failures = ref.shampoo_reference(params, grads, **config)
    assert failures == 4
    got, state = _directions(_shampoo(config), params, grads)
    _assert_close(got, expected)
    assert int(state.root_failures) == 4
    # Accepting the rank-deficient roots would have changed the directions at order one.
    accepted, _ = ref.shampoo_reference(params, grads, **{**config, "root_error_threshold": None})
    assert not np.allclose(accepted[-1]["w"], expected[-1]["w"], rtol=1e-2)


# ---------------------------------------------------------------------------------- SOAP
# Square blocks with full-rank statistics, so that every eigenbasis is unique up to signs.
SOAP_CASES = {
    "square": ({"w": (6, 6)}, dict(merge_small_dimensions=False)),
    "square_blocks": ({"w": (8, 8)}, dict(block_size=4)),
    "one_sided": ({"w": (4, 9)}, dict(one_sided=True, merge_small_dimensions=False)),
    "separate_statistics_decay": (
        {"w": (6, 6)},
        dict(b1=0.9, b2=0.99, shampoo_b2=0.8, eps=1e-7, merge_small_dimensions=False),
    ),
}


def _assert_soap_close(got, expected, names=None):
    # At step 1 the bases are the singular vectors of G itself, so G' = Q_L^T G Q_R is diagonal
    # and its off-diagonal entries are round-off (about 1e-16 |G|); Adam's G'/(|G'| + eps) turns
    # them into about 1e-16 |G| / eps = 1e-8 per entry, which no two float64 implementations
    # share. From step 2 the rotated gradients are generic and the round-off is not amplified.
    _assert_close(got[:1], expected[:1], rtol=1e-5, names=names)
    _assert_close(got[1:], expected[1:], names=names)


@pytest.mark.parametrize("case", sorted(SOAP_CASES))
def test_soap_matches_reference(case):
    # Refreshes at steps 3, 6 and 9.
    shapes, config = SOAP_CASES[case]
    config = {"preconditioning_frequency": 3, **config}
    params, grads = _problem(shapes, steps=10, seed=600 + sorted(SOAP_CASES).index(case))
    expected = ref.soap_reference(params, grads, **config)
    got, _ = _directions(_soap(config), params, grads)
    _assert_soap_close(got, expected)


def test_soap_vectors_and_scalars_are_plain_adam():
    shapes = {"v": (7,), "s": (), "w": (5, 5)}
    config = dict(b1=0.9, b2=0.98, eps=1e-7, preconditioning_frequency=3)
    params, grads = _problem(shapes, steps=7, seed=700)
    got, _ = _directions(_soap({**config, "merge_small_dimensions": False}), params, grads)
    adam, _ = _directions(optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-7), params, grads)
    _assert_close(got, adam, rtol=1e-12, names=["v", "s"])
    expected = ref.soap_reference(params, grads, merge_small_dimensions=False, **config)
    _assert_soap_close(got, expected, names=["w"])


def test_non_finite_gradient_skips_the_step():
    # Documented behaviour: a step whose gradient has a NaN or an inf anywhere returns zeros and
    # leaves the state as it was (the step count included), so the other steps are those of
    # the run without the bad gradients; state.skipped_steps counts them.
    shapes = {"w": (10, 7), "v": (5,)}
    config = dict(block_size=4, preconditioning_frequency=2)
    params, clean = _problem(shapes, steps=6, seed=800)
    bad_nan = {name: g.copy() for name, g in clean[3].items()}
    bad_nan["w"][4, 2] = np.nan
    bad_inf = {name: g.copy() for name, g in clean[0].items()}
    bad_inf["v"][1] = -np.inf
    grads = [*clean[:3], bad_nan, *clean[3:5], bad_inf, *clean[5:]]
    expected, _ = ref.shampoo_reference(params, clean, **config)
    zeros = {name: np.zeros(shape) for name, shape in shapes.items()}
    expected = [*expected[:3], zeros, *expected[3:5], zeros, *expected[5:]]
    got, state = _directions(_shampoo(config), params, grads)
    _assert_close(got, expected)
    assert int(state.skipped_steps) == 2 and int(state.count) == 6
    assert int(state.root_failures) == 0
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state))
