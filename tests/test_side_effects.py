"""Importing metaopt and constructing its transforms have no side effects; training on CPU in a
fresh process with the default environment needs no set-up and does not hang.

Each check runs in a subprocess: this suite's conftest has already started JAX's backend and set
``XLA_FLAGS`` and ``OPENBLAS_NUM_THREADS``, which are exactly what must not be needed.
"""

import os
import subprocess
import sys
import textwrap

import pytest

# A user's environment: none of the variables the protection used to ask for.
_REMOVED = ("XLA_FLAGS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def _run(script: str, timeout: float, **extra_env: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _REMOVED and k != "JAX_ENABLE_X64"}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra_env)
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_and_construction_do_not_warn_touch_the_environment_or_start_a_backend():
    out = _run(
        """
        import os
        from jax._src import xla_bridge  # no public "has a backend started" query
        before = dict(os.environ)
        import metaopt
        for make in (
            lambda: metaopt.shampoo(1e-3),
            lambda: metaopt.soap(1e-3),
            lambda: metaopt.scale_by_shampoo(),
            lambda: metaopt.scale_by_soap(),
            lambda: metaopt.ademamix(1e-3),
            lambda: metaopt.sam(metaopt.shampoo(1e-3)),
        ):
            make()
        assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
        assert not xla_bridge._backends, list(xla_bridge._backends)
        print("ok")
        """,
        timeout=120,
    )
    assert out.strip() == "ok"


_TRAINING = """
    import faulthandler
    import ctypes, os
    import jax, jax.numpy as jnp, optax, metaopt
    from scipy.linalg import cython_lapack

    faulthandler.dump_traceback_later({hang_after}, exit=True)  # a hang fails with a traceback
    sizes = [16, 32, 32, 4]
    keys = jax.random.split(jax.random.PRNGKey(0), len(sizes))
    params = [
        {{"w": jax.random.normal(k, (a, b)) / a**0.5, "b": jnp.zeros(b)}}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]
    x = jax.random.normal(keys[-1], (64, sizes[0]))
    y = jnp.sin(x[:, : sizes[-1]])

    def loss(params):
        h = x
        for i, layer in enumerate(params):
            h = h @ layer["w"] + layer["b"]
            h = jnp.tanh(h) if i < len(params) - 1 else h
        return jnp.mean((h - y) ** 2)

    opt = {make}
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    first = float(loss(params))
    for _ in range(40):
        params, state, value = step(params, state)
    assert float(value) < 0.5 * first, (first, float(value))
    library = ctypes.CDLL(cython_lapack.__file__)
    get = getattr(library, "scipy_openblas_get_num_threads", None)
    print(get() if get is not None else "unknown")
"""

_OPTIMIZERS = {
    # Roots every other step from step 2: 20 root steps, 11 LAPACK calls each.
    "shampoo": "metaopt.shampoo(3e-2, preconditioning_frequency=2, start_preconditioning_step=2)",
    # Eigenbases at step 1, refreshed (QR) every other step.
    "soap": "metaopt.soap(3e-2, preconditioning_frequency=2)",
}


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_training_on_cpu_in_the_default_environment_finishes(name):
    # Before, this needed OPENBLAS_NUM_THREADS=1 for speed (without it, root steps on a busy
    # 2-core machine took 850 ms instead of 42 ms) and the construction warned; now metaopt
    # runs jaxlib's OpenBLAS on one thread itself when the roots are first traced.
    out = _run(_TRAINING.format(make=_OPTIMIZERS[name], hang_after=240), timeout=300)
    assert out.strip() in ("1", "unknown"), out


def test_a_thread_count_the_user_chose_is_left_alone():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (cores or 1) < 2:
        pytest.skip("OpenBLAS caps the thread count at the number of cores")
    out = _run(
        _TRAINING.format(make=_OPTIMIZERS["shampoo"], hang_after=240),
        timeout=300,
        OPENBLAS_NUM_THREADS="2",
    )
    assert out.strip() in ("2", "unknown"), out


def test_every_subpackage_is_an_attribute_after_import_metaopt():
    out = _run(
        """
        import sys
        import metaopt
        # Imported on first access; tasks is not imported by the others.
        assert "metaopt.tasks" not in sys.modules
        names = ("bilevel", "implicit", "meta", "optimizers", "tasks")
        for name in names:
            assert name in dir(metaopt), name
            module = getattr(metaopt, name)
            assert module is sys.modules[f"metaopt.{name}"], name
        assert metaopt.tasks.load_digits is not None
        assert metaopt.optimizers.shampoo is metaopt.shampoo
        try:
            metaopt.no_such_name
        except AttributeError as error:
            assert "no_such_name" in str(error)
        else:
            raise AssertionError("metaopt.no_such_name did not raise")
        print("ok")
        """,
        timeout=120,
    )
    assert out.strip() == "ok"
