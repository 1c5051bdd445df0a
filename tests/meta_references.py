"""Independent NumPy references for gradient-based meta-learning, in float64, from the papers.

No jax / metaopt here: only numpy and the standard library. Every function takes plain numpy
arrays and works in float64.

Setting: linear least-squares tasks, so every quantity has a closed form. A task is a dict with
support ``xs`` [n, d], ``ys`` [n] and query ``xq`` [m, d], ``yq`` [m]. On a set (X, y) of n rows:
    L(w) = ||X w - y||^2 / (2 n) ;  g(w) = X^T (X w - y) / n = H w - b ;
    H = X^T X / n ;  b = X^T y / n.
Subscripts s / q mean the support / query set. ``tasks`` is a list of task dicts and every
meta-loss and meta-gradient is the plain mean over tasks.

Methods:
    MAML (Finn, Abbeel, Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
        Networks"): w_0 = theta, w_{k+1} = w_k - lr g_s(w_k), meta-loss L_q(w_K(theta)),
        exact gradient (dw_K/dtheta)^T grad L_q(w_K) with dw_K/dtheta = (I - lr H_s)^K.
    First-order MAML (same paper): the Jacobian replaced by I.
    Reptile (Nichol, Achiam, Schulman 2018, "On First-Order Meta-Learning Algorithms"):
        theta <- theta + eps (mean_tasks w_K - theta).
    iMAML (Rajeswaran, Finn, Kakade, Levine 2019, "Meta-Learning with Implicit Gradients"):
        phi*(theta) = argmin_phi L_s(phi) + (lam/2) ||phi - theta||^2,
        gradient (I + H_s / lam)^{-1} grad L_q(phi*) (eq. 5 / Lemma 1), optionally by CG.
    Meta-SGD (Li, Zhou, Chen, Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
        Learning"): per-coordinate learning rates alpha, w_{k+1} = w_k - alpha * g_s(w_k).
    ANIL (Raghu, Raghu, Bengio, Vinyals 2020, "Rapid Learning or Feature Reuse?"): only the
        head is adapted in the inner loop.
    MLTI (Yao et al. 2021, "Meta-Learning with Fewer Tasks through Task Interpolation"):
        regression / label-sharing mixup of two tasks.
"""

import numpy as np

# ----------------------------------------------------------------------------- least squares


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def loss(w, x, y):
    """L(w) = ||X w - y||^2 / (2 n) for X = ``x`` [n, d], y = ``y`` [n]."""
    x, y = _f64(x), _f64(y)
    r = x @ _f64(w) - y
    return float(r @ r) / (2 * x.shape[0])


def grad(w, x, y):
    """g(w) = X^T (X w - y) / n."""
    x, y = _f64(x), _f64(y)
    return x.T @ (x @ _f64(w) - y) / x.shape[0]


def hessian(x):
    """H = X^T X / n (constant in w)."""
    x = _f64(x)
    return x.T @ x / x.shape[0]


# ----------------------------------------------------------------------------- inner loops


def sgd_adapt(theta, xs, ys, lr, steps):
    """K = ``steps`` steps of gradient descent on the support loss.

    w_0 = theta ;  w_{k+1} = w_k - lr g_s(w_k) ;  returns w_K.
    """
    w = _f64(theta).copy()
    for _ in range(steps):
        w = w - lr * grad(w, xs, ys)
    return w


def sgd_adapt_per_parameter(theta, xs, ys, lrs, steps):
    """Meta-SGD's inner loop: per-coordinate learning rates ``lrs`` (alpha, shape [d]).

    w_0 = theta ;  w_{k+1} = w_k - alpha * g_s(w_k)   (elementwise) ;  returns w_K.
    """
    w = _f64(theta).copy()
    alpha = _f64(lrs)
    for _ in range(steps):
        w = w - alpha * grad(w, xs, ys)
    return w


# ----------------------------------------------------------------------------- MAML family


