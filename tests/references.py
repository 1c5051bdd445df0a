"""Independent NumPy reference implementations of the metaopt update rules.

These are direct transcriptions of the papers' update rules, written with
NumPy only (no jax / optax / metaopt), in float64.  Parameters are a single
1-D array ``theta``; ``grad(theta)`` returns the gradient and ``hess(theta)``
the Hessian matrix.  The base optimizer of the sharpness-aware methods is
plain SGD: theta_new = theta - lr * direction.  Every optimizer function
returns the trajectory [theta_0, ..., theta_T] as a list of arrays.
"""

import itertools
import math

import numpy as np


def _f64(x):
    return np.array(x, dtype=np.float64, copy=True)


def _unit(v):
    """v / ||v||_2, or zeros when ||v|| == 0."""
    n = np.linalg.norm(v)
    return v / n if n > 0 else np.zeros_like(v)


# ---------------------------------------------------------------- AdEMAMix
def ademamix_alpha_warmup(t, alpha, warmup):
    """AdEMAMix alpha scheduler (Pagliardini et al. 2024, eq. for f_alpha):
    alpha_t = min(t * alpha / T_alpha, alpha)   if T_alpha else alpha."""
    if not warmup:
        return alpha
    return min(t * alpha / warmup, alpha)


def ademamix_b3_warmup(t, b3, b1, warmup):
    """AdEMAMix beta_3 scheduler (Pagliardini et al. 2024, eq. for f_beta3):
        b3_t = min( exp( ln(b1) ln(b3) / ((1 - t/T3) ln(b3) + (t/T3) ln(b1)) ), b3 )
    with T3 = warmup; returns b3 when warmup is falsy.  b3_0 = b1, b3_T3 = b3."""
    if not warmup:
        return b3
    lb1, lb3, frac = math.log(b1), math.log(b3), t / warmup
    return min(math.exp(lb1 * lb3 / ((1.0 - frac) * lb3 + frac * lb1)), b3)


def ademamix_reference(
    grads, theta0, lr, b1, b2, b3, alpha, eps, weight_decay, alpha_warmup=None, b3_warmup=None
):
    """AdEMAMix, Algorithm 1 of Pagliardini, Ablin, Grangier 2024,
    "The AdEMAMix Optimizer: Better, Faster, Older".  For t = 1..T with g = grads[t-1]:
        alpha_t = ademamix_alpha_warmup(t, alpha, alpha_warmup)
        b3_t    = ademamix_b3_warmup(t, b3, b1, b3_warmup)
        m1 = b1 m1 + (1 - b1) g ;  m2 = b3_t m2 + (1 - b3_t) g ;  nu = b2 nu + (1 - b2) g^2
        m1_hat = m1 / (1 - b1^t) ;  nu_hat = nu / (1 - b2^t)     (m2 is NOT bias-corrected)
        theta = theta - lr * ( (m1_hat + alpha_t m2) / (sqrt(nu_hat) + eps) + wd * theta )
    m1, m2, nu start at zero."""
    theta = _f64(theta0)
    m1, m2, nu = np.zeros_like(theta), np.zeros_like(theta), np.zeros_like(theta)
    traj = [theta.copy()]
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        a_t = ademamix_alpha_warmup(t, alpha, alpha_warmup)
        b3_t = ademamix_b3_warmup(t, b3, b1, b3_warmup)
        m1 = b1 * m1 + (1.0 - b1) * g
        m2 = b3_t * m2 + (1.0 - b3_t) * g
        nu = b2 * nu + (1.0 - b2) * g * g
        m1_hat, nu_hat = m1 / (1.0 - b1**t), nu / (1.0 - b2**t)
        theta = theta - lr * ((m1_hat + a_t * m2) / (np.sqrt(nu_hat) + eps) + weight_decay * theta)
        traj.append(theta.copy())
    return traj


def simplified_ademamix_reference(grads, theta0, lr, b1, b2, alpha, eps, weight_decay):
    """Simplified AdEMAMix, Morwani et al. 2025, "Connections between Schedule-Free
    Optimizers, AdEMAMix, and Accelerated SGD Variants".  For t = 1..T:
        m = b1 m + g                      (no (1 - b1) factor, no bias correction)
        nu = b2 nu + (1 - b2) g^2 ;  nu_hat = nu / (1 - b2^t)
        theta = theta - lr * ( (m + alpha g) / (sqrt(nu_hat) + eps) + wd * theta )"""
    theta = _f64(theta0)
    m, nu = np.zeros_like(theta), np.zeros_like(theta)
    traj = [theta.copy()]
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        m, nu = b1 * m + g, b2 * nu + (1.0 - b2) * g * g
        nu_hat = nu / (1.0 - b2**t)
        theta = theta - lr * ((m + alpha * g) / (np.sqrt(nu_hat) + eps) + weight_decay * theta)
        traj.append(theta.copy())
    return traj


