"""The MAML family against closed forms (tests/meta_references.py, NumPy) and finite differences.

Linear least-squares tasks make every meta-gradient a closed form: MAML's Jacobian is a matrix
power, iMAML's a linear solve, Meta-SGD's a recursion. Everything runs in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import metaopt
from metaopt import meta
from metaopt.implicit import CG, MINRES, ImplicitDifferentiationWarning
from metaopt.tasks import (
    Task,
    digits_fewshot_pools,
    fewshot_tasks,
    init_mlp,
    mlp_apply,
    sinusoid_tasks,
)
from tests import meta_references as ref

D, N, M = 4, 6, 5


def _tasks(seed=0, num_tasks=3):
    rng = np.random.default_rng(seed)
    xs, xq = rng.normal(size=(num_tasks, N, D)), rng.normal(size=(num_tasks, M, D))
    truth = rng.normal(size=(num_tasks, D))
    ys = np.einsum("tnd,td->tn", xs, truth) + 0.1 * rng.normal(size=(num_tasks, N))
    yq = np.einsum("tnd,td->tn", xq, truth) + 0.1 * rng.normal(size=(num_tasks, M))
    batch = Task((jnp.asarray(xs), jnp.asarray(ys)), (jnp.asarray(xq), jnp.asarray(yq)))
    dicts = [dict(xs=xs[i], ys=ys[i], xq=xq[i], yq=yq[i]) for i in range(num_tasks)]
    return batch, dicts


def _loss(w, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ w - y) ** 2)


THETA = np.array([0.3, -0.2, 0.5, 0.1])


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("checkpoint", [False, True, 2])
def test_maml_equals_the_exact_second_order_gradient(steps, checkpoint):
    tasks, dicts = _tasks()
    inner = meta.InnerLoop(optax.sgd(0.1), steps=steps)
    (value, info), grads = jax.value_and_grad(meta.maml_loss, has_aux=True)(
        jnp.asarray(THETA), tasks, _loss, inner, checkpoint=checkpoint
    )
    want_value, want_grads = ref.maml_meta_gradient(THETA, dicts, 0.1, steps)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(grads, want_grads, rtol=1e-10, atol=1e-14)
    assert info.inner.steps.tolist() == [steps] * 3
    support = [ref.loss(THETA, d["xs"], d["ys"]) for d in dicts]
    np.testing.assert_allclose(info.support_loss, support, rtol=1e-12)


def test_fomaml_drops_exactly_the_second_order_term():
    tasks, dicts = _tasks()
    inner = meta.InnerLoop(optax.sgd(0.1), steps=3)
    grads, _ = jax.grad(meta.fomaml_loss, has_aux=True)(jnp.asarray(THETA), tasks, _loss, inner)
    _, want = ref.fomaml_meta_gradient(THETA, dicts, 0.1, 3)
    np.testing.assert_allclose(grads, want, rtol=1e-10, atol=1e-14)
    _, second_order = ref.maml_meta_gradient(THETA, dicts, 0.1, 3)
    assert np.linalg.norm(want - second_order) > 1e-2 * np.linalg.norm(want)


@pytest.mark.parametrize(("steps", "checkpoint"), [(5, False), (50, False), (50, True), (7, 3)])
def test_maml_equals_a_hand_written_maml_on_an_mlp(steps, checkpoint):
    # The benchmark's reference ("MAML <= 1.05x a hand-written jit + vmap MAML"), in float64:
    # the same meta-gradient, with or without checkpointed segments (7 = 3 + 3 + 1 steps).
    tasks = sinusoid_tasks(jax.random.key(0), 4, shots=5, query_shots=5)
    params = init_mlp(jax.random.key(1), [1, 8, 8, 1])
    tasks, params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), (tasks, params))

    def mse(p, batch):
        return jnp.mean((mlp_apply(p, batch[0]) - batch[1]) ** 2)

    def hand_written(p):
        def per_task(task):
            def step(q, _):
                g = jax.grad(mse)(q, task.support)
                return jax.tree.map(lambda a, b: a - 0.01 * b, q, g), None

            return mse(jax.lax.scan(step, p, None, length=steps)[0], task.query)

        return jnp.mean(jax.vmap(per_task)(tasks))

    inner = meta.InnerLoop(optax.sgd(0.01), steps=steps)
    got = jax.jit(
        jax.grad(lambda p: meta.maml_loss(p, tasks, mse, inner, checkpoint=checkpoint)[0])
    )
    want = jax.jit(jax.grad(hand_written))(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15), got(params), want
    )


@pytest.mark.parametrize(
    "optimizer",
    [
        optax.adam(0.05, eps_root=1e-12),
        metaopt.sam(optax.sgd(0.1), rho=0.05),
        metaopt.ademamix(0.05),
    ],
    ids=["optax.adam", "metaopt.sam", "metaopt.ademamix"],
)
def test_maml_through_an_mlp_matches_finite_differences(optimizer):
    # Nonlinear model and inner loops beyond SGD: optax's Adam and metaopt's own optimizers
    # (optax's Adam needs eps_root: its square root's derivative is infinite at a zero second
    # moment; metaopt's AdEMAMix needs none; SAM's inner step takes grad_fn from the inner solve).
    rng = np.random.default_rng(3)
    x = rng.uniform(-2, 2, size=(2, 2, 8, 1))
    tasks = Task((x[0], np.sin(x[0])), (x[1], np.sin(x[1] + 0.3)))
    params = {
        "w1": rng.normal(size=(1, 6)),
        "b1": rng.normal(size=6) * 0.1,
        "w2": rng.normal(size=(6, 1)) / 3,
    }

    def loss(p, batch):
        h = jnp.tanh(batch[0] @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] - batch[1]) ** 2)

    inner = meta.InnerLoop(optimizer, steps=3)

    @jax.jit
    def objective(p):
        return meta.maml_loss(p, tasks, loss, inner)[0]

    grads = jax.grad(objective)(params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    step = 1e-6
    fd = np.array(
        [
            (objective(unravel(flat + step * e)) - objective(unravel(flat - step * e))) / (2 * step)
            for e in np.eye(flat.size)
        ]
    )
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grads)[0], fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("cg_steps", [2, D])
def test_imaml_equals_the_implicit_formula_with_the_same_cg_steps(cg_steps):
    tasks, dicts = _tasks()
    inner = meta.InnerLoop(optax.sgd(0.2), steps=3000, tol=1e-13)
    (value, info), grads = jax.value_and_grad(meta.imaml_loss, has_aux=True)(
        jnp.asarray(THETA), tasks, _loss, inner, regularization=2.0, cg_steps=cg_steps
    )
    want_value, want, _ = ref.imaml_meta_gradient_cg(THETA, dicts, 2.0, cg_steps)
    np.testing.assert_allclose(value, want_value, rtol=1e-10)
    np.testing.assert_allclose(grads, want, rtol=1e-9, atol=1e-12)
    assert bool(jnp.all(info.inner.converged))
    if cg_steps == D:  # CG is exact in D steps: the exact implicit meta-gradient
        np.testing.assert_allclose(grads, ref.imaml_meta_gradient(THETA, dicts, 2.0)[1], rtol=1e-9)


def test_imaml_differentiates_the_regularization():
    tasks, dicts = _tasks()
    inner = meta.InnerLoop(optax.sgd(0.2), steps=3000, tol=1e-13)

    def objective(lam):
        return meta.imaml_loss(
            jnp.asarray(THETA), tasks, _loss, inner, regularization=lam, cg_steps=D
        )[0]

    def reference(lam):
        return ref.imaml_meta_gradient(THETA, dicts, lam)[0]

    fd = (reference(2.0 + 1e-6) - reference(2.0 - 1e-6)) / 2e-6
    np.testing.assert_allclose(jax.grad(objective)(2.0), fd, rtol=1e-6)


def test_imaml_matches_finite_differences_on_a_smooth_digits_network():
    # A non-convex inner problem with no closed form: a tanh MLP on 5-way digits episodes.
    # With the inner problem solved to 1e-12 and the adjoint system solved exactly, the
    # implicit meta-gradient is the derivative of the query loss at the inner solution.
    pool, _ = digits_fewshot_pools()
    tasks = fewshot_tasks(jax.random.key(3), pool, 2, ways=5, shots=1, query_shots=3)
    tasks = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, tasks)
    theta = init_mlp(jax.random.key(0), [64, 16, 5], jnp.float64)

    def loss(params, batch):
        x, y = batch
        (w1, b1), (w2, b2) = ((layer["w"], layer["b"]) for layer in params)
        logits = jnp.tanh(x @ w1 + b1) @ w2 + b2
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    inner = meta.InnerLoop(optax.sgd(0.1), steps=3000, tol=1e-12)

    @jax.jit
    def objective(theta):
        exact = CG(tol=1e-12, maxiter=400)
        return meta.imaml_loss(theta, tasks, loss, inner, regularization=2.0, linear_solver=exact)[
            0
        ]

    grads = jax.grad(objective)(theta)
    # Compiled: eagerly, the inner loop's 3000-step while loop is traced op by op (50 s).
    paper = jax.jit(
        jax.grad(lambda t: meta.imaml_loss(t, tasks, loss, inner, regularization=2.0)[0])
    )(theta)
    flat, unravel = jax.flatten_util.ravel_pytree(grads)
    rng = np.random.default_rng(0)
    for _ in range(3):
        direction = rng.normal(size=flat.shape)
        direction /= np.linalg.norm(direction)
        step = unravel(jnp.asarray(1e-4 * direction))
        plus, minus = optax.tree.add(theta, step), optax.tree.sub(theta, step)
        fd = (objective(plus) - objective(minus)) / 2e-4
        np.testing.assert_allclose(flat @ direction, fd, rtol=1e-6)
    # The paper's 5 CG steps approximate the exact meta-gradient, not much worse.
    paper_flat = jax.flatten_util.ravel_pytree(paper)[0]
    assert paper_flat @ flat / (jnp.linalg.norm(paper_flat) * jnp.linalg.norm(flat)) > 0.99


def _indefinite_tasks():
    # The support loss 0.5 phi^T A phi has eigenvalues 3, -3 and 1: with lambda = 1 the
    # matrix I + A / lambda is indefinite. The query loss g^T phi has gradient g.
    a = np.diag([3.0, -3.0, 1.0])
    g = np.array([1.0, 1.0, 1.0])
    tasks = Task(jnp.asarray(a)[None], jnp.asarray(g)[None])

    def loss(phi, batch):
        return 0.5 * phi @ batch @ phi if batch.ndim == 2 else batch @ phi

    return tasks, loss, np.linalg.solve(np.eye(3) + a, g)


def test_imaml_reports_negative_curvature_and_minres_solves_the_indefinite_system():
    tasks, loss, exact = _indefinite_tasks()
    inner = meta.InnerLoop(optax.sgd(1e-3), steps=1)
    theta = jnp.asarray([0.1, 0.2, 0.3])

    def grad(**kwargs):
        return jax.grad(
            lambda t: meta.imaml_loss(t, tasks, loss, inner, regularization=1.0, **kwargs)[0]
        )(theta)

    # One warning for the whole batch of tasks, flags listed per task.
    with pytest.warns(ImplicitDifferentiationWarning, match=r"negative_curvature=\[True\]"):
        grad()
    assert bool(jnp.all(jnp.isnan(grad(on_failure="nan"))))
    np.testing.assert_allclose(grad(linear_solver=MINRES(tol=1e-12)), exact, rtol=1e-10)


def test_reptile_direction_follows_its_update_rule():
    tasks, dicts = _tasks()
    inner = meta.InnerLoop(optax.sgd(0.1), steps=4)
    direction, _ = meta.reptile_direction(jnp.asarray(THETA), tasks, _loss, inner)
    np.testing.assert_allclose(direction, ref.reptile_direction(THETA, dicts, 0.1, 4), rtol=1e-12)
    outer = optax.sgd(0.5)
    updates, _ = outer.update(direction, outer.init(direction))
    np.testing.assert_allclose(
        THETA + updates, ref.reptile_step(THETA, dicts, 0.1, 4, 0.5), rtol=1e-12
    )


def test_metasgd_learns_per_parameter_rates_exactly():
    tasks, dicts = _tasks()
    lrs = np.array([0.05, 0.1, 0.15, 0.02])
    params = meta.MetaSGDParams(jnp.asarray(THETA), jnp.asarray(lrs))
    grads, _ = jax.grad(meta.metasgd_loss, has_aux=True)(params, tasks, _loss, steps=3)
    _, want_theta, want_lrs = ref.metasgd_meta_gradient(THETA, lrs, dicts, 3)
    np.testing.assert_allclose(grads.params, want_theta, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads.learning_rates, want_lrs, rtol=1e-10, atol=1e-14)


def test_anil_adapts_only_the_head():
    tasks, dicts = _tasks()
    rng = np.random.default_rng(5)
    body, head = rng.normal(size=(D, 3)), rng.normal(size=3)

    def loss(p, batch):
        return 0.5 * jnp.mean(((batch[0] @ p["body"]) @ p["head"] - batch[1]) ** 2)

    params = {"body": jnp.asarray(body), "head": jnp.asarray(head)}
    inner = meta.InnerLoop(optax.sgd(0.1), steps=2)
    grads, _ = jax.grad(meta.anil_loss, has_aux=True)(
        params, tasks, loss, inner, head=lambda p: {"body": False, "head": True}
    )
    _, want_body, want_head = ref.anil_meta_gradient(body, head, dicts, 0.1, 2)
    np.testing.assert_allclose(grads["head"], want_head, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads["body"], want_body, rtol=1e-6, atol=1e-9)
    adapted, _ = meta.adapt(
        loss,
        params,
        (tasks.support[0][0], tasks.support[1][0]),
        inner,
        adapted=lambda p: {"body": False, "head": True},
    )
    np.testing.assert_array_equal(adapted["body"], params["body"])


def test_a_batch_equals_a_loop_over_tasks():
    tasks, _ = _tasks(num_tasks=4)
    inner = meta.InnerLoop(optax.sgd(0.1), steps=2)
    grad = jax.jit(jax.grad(lambda p, t: meta.maml_loss(p, t, _loss, inner)[0]))
    batched = grad(jnp.asarray(THETA), tasks)
    single = [
        grad(jnp.asarray(THETA), jax.tree.map(lambda x: x[i : i + 1], tasks)) for i in range(4)
    ]
    np.testing.assert_allclose(batched, np.mean(single, axis=0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["maml", "imaml", "reptile"])
def test_tasks_sharded_over_eight_devices_give_the_same_meta_gradient(name):
    tasks, _ = _tasks(num_tasks=16)
    mesh = Mesh(np.array(jax.devices()[:8]), ("tasks",))
    inner = meta.InnerLoop(optax.sgd(0.1), steps=3)
    if name == "maml":
        fn = jax.grad(lambda p, t: meta.maml_loss(p, t, _loss, inner)[0])
    elif name == "imaml":
        fn = jax.grad(lambda p, t: meta.imaml_loss(p, t, _loss, inner, regularization=1.0)[0])
    else:
        fn = lambda p, t: meta.reptile_direction(p, t, _loss, inner)[0]
    fn = jax.jit(fn)
    sharded = meta.shard_tasks(tasks, mesh)
    assert len(sharded.support[0].sharding.device_set) == 8
    np.testing.assert_allclose(
        fn(jnp.asarray(THETA), sharded), fn(jnp.asarray(THETA), tasks), rtol=1e-12, atol=1e-15
    )


def test_task_interpolation_mixes_pairs_of_tasks():
    tasks, dicts = _tasks(num_tasks=4)
    mixed = meta.interpolate_tasks(jax.random.key(0), tasks, alpha=0.5)
    xs, mixed_xs = np.asarray(tasks.support[0]), np.asarray(mixed.support[0])
    for i in range(4):
        # Recover the partner and lambda from the mixed support inputs, then check every field.
        found = []
        for j in set(range(4)) - {i}:
            a, b = (xs[i] - xs[j]).ravel(), (mixed_xs[i] - xs[j]).ravel()
            lam = a @ b / (a @ a)
            if np.allclose(lam * xs[i] + (1 - lam) * xs[j], mixed_xs[i], rtol=1e-12, atol=1e-12):
                found.append((j, lam))
        assert len(found) == 1 and 0 <= found[0][1] <= 1
        j, lam = found[0]
        want = ref.mlti_mix(dicts[i], dicts[j], lam)
        got = dict(
            xs=mixed.support[0][i],
            ys=mixed.support[1][i],
            xq=mixed.query[0][i],
            yq=mixed.query[1][i],
        )
        for field in want:
            np.testing.assert_allclose(got[field], want[field], rtol=1e-10, atol=1e-12)


def test_classification_interpolation_keeps_labels_and_mixes_classes():
    rng = np.random.default_rng(1)
    labels = np.stack([rng.permutation(np.repeat(np.arange(3), 2)) for _ in range(4)])
    x = rng.normal(size=(4, 6, 5))
    tasks = Task((jnp.asarray(x), jnp.asarray(labels)), (jnp.asarray(x), jnp.asarray(labels)))
    mixed = meta.interpolate_tasks(jax.random.key(2), tasks, classification=True)
    np.testing.assert_array_equal(mixed.support[1], np.tile(np.repeat(np.arange(3), 2), (4, 1)))
    order = np.argsort(labels, axis=1, kind="stable")
    sorted_x = np.take_along_axis(x, order[..., None], axis=1)
    for i in range(4):
        candidates = [
            j
            for j in range(4)
            if j != i
            and np.linalg.matrix_rank(
                np.stack(
                    [
                        (sorted_x[i] - sorted_x[j]).ravel(),
                        (np.asarray(mixed.support[0][i]) - sorted_x[j]).ravel(),
                    ]
                ),
                tol=1e-9,
            )
            == 1
        ]
        assert len(candidates) == 1
    unbalanced = (jnp.asarray(x), jnp.asarray(labels).at[0].set(0))
    with pytest.raises(ValueError, match="label"):
        meta.interpolate_tasks(jax.random.key(2), Task(unbalanced, unbalanced), classification=True)


def test_configuration_errors_name_the_argument():
    tasks, _ = _tasks()
    inner = meta.InnerLoop(optax.sgd(0.1))
    cases = [
        (lambda: meta.InnerLoop(optax.sgd(0.1), steps=0), "steps"),
        (lambda: meta.InnerLoop(optax.sgd(0.1), tol=-1.0), "tol"),
        (lambda: meta.InnerLoop("sgd"), "optimizer"),
        (lambda: meta.imaml_loss(THETA, tasks, _loss, inner, regularization=0.0), "regularization"),
        (
            lambda: meta.imaml_loss(THETA, tasks, _loss, inner, regularization=1.0, cg_steps=0),
            "cg_steps",
        ),
        (
            lambda: meta.maml_loss(THETA, tasks, _loss, inner, first_order=True, checkpoint=True),
            "checkpoint",
        ),
        (lambda: meta.metasgd_loss(THETA, tasks, _loss), "MetaSGDParams"),
        (lambda: meta.maml_loss(THETA, tasks, _loss, inner, adapted=lambda p: False), "no leaf"),
        (lambda: meta.shard_tasks(tasks, Mesh(np.array(jax.devices()[:8]), ("x",))), "axis"),
        (
            lambda: meta.shard_tasks(tasks, Mesh(np.array(jax.devices()[:8]), ("tasks",))),
            "multiple of the 8",
        ),
        (lambda: meta.interpolate_tasks(jax.random.key(0), tasks, alpha=0.0), "alpha"),
        (
            lambda: meta.imaml_loss(
                THETA, tasks, _loss, inner, regularization=1.0, cg_steps=3, linear_solver=CG()
            ),
            "not both",
        ),
    ]
    for make, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            make()
    mismatched = Task(tasks.support, (tasks.query[0][:2], tasks.query[1][:2]))
    with pytest.raises(ValueError, match="leading task axis"):
        meta.maml_loss(THETA, mismatched, _loss, inner)