def maml_jacobian(xs, lr, steps):
    """dw_K/dtheta = (I - lr H_s)^K, built explicitly as a matrix power (symmetric)."""
    h = hessian(xs)
    return np.linalg.matrix_power(np.eye(h.shape[0]) - lr * h, steps)


def maml_meta_gradient(theta, tasks, lr, steps):
    """Exact second-order MAML on least squares; returns (meta_loss, gradient).

    meta_loss = mean_tasks L_q(w_K(theta))
    gradient  = mean_tasks (dw_K/dtheta)^T grad L_q(w_K),   dw_K/dtheta = (I - lr H_s)^K,
    since w_{k+1} = (I - lr H_s) w_k + lr b_s is affine in w_k.
    """
    losses, grads = [], []
    for t in tasks:
        w = sgd_adapt(theta, t["xs"], t["ys"], lr, steps)
        jac = maml_jacobian(t["xs"], lr, steps)
        losses.append(loss(w, t["xq"], t["yq"]))
        grads.append(jac.T @ grad(w, t["xq"], t["yq"]))
    return float(np.mean(losses)), np.mean(grads, axis=0)


def fomaml_meta_gradient(theta, tasks, lr, steps):
    """First-order MAML; returns (meta_loss, gradient).

    meta_loss as in MAML ;  gradient = mean_tasks grad L_q(w_K)   (Jacobian replaced by I).
    """
    losses, grads = [], []
    for t in tasks:
        w = sgd_adapt(theta, t["xs"], t["ys"], lr, steps)
        losses.append(loss(w, t["xq"], t["yq"]))
        grads.append(grad(w, t["xq"], t["yq"]))
    return float(np.mean(losses)), np.mean(grads, axis=0)


def reptile_direction(theta, tasks, lr, steps):
    """Reptile pseudo-gradient: mean_tasks (theta - w_K), w_K from ``sgd_adapt`` on the support.

    The outer step theta <- theta - eps * direction equals theta + eps (mean w_K - theta).
    Reptile uses only the support set of each task.
    """
    theta = _f64(theta)
    ws = [sgd_adapt(theta, t["xs"], t["ys"], lr, steps) for t in tasks]
    return theta - np.mean(ws, axis=0)


def reptile_step(theta, tasks, lr, steps, outer_lr):
    """One (batched) Reptile outer step: theta + outer_lr (mean_tasks w_K - theta)."""
    return _f64(theta) - outer_lr * reptile_direction(theta, tasks, lr, steps)


# ----------------------------------------------------------------------------- iMAML


def imaml_inner_solution(theta, xs, ys, regularization):
    """Exact proximal inner solution of iMAML.

    phi* = argmin_phi L_s(phi) + (lam/2) ||phi - theta||^2 = (H_s + lam I)^{-1} (b_s + lam theta),
    solved by a linear solve; b_s = X_s^T y_s / n.
    """
    xs, ys = _f64(xs), _f64(ys)
    h = hessian(xs)
    b = xs.T @ ys / xs.shape[0]
    lam = regularization
    return np.linalg.solve(h + lam * np.eye(h.shape[0]), b + lam * _f64(theta))


def _imaml_system(xs, regularization):
    """A = I + H_s / lam, the matrix of iMAML's implicit system (Lemma 1: dphi*/dtheta = A^{-1})."""
    h = hessian(xs)
    return np.eye(h.shape[0]) + h / regularization