# ------------------------------------------------------ sharpness-aware (SGD base)
def sam_reference(grad, theta0, lr, rho, steps):
    """SAM (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently
    Improving Generalization"), SGD base:
        g = grad(theta) ;  e = rho g / ||g||_2  (e = 0 if ||g|| = 0)
        theta = theta - lr * grad(theta + e)"""
    theta = _f64(theta0)
    traj = [theta.copy()]
    for _ in range(steps):
        e = rho * _unit(grad(theta))
        theta = theta - lr * grad(theta + e)
        traj.append(theta.copy())
    return traj


def asam_reference(grad, theta0, lr, rho, eta, steps):
    """ASAM (Kwon et al. 2021, "ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks"), p = 2, elementwise
    normalization operator T_theta = |theta| + eta, SGD base:
        g = grad(theta) ;  T = |theta| + eta
        e = rho T^2 g / ||T g||_2   (e = 0 if ||T g|| = 0)
        theta = theta - lr * grad(theta + e)"""
    theta = _f64(theta0)
    traj = [theta.copy()]
    for _ in range(steps):
        g, T = grad(theta), np.abs(theta) + eta
        n = np.linalg.norm(T * g)
        e = rho * T * T * g / n if n > 0 else np.zeros_like(theta)
        theta = theta - lr * grad(theta + e)
        traj.append(theta.copy())
    return traj


def _gam_run(grad, hvp, theta0, lr, rho, alpha, steps):
    """GAM loop given hvp(x, u, grad_x) ~ H(x) u for unit vectors u."""
    theta = _f64(theta0)
    traj = [theta.copy()]
    for _ in range(steps):
        g = grad(theta)
        f = hvp(theta, _unit(g), g)  # grad of ||grad L|| at theta
        theta_adv = theta + rho * _unit(f)
        g_adv = grad(theta_adv)
        h_norm = rho * hvp(theta_adv, _unit(g_adv), g_adv)
        theta = theta - lr * (g + alpha * h_norm)
        traj.append(theta.copy())
    return traj


def gam_reference(grad, hess, theta0, lr, rho, alpha, steps):
    """GAM (Zhang et al. CVPR 2023, "Gradient Norm Aware Minimization Seeks
    First-Order Flatness and Improves Generalization") with exact Hessians, SGD base:
        g = grad(theta) ;  f = H(theta) g / ||g||        (= grad of ||grad L(theta)||)
        theta_adv = theta + rho f / ||f||
        g_adv = grad(theta_adv) ;  h_norm = rho H(theta_adv) g_adv / ||g_adv||
        theta = theta - lr * (g + alpha h_norm)
    Zero norms give zero directions."""
    return _gam_run(grad, lambda x, u, gx: hess(x) @ u, theta0, lr, rho, alpha, steps)


def gam_fd_reference(grad, theta0, lr, rho, alpha, fd_radius, steps):
    """GAM as in gam_reference, but each Hessian-vector product H(x) u (u a unit
    vector) is replaced by the forward finite difference
        H(x) u ~ (grad(x + r u) - grad(x)) / r,   r = fd_radius."""

    def hvp(x, u, gx):
        return (grad(x + fd_radius * u) - gx) / fd_radius

    return _gam_run(grad, hvp, theta0, lr, rho, alpha, steps)


