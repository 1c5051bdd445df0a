"""Off the happy path for metaopt.learned's helpers: muLO multipliers, the inner training
problem, and saving and loading meta-parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import learned, tasks


def test_mulo_multipliers_by_shape_and_input_paths():
    params = {
        "conv": jnp.zeros((3, 3, 4, 8)),  # HWIO: fan-in 3*3*4
        "in": jnp.zeros((5, 16)),
        "out": jnp.zeros((16, 2)),
        "scale": jnp.zeros(()),
        "empty": jnp.zeros((0, 4)),
    }
    by_name = learned.mulo_update_multipliers(params, input_layers=["['in']"])
    by_function = learned.mulo_update_multipliers(params, input_layers=lambda p: "in" in p)
    assert by_name == by_function
    assert by_name == {"conv": 1 / 36, "in": 1.0, "out": 1 / 16, "scale": 1.0, "empty": 1.0}


def test_mulo_multipliers_reject_a_bare_string_and_non_strings():
    params = {"w": jnp.zeros((2, 2))}
    with pytest.raises(TypeError, match=r"wrap it in a list: input_layers=\['w'\]"):
        learned.mulo_update_multipliers(params, input_layers="w")
    with pytest.raises(TypeError, match="entries must be strings"):
        learned.mulo_update_multipliers(params, input_layers=[3])


def test_update_multipliers_must_match_the_parameters():
    lopt = learned.PerParameterMLP(hidden_size=2)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    theta = lopt.init(jax.random.key(0))
    tx = lopt.transform(theta, update_multipliers={"w": 0.5})
    with pytest.raises(ValueError, match="tree structure of the parameters"):
        tx.update(params, tx.init(params), params)
    tx = lopt.transform(theta, update_multipliers={"w": jnp.ones(2), "b": 1.0})
    with pytest.raises(ValueError, match=r"update_multipliers\['w'\] must be a scalar"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, tx.init(params))


def test_training_problem_rejects_what_is_not_an_optimizer_or_a_task():
    lopt = learned.PerParameterMLP(hidden_size=2)
    task = tasks.mlp_task("blobs", (4,))
    with pytest.raises(TypeError, match=r"optimizer must be a metaopt\.learned\.PerParameterMLP"):
        learned.training_problem("adam", task, horizon=10)
    with pytest.raises(TypeError, match="task must have a callable 'init'"):
        learned.training_problem(lopt, object(), horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        learned.training_problem(lopt, task, horizon=0)


def test_save_and_load_round_trip_and_foreign_files(tmp_path):
    lopt = learned.PerParameterMLP(hidden_size=3, hidden_layers=2, momentum_decays=[0.5, 0.9])
    theta = lopt.init(jax.random.key(1))
    path = tmp_path / "lopt.npz"
    learned.save_meta_params(path, lopt, theta, note="x")
    loaded, theta2, metadata = learned.load_meta_params(path)
    assert loaded == lopt and metadata == {"note": "x"}
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(theta2), strict=True):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(ValueError, match=r"meta_params\['hidden'\]\[0\]\['b'\] has shape \(3,\)"):
        learned.save_meta_params(path, learned.PerParameterMLP(4, 2, [0.5, 0.9]), theta)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, __header__=np.asarray('{"format": "other"}'))
    with pytest.raises(ValueError, match="is not a learned optimizer saved by"):
        learned.load_meta_params(foreign)