def conjugate_gradient(a, rhs, steps):
    """Textbook CG for A x = rhs (A symmetric positive definite), x_0 = 0, exactly ``steps`` steps.

    r_0 = rhs, p_0 = r_0 ; for i < steps:
        alpha = r^T r / p^T A p ;  x += alpha p ;  r_new = r - alpha A p ;
        beta = r_new^T r_new / r^T r ;  p = r_new + beta p.
    Stops early only if the residual is exactly zero (to avoid 0 / 0).
    """
    rhs = _f64(rhs)
    x = np.zeros_like(rhs)
    r = rhs.copy()
    p = r.copy()
    rs = float(r @ r)
    for _ in range(steps):
        if rs == 0.0:
            break
        ap = a @ p
        alpha = rs / float(p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = float(r @ r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def _imaml(theta, tasks, regularization, solve):
    losses, grads, phis = [], [], []
    for t in tasks:
        phi = imaml_inner_solution(theta, t["xs"], t["ys"], regularization)
        g_q = grad(phi, t["xq"], t["yq"])
        losses.append(loss(phi, t["xq"], t["yq"]))
        grads.append(solve(_imaml_system(t["xs"], regularization), g_q))
        phis.append(phi)
    return float(np.mean(losses)), np.mean(grads, axis=0), phis


def imaml_meta_gradient(theta, tasks, regularization):
    """iMAML, exact inner solve and implicit gradient; returns (meta_loss, gradient, phis).

    phi*_i = (H_s + lam I)^{-1} (b_s + lam theta)      (``imaml_inner_solution``)
    meta_loss = mean_i L_q(phi*_i)
    gradient  = mean_i (I + H_s / lam)^{-1} grad L_q(phi*_i)   (iMAML eq. 5 / Lemma 1;
                here exact: dphi*/dtheta = lam (H_s + lam I)^{-1} = (I + H_s / lam)^{-1})
    phis      = [phi*_i], one array per task, to check a library's inner solve.
    """
    return _imaml(theta, tasks, regularization, np.linalg.solve)


def imaml_meta_gradient_cg(theta, tasks, regularization, cg_steps):
    """As ``imaml_meta_gradient`` but (I + H_s / lam) x = grad L_q(phi*) is solved by exactly
    ``cg_steps`` iterations of textbook CG from x = 0 (``conjugate_gradient``), as the paper's
    fixed small number of CG steps. phi* is still the exact inner solution.
    Returns (meta_loss, gradient, phis); with cg_steps = d it matches the exact version.
    """
    return _imaml(theta, tasks, regularization, lambda a, g: conjugate_gradient(a, g, cg_steps))


# ----------------------------------------------------------------------------- Meta-SGD


def metasgd_meta_gradient(theta, lrs, tasks, steps):
    """Meta-SGD exact gradients by forward-mode Jacobian accumulation (no autodiff).

    Returns (meta_loss, grad_theta, grad_lrs). With alpha = ``lrs`` [d], D = diag(alpha):
        w_0 = theta ;  w_{k+1} = w_k - alpha * g_s(w_k) = w_k - D (H_s w_k - b_s)
    Jacobians J_k = dw_k/dtheta and A_k = dw_k/dalpha (both [d, d]):
        J_0 = I ;  J_{k+1} = (I - D H_s) J_k
        A_0 = 0 ;  A_{k+1} = (I - D H_s) A_k - diag(g_s(w_k))
    meta_loss = mean_tasks L_q(w_K) ;
    grad_theta = mean_tasks J_K^T grad L_q(w_K) ;  grad_lrs = mean_tasks A_K^T grad L_q(w_K).
    """
    theta, alpha = _f64(theta), _f64(lrs)
    eye = np.eye(theta.shape[0])
    losses, g_theta, g_alpha = [], [], []
    for t in tasks:
        h = hessian(t["xs"])
        step = eye - alpha[:, None] * h  # I - D H_s
        w, jac_theta, jac_alpha = theta.copy(), eye.copy(), np.zeros_like(eye)
        for _ in range(steps):
            g = grad(w, t["xs"], t["ys"])
            jac_alpha = step @ jac_alpha - np.diag(g)
            jac_theta = step @ jac_theta
            w = w - alpha * g
        g_q = grad(w, t["xq"], t["yq"])
        losses.append(loss(w, t["xq"], t["yq"]))
        g_theta.append(jac_theta.T @ g_q)
        g_alpha.append(jac_alpha.T @ g_q)
    return float(np.mean(losses)), np.mean(g_theta, axis=0), np.mean(g_alpha, axis=0)


# ----------------------------------------------------------------------------- ANIL


def _feature_tasks(body, tasks):
    """Tasks with inputs replaced by features Z = X B (targets unchanged)."""
    b = _f64(body)
    return [
        {"xs": _f64(t["xs"]) @ b, "ys": t["ys"], "xq": _f64(t["xq"]) @ b, "yq": t["yq"]}
        for t in tasks
    ]


def anil_meta_loss(body, head, tasks, lr, steps):
    """ANIL meta-loss: mean_tasks L_q(h_K) on features Z = X B, h_K from ``sgd_adapt`` on Z_s."""
    losses = []
    for t in _feature_tasks(body, tasks):
        h = sgd_adapt(head, t["xs"], t["ys"], lr, steps)
        losses.append(loss(h, t["xq"], t["yq"]))
    return float(np.mean(losses))


def anil_meta_gradient(body, head, tasks, lr, steps, fd_step=1e-6):
    """ANIL with linear features f(x) = (x B) h, body B [d, r], head h [r].

    Only the head is adapted: h_0 = head, h_{k+1} = h_k - lr Z_s^T (Z_s h_k - y_s) / n with
    Z = X B, i.e. MAML's inner loop in h with design Z_s. Returns (meta_loss, grad_body, grad_head):
        meta_loss = mean_tasks L_q(h_K) with L_q on (Z_q, y_q)
        grad_head = mean_tasks (I - lr H_z)^K grad_h L_q(h_K),  H_z = Z_s^T Z_s / n   (exact)
        grad_body = central finite differences of meta_loss in each entry of B, step ``fd_step``
                    (1e-6, float64): (meta_loss(B + e E_ij) - meta_loss(B - e E_ij)) / (2 e).
    grad_body is NOT closed form (its closed form is long); it is accurate to roughly 1e-8
    relative for well-scaled problems, so compare with a matching tolerance.
    """
    body = _f64(body)
    meta_loss, grad_head = maml_meta_gradient(head, _feature_tasks(body, tasks), lr, steps)
    grad_body = np.zeros_like(body)
    for idx in np.ndindex(*body.shape):
        bump = np.zeros_like(body)
        bump[idx] = fd_step
        up = anil_meta_loss(body + bump, head, tasks, lr, steps)
        down = anil_meta_loss(body - bump, head, tasks, lr, steps)
        grad_body[idx] = (up - down) / (2 * fd_step)
    return meta_loss, grad_body, grad_head


# ----------------------------------------------------------------------------- MLTI


def mlti_mix(task_a, task_b, lam):
    """MLTI regression (label-sharing) task interpolation, sample by sample.

    x = lam x_a + (1 - lam) x_b ;  y = lam y_a + (1 - lam) y_b, separately for support
    (xs, ys) and query (xq, yq). Both tasks must have the same shapes. Returns a task dict.
    """
    return {
        k: lam * _f64(task_a[k]) + (1 - lam) * _f64(task_b[k]) for k in ("xs", "ys", "xq", "yq")
    }


# ----------------------------------------------------------------------------- self-check


def _random_tasks(rng, num_tasks, d, n, m):
    tasks = []
    for _ in range(num_tasks):
        w_true = rng.normal(size=d)
        xs, xq = rng.normal(size=(n, d)), rng.normal(size=(m, d))
        tasks.append(
            {
                "xs": xs,
                "ys": xs @ w_true + 0.1 * rng.normal(size=n),
                "xq": xq,
                "yq": xq @ w_true + 0.1 * rng.normal(size=m),
            }
        )
    return tasks


def _central_fd(f, x, step=1e-6):
    x = _f64(x)
    out = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = step
        out.flat[i] = (f(x + e) - f(x - e)) / (2 * step)
    return out


def _ok(passed):
    return "ok" if passed else "FAIL"


def _check(name, got, want, tol=1e-6):
    err = float(np.linalg.norm(_f64(got) - _f64(want)) / max(np.linalg.norm(want), 1e-300))
    print(f"{name:42s} rel err {err:.2e}  {_ok(err <= tol)}")
    return err <= tol


def _self_check():
    rng = np.random.default_rng(0)
    d, r = 4, 3
    tasks = _random_tasks(rng, num_tasks=3, d=d, n=6, m=5)
    theta = rng.normal(size=d)
    lr, steps, lam = 0.1, 3, 2.0
    ok = True

    _, g = maml_meta_gradient(theta, tasks, lr, steps)
    fd = _central_fd(lambda p: maml_meta_gradient(p, tasks, lr, steps)[0], theta)
    ok &= _check("MAML gradient vs FD", g, fd)

    _, g, phis = imaml_meta_gradient(theta, tasks, lam)
    fd = _central_fd(lambda p: imaml_meta_gradient(p, tasks, lam)[0], theta)
    ok &= _check("iMAML gradient vs FD", g, fd)
    for t, phi in zip(tasks, phis, strict=True):
        prox_grad = grad(phi, t["xs"], t["ys"]) + lam * (phi - theta)
        err = float(np.linalg.norm(prox_grad))
        print(f"{'iMAML inner stationarity |grad|':42s} abs err {err:.2e}  {_ok(err <= 1e-12)}")
        ok &= err <= 1e-12
    _, g_cg, _ = imaml_meta_gradient_cg(theta, tasks, lam, cg_steps=d)
    ok &= _check("iMAML CG (d steps) vs exact solve", g_cg, g, tol=1e-10)
    _, g_cg1, _ = imaml_meta_gradient_cg(theta, tasks, lam, cg_steps=1)
    print(
        f"{'iMAML CG (1 step) vs exact (info only)':42s} rel err "
        f"{np.linalg.norm(g_cg1 - g) / np.linalg.norm(g):.2e}"
    )

    lrs = rng.uniform(0.05, 0.15, size=d)
    _, g_t, g_a = metasgd_meta_gradient(theta, lrs, tasks, steps)
    fd_t = _central_fd(lambda p: metasgd_meta_gradient(p, lrs, tasks, steps)[0], theta)
    fd_a = _central_fd(lambda a: metasgd_meta_gradient(theta, a, tasks, steps)[0], lrs)
    ok &= _check("Meta-SGD grad_theta vs FD", g_t, fd_t)
    ok &= _check("Meta-SGD grad_lrs vs FD", g_a, fd_a)
    same = metasgd_meta_gradient(theta, np.full(d, lr), tasks, steps)
    ok &= _check(
        "Meta-SGD (uniform lrs) == MAML",
        same[1],
        maml_meta_gradient(theta, tasks, lr, steps)[1],
        tol=1e-12,
    )

    body, head = rng.normal(size=(d, r)) / np.sqrt(d), rng.normal(size=r)
    _, g_body, g_head = anil_meta_gradient(body, head, tasks, lr, steps)
    fd_h = _central_fd(lambda h: anil_meta_loss(body, h, tasks, lr, steps), head)
    ok &= _check("ANIL grad_head vs FD", g_head, fd_h)
    ok &= bool(np.isfinite(g_body).all())
    # With steps = 0 the body gradient has a short closed form: mean X_q^T (X_q B h - y_q) h^T / m.
    _, g_body0, _ = anil_meta_gradient(body, head, tasks, lr, 0)
    exact0 = np.mean([np.outer(grad(body @ head, t["xq"], t["yq"]), head) for t in tasks], axis=0)
    ok &= _check("ANIL grad_body (FD, K=0) vs closed form", g_body0, exact0)

    direction = reptile_direction(theta, tasks, lr, steps)
    ok &= _check(
        "Reptile step == theta - eps * direction",
        reptile_step(theta, tasks, lr, steps, 0.5),
        theta - 0.5 * direction,
        tol=1e-14,
    )
    mixed = mlti_mix(tasks[0], tasks[1], 0.3)
    ok &= _check("MLTI mix", mixed["xq"], 0.3 * tasks[0]["xq"] + 0.7 * tasks[1]["xq"], tol=1e-14)

    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if _self_check() else 1)