# ------------------------------------------------------ gradient regularization
def gradient_regularization_reference(grad, theta0, lr, gamma, epsilon, direction, steps):
    """Finite-difference gradient regularization (Karakida et al. 2023,
    "Understanding Gradient Regularization in Deep Learning: Efficient
    Finite-Difference Computation and Implicit Bias").  Penalized loss
        L_GR = L + (gamma/2) ||grad L||^2 ,   grad L_GR = g + gamma H g,
    with H g approximated along the raw (unnormalized) gradient g:
        forward : H g ~ (grad(theta + eps g) - g) / eps
        backward: H g ~ (g - grad(theta - eps g)) / eps
        central : H g ~ (grad(theta + eps g) - grad(theta - eps g)) / (2 eps)
        theta = theta - lr * (g + gamma Hg_approx)"""
    if direction not in ("forward", "backward", "central"):
        raise ValueError(f"unknown direction {direction!r}")
    theta = _f64(theta0)
    traj = [theta.copy()]
    for _ in range(steps):
        g = grad(theta)
        if direction == "forward":
            hg = (grad(theta + epsilon * g) - g) / epsilon
        elif direction == "backward":
            hg = (g - grad(theta - epsilon * g)) / epsilon
        else:
            hg = (grad(theta + epsilon * g) - grad(theta - epsilon * g)) / (2.0 * epsilon)
        theta = theta - lr * (g + gamma * hg)
        traj.append(theta.copy())
    return traj


def gradient_regularization_exact(grad, hess, theta0, lr, gamma, steps):
    """Gradient regularization with the exact Hessian-vector product:
    g = grad(theta) ;  theta = theta - lr * (g + gamma H(theta) g)"""
    theta = _f64(theta0)
    traj = [theta.copy()]
    for _ in range(steps):
        g = grad(theta)
        theta = theta - lr * (g + gamma * (hess(theta) @ g))
        traj.append(theta.copy())
    return traj


# ------------------------------------------------------------- test problems
def quadratic_problem(dim, seed):
    """L(x) = 0.5 x^T A x - b^T x with random SPD A (eigenvalues in [1, 10], so
    condition number ~10).  grad = A x - b, hess = A.
    Returns (loss, grad, hess, theta0)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eig = np.linspace(1.0, 10.0, dim) if dim > 1 else np.array([1.0])
    A = (Q * eig) @ Q.T
    A = 0.5 * (A + A.T)
    b = rng.standard_normal(dim)
    theta0 = rng.standard_normal(dim)
    return (lambda x: 0.5 * x @ A @ x - b @ x, lambda x: A @ x - b, lambda x: A.copy(), theta0)


def logistic_problem(n, dim, seed):
    """L(w) = mean_i [ log(1 + exp(z_i)) - y_i z_i ] + (lam/2) ||w||^2,  z = X w,
    lam = 0.01, X ~ N(0, 1), y in {0, 1}.
    grad = X^T (s - y) / n + lam w,  hess = X^T diag(s (1 - s)) X / n + lam I,
    with s = sigmoid(z).  Returns (loss, grad, hess, theta0)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dim))
    w_true = rng.standard_normal(dim)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-X @ w_true))).astype(np.float64)
    lam = 0.01
    theta0 = 0.1 * rng.standard_normal(dim)

    def sig(z):  # overflow-free logistic sigmoid
        return 0.5 * (1.0 + np.tanh(0.5 * z))

    def loss(w):
        z = X @ w
        return np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * lam * w @ w

    def grad(w):
        return X.T @ (sig(X @ w) - y) / n + lam * w

    def hess(w):
        s = sig(X @ w)
        return (X.T * (s * (1.0 - s))) @ X / n + lam * np.eye(dim)

    return loss, grad, hess, theta0


# ------------------------------------------------------------------ self-checks
if __name__ == "__main__":

    def maxerr(a, b):
        return max(
            float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=False)
        )

    def sgd(grad, theta0, lr, steps):
        th = _f64(theta0)
        out = [th.copy()]
        for _ in range(steps):
            th = th - lr * grad(th)
            out.append(th.copy())
        return out

    def adamw(grads, theta0, lr, b1, b2, eps, wd):
        th, m, v, out = _f64(theta0), 0.0, 0.0, [_f64(theta0)]
        for t, g in enumerate(grads, 1):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            th = th - lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * th)
            out.append(th.copy())
        return out

    def fd_grad(f, x, h=1e-5):
        return np.array([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in np.eye(len(x))])

    results, rng, D, T = {}, np.random.default_rng(0), 6, 25
    grads, th0 = [rng.standard_normal(D) for _ in range(T)], rng.standard_normal(D)
    ql, qg, qh, q0 = quadratic_problem(D, 1)
    ll, lg, lh, l0 = logistic_problem(64, D, 2)

    # problems: analytic derivatives vs central differences; quadratic conditioning
    results["quadratic grad vs FD"] = float(np.max(np.abs(qg(q0) - fd_grad(ql, q0))))
    results["logistic grad vs FD"] = float(np.max(np.abs(lg(l0) - fd_grad(ll, l0))))
    results["logistic hess vs FD"] = float(
        np.max(np.abs(lh(l0) - np.array([fd_grad(lambda x: lg(x)[i], l0) for i in range(D)])))
    )
    assert abs(np.linalg.cond(qh(q0)) - 10.0) < 1e-6

    # AdEMAMix
    results["ademamix alpha=0 == AdamW"] = maxerr(
        ademamix_reference(grads, th0, 1e-2, 0.9, 0.999, 0.9999, 0.0, 1e-8, 0.1),
        adamw(grads, th0, 1e-2, 0.9, 0.999, 1e-8, 0.1),
    )
    g1, b3, a, wd, lr = grads[0], 0.99, 5.0, 0.1, 1e-2
    manual = th0 - lr * ((g1 + a * (1 - b3) * g1) / (np.abs(g1) + 1e-8) + wd * th0)
    results["ademamix one step closed form"] = maxerr(
        ademamix_reference(grads[:1], th0, lr, 0.9, 0.999, b3, a, 1e-8, wd)[1:], [manual]
    )
    assert [ademamix_alpha_warmup(t, 5.0, 10) for t in (0, 5, 20)] == [0.0, 2.5, 5.0]
    assert abs(ademamix_b3_warmup(0, 0.9999, 0.9, 100) - 0.9) < 1e-12
    assert abs(ademamix_b3_warmup(100, 0.9999, 0.9, 100) - 0.9999) < 1e-12
    assert ademamix_b3_warmup(500, 0.9999, 0.9, 100) == 0.9999
    seq = [ademamix_b3_warmup(t, 0.9999, 0.9, 100) for t in range(101)]
    assert all(x <= y for x, y in itertools.pairwise(seq))
    # with warmups, a direct scalar-loop transcription over coordinates
    tw = ademamix_reference(grads, th0, lr, 0.9, 0.999, 0.999, a, 1e-8, wd, 10, 20)
    th, m1, m2, nu = th0.copy(), np.zeros(D), np.zeros(D), np.zeros(D)
    for t, g in enumerate(grads, 1):
        at, fr = min(t * a / 10, a), t / 20
        b3t = min(
            math.exp(
                math.log(0.9) * math.log(0.999) / ((1 - fr) * math.log(0.999) + fr * math.log(0.9))
            ),
            0.999,
        )
        for i in range(D):
            m1[i] = 0.9 * m1[i] + 0.1 * g[i]
            m2[i] = b3t * m2[i] + (1 - b3t) * g[i]
            nu[i] = 0.999 * nu[i] + 0.001 * g[i] ** 2
            th[i] -= lr * (
                (m1[i] / (1 - 0.9**t) + at * m2[i]) / (math.sqrt(nu[i] / (1 - 0.999**t)) + 1e-8)
                + wd * th[i]
            )
    results["ademamix warmups vs scalar loop"] = float(np.max(np.abs(tw[-1] - th)))

    # simplified AdEMAMix: b1=0, alpha=0 is bias-corrected RMSprop (= Adam with b1=0)
    results["simplified b1=0,alpha=0 == Adam(b1=0)"] = maxerr(
        simplified_ademamix_reference(grads, th0, 1e-2, 0.0, 0.999, 0.0, 1e-8, 0.1),
        adamw(grads, th0, 1e-2, 0.0, 0.999, 1e-8, 0.1),
    )
    # momentum is the undamped sum m_T = sum_s b1^(T-s) g_s; wd=0 one-more-step check
    tr = simplified_ademamix_reference(grads, th0, 1e-2, 0.9, 0.99, 2.0, 1e-8, 0.0)
    mT = sum(0.9 ** (T - s) * grads[s - 1] for s in range(1, T + 1))
    nT = sum(0.99 ** (T - s) * 0.01 * grads[s - 1] ** 2 for s in range(1, T + 1)) / (1 - 0.99**T)
    results["simplified closed-form last step"] = float(
        np.max(np.abs(tr[-1] - (tr[-2] - 1e-2 * (mT + 2.0 * grads[-1]) / (np.sqrt(nT) + 1e-8))))
    )

    # SAM / ASAM
    results["SAM rho=0 == SGD"] = maxerr(sam_reference(lg, l0, 0.5, 0.0, 20), sgd(lg, l0, 0.5, 20))
    zero = lambda x: np.zeros_like(x)  # exactly zero gradient -> zero perturbation
    results["SAM/ASAM/GAM zero grad stays put"] = maxerr(
        sam_reference(zero, th0, 0.1, 0.05, 2)
        + asam_reference(zero, th0, 0.1, 0.05, 0.01, 2)
        + gam_reference(zero, lambda x: np.eye(D), th0, 0.1, 0.05, 0.5, 2),
        [th0] * 9,
    )
    A, th, man = qh(0), q0.copy(), []
    for _ in range(10):
        g = qg(th)
        th = th - 0.05 * (g + 0.1 * A @ g / np.linalg.norm(g))
        man.append(th)
    results["SAM quadratic closed form"] = maxerr(sam_reference(qg, q0, 0.05, 0.1, 10)[1:], man)
    results["ASAM rho=0 == SGD"] = maxerr(
        asam_reference(lg, l0, 0.5, 0.0, 0.01, 20), sgd(lg, l0, 0.5, 20)
    )
    results["ASAM(rho/eta, eta=1e8) ~ SAM(rho)"] = maxerr(
        asam_reference(lg, l0, 0.5, 0.05 / 1e8, 1e8, 20), sam_reference(lg, l0, 0.5, 0.05, 20)
    )

    # GAM
    results["GAM alpha=0 == SGD"] = maxerr(
        gam_reference(lg, lh, l0, 0.5, 0.05, 0.0, 20), sgd(lg, l0, 0.5, 20)
    )
    results["GAM FD == exact on quadratic"] = maxerr(
        gam_fd_reference(qg, q0, 0.05, 0.1, 0.5, 1e-3, 20),
        gam_reference(qg, qh, q0, 0.05, 0.1, 0.5, 20),
    )
    th, man = q0.copy(), []
    for _ in range(20):
        g = qg(th)
        ga = qg(th + 0.1 * _unit(A @ g))
        th = th - 0.05 * (g + 0.5 * 0.1 * A @ ga / np.linalg.norm(ga))
        man.append(th)
    results["GAM quadratic exact-Hessian formula"] = maxerr(
        gam_reference(qg, qh, q0, 0.05, 0.1, 0.5, 20)[1:], man
    )
    results["GAM FD (r=1e-6) ~ exact on logistic"] = maxerr(
        gam_fd_reference(lg, l0, 0.5, 0.05, 0.5, 1e-6, 20),
        gam_reference(lg, lh, l0, 0.5, 0.05, 0.5, 20),
    )

    # gradient regularization
    exact_q = gradient_regularization_exact(qg, qh, q0, 0.02, 0.1, 20)
    for d in ("forward", "backward", "central"):
        results[f"GR {d} == exact on quadratic"] = maxerr(
            gradient_regularization_reference(qg, q0, 0.02, 0.1, 1e-3, d, 20), exact_q
        )
    exact_l = gradient_regularization_exact(lg, lh, l0, 0.5, 0.5, 20)
    results["GR central (eps=1e-4) ~ exact on logistic"] = maxerr(
        gradient_regularization_reference(lg, l0, 0.5, 0.5, 1e-4, "central", 20), exact_l
    )
    results["GR forward (eps=1e-6) ~ exact on logistic"] = maxerr(
        gradient_regularization_reference(lg, l0, 0.5, 0.5, 1e-6, "forward", 20), exact_l
    )
    results["GR gamma=0 == SGD"] = maxerr(
        gradient_regularization_reference(lg, l0, 0.5, 0.0, 1e-3, "central", 20),
        sgd(lg, l0, 0.5, 20),
    )
    pen = lambda w: ll(w) + 0.25 * lg(w) @ lg(w)  # gamma = 0.5
    results["GR exact dir == grad of penalized loss (FD)"] = float(
        np.max(np.abs((l0 - exact_l[1]) / 0.5 - fd_grad(pen, l0)))
    )

    tol = {
        "GAM FD (r=1e-6) ~ exact on logistic": 1e-6,
        "GR forward (eps=1e-6) ~ exact on logistic": 1e-6,
        "GR central (eps=1e-4) ~ exact on logistic": 1e-7,
        "ASAM(rho/eta, eta=1e8) ~ SAM(rho)": 1e-8,
        "logistic hess vs FD": 1e-8,
        "quadratic grad vs FD": 1e-8,
        "logistic grad vs FD": 1e-8,
        "GR exact dir == grad of penalized loss (FD)": 1e-8,
    }
    for k, v in results.items():
        print(f"{k:48s} max err {v:.3e}")
        assert v < tol.get(k, 1e-10), k
    print("all reference self-checks passed")
