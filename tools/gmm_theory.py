"""
gmm_theory.py: the paper's Gaussian-mixture theory (Sec. 4, App. A), checked numerically on the CPU.

Setting (paper Eqs. 9-17): one class of a Gaussian mixture, x ~ N(mu, I) in R^d, a training set of n draws,
the OU forward process x_t = r_t x + sigma_t eps with r_t = e^-t, sigma_t = sqrt(1 - e^-2t), the per-class linear
denoiser eps_theta(x_t) = W_t x_t + V_t (c + gamma xi) with one-hot c and xi ~ N(0, I), and the probability-flow ODE
without guidance (w = 0) started from N(0, I). The training set is the only randomness the theory averages over.

Three levels, side by side, on the same random training sets:
  paper    the limits of Lemmas 3-4 as printed: clean N(mu_hat, Sigma), corrupted
           N(mu_hat/(1+g^2), Sigma + g^2/(1+g^2) |mu_hat|^2 I)
  exact    the true optimum of the corrupted loss, whose extra term is rank one, g^2/(1+g^2) mu_hat mu_hat^T,
           and its limit N(mu_hat/(1+g^2), Sigma + g^2/(1+g^2) mu_hat mu_hat^T)
  trained  the denoiser fitted by least squares on sampled draws (i, eps, xi), then the ODE integrated numerically
           from noise, and the generated distribution measured
For each: entropy gain H(corrupt) - H(clean) and dW2^2 = W2^2(truth, clean) - W2^2(truth, corrupt) (> 0: corruption
helps), averaged over training sets.

How the trained level is done (fast and faithful):
  - draws: per training set, 80000 (eps, xi) draws spread evenly over the training points, each used with all four
    sign flips (+-eps, +-xi): a fixed bank of draws, reused at every t (like a fixed noise data set)
  - fit: closed-form least squares (normal equations) at every t the ODE solver visits, not Adam; a few hundred Adam
    steps would only approximate the same minimiser. The normal equations depend on the draws only through their
    moments, so those are computed once (fit_denoiser; tested against numpy lstsq on the explicit draws)
  - ODE: classic RK4, 32 steps on a grid uniform in u = e^-t from T = 12 to t = 0, where the fitted field is smooth;
    the linear denoiser makes the ODE affine, so the map z_T -> z_0 is integrated once (ls_flow) and the generated law
    is the exact Gaussian push-forward of N(0, I) (--gen-samples M fits a Gaussian to M pushed samples instead)

Run:
  python -m tools.gmm_theory                          # default sweep, prints a table (~20 s on 2 shared cores)
  python -m tools.gmm_theory --json out.json --plot out.png
  python -m tools.gmm_theory --quick                  # smoke run, a few seconds
  python -m tools.gmm_theory --help                   # all flags
"""
import argparse
import json
import math
import os
import sys
import time

if __name__ == "__main__":
    # The matrices here are at most 100 x 100: extra BLAS threads only fight over shared cores (measured 5x slower
    # with 2 threads on a busy 2-core machine). Set OMP_NUM_THREADS yourself to override.
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np

from plumbing.common import ArgParser

# ---- setting ----

DEFAULT_GAMMAS = (0.0, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0)
DEFAULT_SETTINGS = ((10, 100), (100, 1300))  # (d, n); n = 1300 is ImageNet's largest class
FORMS = ("paper", "exact", "trained")


def ou_coefficients(t):
    """r_t = e^-t and sigma_t = sqrt(1 - e^-2t) of the OU forward process (paper Eq. 11)."""
    t = np.asarray(t, dtype=np.float64)
    return np.exp(-t), np.sqrt(-np.expm1(-2.0 * t))


def unit_mean(d, norm=1.0):
    """The class mean: a fixed vector of length `norm` (its direction does not matter, the noise is isotropic)."""
    mu = np.zeros(d)
    mu[0] = norm
    return mu


def empirical_stats(X):
    """Empirical mean and biased covariance (1/n normalisation, as in the paper) of a training set X (n, d)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"training set must be (n, d) with n >= 2, got shape {X.shape}")
    mu_hat = X.mean(axis=0)
    centred = X - mu_hat
    return mu_hat, centred.T @ centred / X.shape[0]


def shrink_factor(gamma):
    """a' = gamma^2 / (1 + gamma^2), the weight of the extra covariance term in Lemmas 2 and 4."""
    return gamma * gamma / (1.0 + gamma * gamma)


# ---- Gaussian formulas ----

def _psd_eig(C):
    """Eigen-decomposition of a symmetric PSD matrix with tiny negative eigenvalues clipped to zero."""
    lam, U = np.linalg.eigh((C + np.swapaxes(C, -1, -2)) / 2)
    return np.clip(lam, 0.0, None), U


def psd_sqrt(C):
    """Symmetric square root of a PSD matrix."""
    lam, U = _psd_eig(C)
    return (U * np.sqrt(lam)[..., None, :]) @ np.swapaxes(U, -1, -2)


def gaussian_entropy(cov):
    """Differential entropy (nats) of N(m, cov): 0.5 * log det(2 pi e cov)."""
    cov = np.asarray(cov, dtype=np.float64)
    sign, logdet = np.linalg.slogdet(cov)
    if np.any(sign <= 0):
        raise ValueError("covariance must be positive definite for a finite entropy")
    return 0.5 * (cov.shape[-1] * math.log(2 * math.pi * math.e) + logdet)


def gaussian_w2_squared(m1, C1, m2, C2):
    """W2^2 between N(m1, C1) and N(m2, C2): |m1-m2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)."""
    root1 = psd_sqrt(np.asarray(C1, dtype=np.float64))
    cross = psd_sqrt(root1 @ C2 @ root1)
    diff = np.asarray(m1) - np.asarray(m2)
    def trace(M):
        return np.trace(M, axis1=-2, axis2=-1)
    trace_part = trace(C1) + trace(C2) - 2 * trace(cross)
    return np.sum(diff * diff, axis=-1) + trace_part


def w2_squared_to_truth(mu, mean, cov_eigs):
    """W2^2 from the truth N(mu, I) to N(mean, C) given C's eigenvalues: |mu - mean|^2 + sum (1 - sqrt(lambda))^2."""
    diff = mean - mu
    return np.sum(diff * diff, axis=-1) + np.sum((1.0 - np.sqrt(np.clip(cov_eigs, 0.0, None))) ** 2, axis=-1)


# ---- closed forms: optimal denoisers (Lemmas 1-2 and the exact optimum) and their ODE limits ----

def corrupted_covariance(mu_hat, Sigma, gamma, form):
    """Covariance the corrupted model targets: Sigma + a' |mu_hat|^2 I (paper), Sigma + a' mu_hat mu_hat^T (exact)"""
    a = shrink_factor(gamma)
    if form == "paper":
        return Sigma + a * float(mu_hat @ mu_hat) * np.eye(len(mu_hat))
    if form == "exact":
        return Sigma + a * np.outer(mu_hat, mu_hat)
    raise ValueError(f"form must be 'paper' or 'exact', got {form!r}")


def limit_distribution(mu_hat, Sigma, gamma, form):
    """Mean and covariance of lim_{T->inf} z_T (Lemma 3 for gamma = 0, Lemma 4 as printed, or the exact optimum)."""
    return mu_hat / (1.0 + gamma * gamma), corrupted_covariance(mu_hat, Sigma, gamma, form)


def optimal_denoiser(mu_hat, Sigma, gamma, t, form):
    """(W_t, b_t) of the corrupted linear-denoiser loss: Lemma 1/2 as printed (paper) or the true optimum (exact)."""
    r, sigma = ou_coefficients(t)
    m, C = limit_distribution(mu_hat, Sigma, gamma, form)
    M_inv = np.linalg.inv(sigma ** 2 * np.eye(len(mu_hat)) + r ** 2 * C)
    W = sigma * M_inv
    return W, -r * (W @ m)  # b_t = V_t c(y) = -r_t W_t mu_hat / (1 + gamma^2)


def gaussian_score_field(m, C):
    """Score of the OU marginal of N(m, C) at time t: grad log p_t(x) = -S_t x + beta_t (Lemmas 1-2 over sigma_t)."""
    d = len(m)

    def score_at(t):
        r, sigma = ou_coefficients(t)
        S = np.linalg.inv(sigma ** 2 * np.eye(d) + r ** 2 * C)
        return S, r * (S @ m)
    return score_at


def finite_T_moments(m, C, T):
    """Mean and covariance of z after running the ODE from N(0, I) at time T (Lemma 3/4 finite-T formulas, any C)."""
    lam, U = _psd_eig(C)
    decay = math.exp(-T)
    s_T = 1.0 + (lam - 1.0) * decay ** 2  # variance of the OU marginal at T along each eigen-direction
    mean_gain = 1.0 - np.sqrt(lam) * decay / np.sqrt(s_T)
    return U @ (mean_gain * (U.T @ m)), (U * (lam / s_T)) @ U.T


# ---- trained level: least squares on sampled draws ----

def draw_moments(X, draws_per_point, n_classes=1, rng=None):
    """Second-moment matrix E[z z^T] over the least-squares draws z = [x_i; eps; xi; 1].

    Every training point gets `draws_per_point` base draws (eps, xi), each used in its four sign flips (+-eps, +-xi):
    stratified over i and antithetic in eps and xi, so the odd cross-moments vanish exactly instead of up to 1/sqrt(N)
    noise. The moments are all that least squares sees, so they are computed once per training set and reused for every
    t and gamma (common random numbers make the clean-vs-corrupted comparison paired). explicit_draws() builds the
    same draws one by one for testing.
    """
    rng = np.random.default_rng(rng)
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    K = int(n_classes)
    eps = rng.standard_normal((n, draws_per_point, d))  # (n, m, d)
    xi = rng.standard_normal((n, draws_per_point, K))  # (n, m, K)
    D = 2 * d + K + 1
    S = np.zeros((D, D))
    ix, ie, ik, i1 = slice(0, d), slice(d, 2 * d), slice(2 * d, 2 * d + K), 2 * d + K
    S[ix, ix] = X.T @ X / n
    S[ix, i1] = S[i1, ix] = X.mean(axis=0)
    flat_eps = eps.reshape(-1, d)
    flat_xi = xi.reshape(-1, K)
    S[ie, ie] = flat_eps.T @ flat_eps / len(flat_eps)
    S[ik, ik] = flat_xi.T @ flat_xi / len(flat_xi)
    S[i1, i1] = 1.0
    return S


def explicit_draws(X, draws_per_point, n_classes=1, rng=None):
    """The draws of draw_moments as rows z = [x_i; eps; xi; 1] (4 n m, 2d + K + 1): the reference for tests."""
    rng = np.random.default_rng(rng)
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    eps = rng.standard_normal((n, draws_per_point, d))
    xi = rng.standard_normal((n, draws_per_point, n_classes))
    rows = []
    for s_eps in (1.0, -1.0):
        for s_xi in (1.0, -1.0):
            x_rep = np.repeat(X[:, None, :], draws_per_point, axis=1)
            ones = np.ones((n, draws_per_point, 1))
            block = np.concatenate([x_rep, s_eps * eps, s_xi * xi, ones], axis=-1)  # (n, m, 2d + K + 1)
            rows.append(block.reshape(-1, block.shape[-1]))
    return np.concatenate(rows, axis=0)


def design_from_draws(Z, d, n_classes, t, gamma):
    """Regressors f = [x_t; c + gamma xi] (class 0 one-hot) and targets eps for explicit draws Z at time t."""
    r, sigma = ou_coefficients(t)
    x, eps, xi = Z[:, :d], Z[:, d:2 * d], Z[:, 2 * d:2 * d + n_classes]
    onehot = np.zeros(n_classes)
    onehot[0] = 1.0
    return np.concatenate([r * x + sigma * eps, onehot + gamma * xi], axis=1), eps


def fit_denoiser(S, d, n_classes, t, gammas):
    """Least-squares (W_t, V_t) for every gamma, from the draw moments S: solves the normal equations G theta = H.

    G = E[f f^T], H = E[f eps^T] with f = [r x + sigma eps; e_0 + gamma xi] are assembled block by block from S, which
    is exactly what lstsq on the explicit draws computes (see the tests). Returns W (G, d, d) and V (G, d, K).
    """
    K = int(n_classes)
    gammas = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if K > 1 and np.any(gammas == 0):
        raise ValueError("gamma = 0 with several classes leaves the other columns of V unidentified; use 1 class")
    r, sigma = ou_coefficients(max(float(t), 0.0))
    ix, ie, ik, i1 = slice(0, d), slice(d, 2 * d), slice(2 * d, 2 * d + K), 2 * d + K
    Sxx, Sxe, See = S[ix, ix], S[ix, ie], S[ie, ie]
    Sxk, Sek, Skk = S[ix, ik], S[ie, ik], S[ik, ik]
    mx, me, mk = S[ix, i1], S[ie, i1], S[ik, i1]
    e0 = np.zeros(K)
    e0[0] = 1.0
    g = gammas[:, None, None]
    G = np.zeros((len(gammas), d + K, d + K))
    G[:, :d, :d] = r * r * Sxx + r * sigma * (Sxe + Sxe.T) + sigma * sigma * See
    G[:, :d, d:] = np.outer(r * mx + sigma * me, e0) + g * (r * Sxk + sigma * Sek)
    G[:, d:, :d] = np.swapaxes(G[:, :d, d:], 1, 2)
    G[:, d:, d:] = np.outer(e0, e0) + g * (np.outer(mk, e0) + np.outer(e0, mk)) + g * g * Skk
    H = np.zeros((len(gammas), d + K, d))
    H[:, :d, :] = r * Sxe + sigma * See
    H[:, d:, :] = np.outer(e0, me) + g * Sek.T
    theta = np.linalg.solve(G, H)  # (G, d + K, d); eps_hat = theta^T f
    return np.swapaxes(theta[:, :d, :], 1, 2), np.swapaxes(theta[:, d:, :], 1, 2)


def fitted_score_field(S, d, n_classes, gammas, t_floor=1e-6):
    """Score field (S_t, beta_t) = (W_t / sigma_t, -b_t / sigma_t) of the fitted denoisers, b_t = V_t e_0.

    W_t shrinks like sigma_t as t -> 0, so the score is read off at max(t, t_floor): the field there differs from its
    t = 0 limit by O(t_floor).
    """
    def score_at(t):
        t = max(float(t), t_floor)
        W, V = fit_denoiser(S, d, n_classes, t, gammas)
        _, sigma = ou_coefficients(t)
        return W / sigma, -V[..., 0] / sigma
    return score_at


def least_squares_solution(S, d, n_classes, gammas):
    """fit_denoiser's least-squares optimum at every t at once, in closed form, for draws whose odd moments vanish.

    With stratified antithetic draws (draw_moments) the normal equations solve to
        W_t = sigma_t S_ee M_t^-1,   M_t = r_t^2 (Sigma + (1 - q) mu_hat mu_hat^T) + sigma_t^2 S_ee,
        b_t = V_t e_0 = -r_t q W_t mu_hat,   q = [(e_0 e_0^T + gamma^2 S_xixi)^-1]_00,
    where mu_hat, Sigma, S_ee = mean eps eps^T and S_xixi = mean xi xi^T are the draws' own moments: the exact optimum
    with E[eps eps^T] = I and 1/(1 + gamma^2) replaced by their sampled values. Returns the pieces as a dict; gamma = 0
    is the clean model (q = 1: its single one-hot feature is the intercept).
    """
    K = int(n_classes)
    ix, ie, ik, i1 = slice(0, d), slice(d, 2 * d), slice(2 * d, 2 * d + K), 2 * d + K
    odd = [S[ix, ie], S[ix, ik], S[ie, ik], S[ie, i1], S[ik, i1]]
    if max(np.abs(block).max() for block in odd) > 1e-9 * max(1.0, np.abs(S).max()):
        raise ValueError("least_squares_solution needs draws with vanishing odd moments (use draw_moments)")
    mu_hat = S[ix, i1]
    Sigma = S[ix, ix] - np.outer(mu_hat, mu_hat)
    e0 = np.zeros(K)
    e0[0] = 1.0
    q = [1.0 if g == 0 else float(np.linalg.solve(np.outer(e0, e0) + g * g * S[ik, ik], e0)[0]) for g in gammas]
    return {"mu_hat": mu_hat, "Sigma": Sigma, "See": S[ie, ie], "q": np.array(q)}


def ls_denoiser(sol, t):
    """Dense (W_t, b_t) of least_squares_solution at time t for every gamma: (G, d, d) and (G, d)."""
    r, sigma = ou_coefficients(t)
    mu_hat, Sigma, See = sol["mu_hat"], sol["Sigma"], sol["See"]
    Ws, bs = [], []
    for q in sol["q"]:
        M = r * r * (Sigma + (1 - q) * np.outer(mu_hat, mu_hat)) + sigma * sigma * See
        W = sigma * See @ np.linalg.inv(M)
        Ws.append(W)
        bs.append(-r * q * (W @ mu_hat))
    return np.array(Ws), np.array(bs)


def ls_flow(sol, T=12.0, steps=32):
    """integrate_flow for the least-squares denoisers, done in the generalized eigenbasis of (Sigma, S_ee).

    With L^T S_ee L = I and L^T Sigma L = diag(lam), y = L^T z turns the fitted score into diagonal plus rank one:
    dy/du = u (lam - 1)/D y + u (1 - q) g g^T y / k + q g / k with D = 1 + u^2 (lam - 1), g = w / D, w = L^T mu_hat,
    k = 1 + u^2 (1 - q) w^T g; every evaluation costs O(d^2) instead of O(d^3), and nothing is singular at u = 0.
    Same RK4 grid as integrate_flow. Returns A (G, d, d), c (G, d) with z_0 = A z_T + c.
    """
    from scipy.linalg import eigh

    if steps < 1 or not T > 0:
        raise ValueError(f"need steps >= 1 and T > 0, got steps={steps}, T={T}")
    lam, L = eigh(sol["Sigma"], sol["See"])
    w = L.T @ sol["mu_hat"]  # (d,)
    q = sol["q"][:, None]  # (G, 1)
    d = len(w)

    def velocity(Y, u):
        D = 1.0 + u * u * (lam - 1.0)  # (d,)
        g = w / D
        k = 1.0 + u * u * (1.0 - q) * (w @ g)  # (G, 1)
        out = (u * (lam - 1.0) / D)[:, None] * Y  # (G, d, d+1)
        out += (u * (1.0 - q) / k)[..., None] * g[:, None] * (g @ Y)[:, None, :]
        out[..., d] += q / k * g
        return out

    u_grid = np.linspace(math.exp(-T), 1.0, steps + 1)
    Y = np.zeros((len(q), d, d + 1))
    Y[:, :, :d] = L.T  # y_T = L^T z_T
    for u0, u1 in zip(u_grid[:-1], u_grid[1:]):
        h, um = u1 - u0, 0.5 * (u0 + u1)
        k1 = velocity(Y, u0)
        k2 = velocity(Y + 0.5 * h * k1, um)
        k3 = velocity(Y + 0.5 * h * k2, um)
        k4 = velocity(Y + h * k3, u1)
        Y = Y + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
    back = sol["See"] @ L  # z = L^-T y and L^-T = S_ee L
    return back @ Y[..., :d], Y[..., d] @ back.T


# ---- probability-flow ODE ----

def integrate_flow(score_at, d, T=12.0, steps=32):
    """Integrate dz/dt = -z - grad log p_t(z) from t = T to 0 with z_T ~ N(0, I); the score is -S_t z + beta_t.

    The ODE is affine in z, so it is integrated for the affine map z_0 = A z_T + c itself (the same numbers RK4 would
    give on every noise sample). Classic RK4 on a grid uniform in u = e^-t, where the Gaussian score is a polynomial in
    u; dz/du = (z - S z + beta) / u. Returns A (..., d, d) and c (..., d); any batch shape of S, beta is kept.
    """
    if steps < 1 or not T > 0:
        raise ValueError(f"need steps >= 1 and T > 0, got steps={steps}, T={T}")
    u_grid = np.linspace(math.exp(-T), 1.0, steps + 1)

    def velocity(Y, S, beta, u):
        out = Y - S @ Y  # (..., d, d+1)
        out[..., :, d] += beta
        return out / u

    S0, b0 = score_at(T)
    Y = np.zeros(np.shape(b0)[:-1] + (d, d + 1))
    Y[..., :, :d] = np.eye(d)  # [A | c] = [I | 0] at t = T
    for u0, u1 in zip(u_grid[:-1], u_grid[1:]):
        h, um = u1 - u0, 0.5 * (u0 + u1)
        Sm, bm = score_at(-math.log(um))
        S1, b1 = score_at(-math.log(u1))
        k1 = velocity(Y, S0, b0, u0)
        k2 = velocity(Y + 0.5 * h * k1, Sm, bm, um)
        k3 = velocity(Y + 0.5 * h * k2, Sm, bm, um)
        k4 = velocity(Y + h * k3, S1, b1, u1)
        Y = Y + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
        S0, b0 = S1, b1
    return Y[..., :d], Y[..., d]


def generated_metrics(mu, A, c, noise=None):
    """Entropy and W2^2 to N(mu, I) of the generated z_0 = A z_T + c, z_T ~ N(0, I).

    With noise=None the generated law N(c, A A^T) is read off exactly; with noise (M, d) the samples z_0 are formed and
    a Gaussian is fitted to them (sample mean, unbiased covariance).
    """
    d = A.shape[-1]
    if noise is None:
        sv = np.linalg.svd(A, compute_uv=False)  # singular values of A = sqrt(eigenvalues of A A^T)
        entropy = 0.5 * d * math.log(2 * math.pi * math.e) + np.sum(np.log(sv), axis=-1)
        return entropy, w2_squared_to_truth(mu, c, sv ** 2)
    samples = noise @ np.swapaxes(A, -1, -2) + c[..., None, :]  # (..., M, d)
    mean = samples.mean(axis=-2)
    centred = samples - mean[..., None, :]
    cov = np.swapaxes(centred, -1, -2) @ centred / (noise.shape[0] - 1)
    eigs = np.linalg.eigvalsh(cov)
    entropy = 0.5 * d * math.log(2 * math.pi * math.e) + 0.5 * np.sum(np.log(eigs), axis=-1)
    return entropy, w2_squared_to_truth(mu, mean, eigs)


# ---- one setting: many training sets, three levels ----

def closed_form_metrics(mu, mu_hat, Sigma, gammas, form):
    """Entropy gain and dW2^2 of one training set's closed-form limits, for every gamma: two arrays (G,)."""
    lam_clean = np.linalg.eigvalsh(Sigma)
    if lam_clean[0] <= 0:
        raise ValueError("the empirical covariance is singular (need n > d)")
    w2_clean = w2_squared_to_truth(mu, mu_hat, lam_clean)
    a = np.array([shrink_factor(g) for g in gammas])
    means = mu_hat[None, :] / (1.0 + np.asarray(gammas)[:, None] ** 2)  # (G, d)
    if form == "paper":
        lam = lam_clean[None, :] + (a * float(mu_hat @ mu_hat))[:, None]  # isotropic shift of every eigenvalue
    else:
        lam = np.linalg.eigvalsh(Sigma[None] + a[:, None, None] * np.outer(mu_hat, mu_hat)[None])
    gain = 0.5 * np.sum(np.log(lam) - np.log(lam_clean)[None, :], axis=1)
    return gain, w2_clean - w2_squared_to_truth(mu, means, lam)


def trained_metrics(mu, X, gammas, draws_per_point, n_classes, T, steps, gen_samples, rng):
    """Entropy gain, dW2^2 and clean W2^2 of the fitted-and-integrated linear denoisers for one training set."""
    d = X.shape[1]
    S = draw_moments(X, draws_per_point, n_classes, rng)
    sol = least_squares_solution(S, d, n_classes, [0.0] + [g for g in gammas if g > 0])  # clean model first
    A, c = ls_flow(sol, T, steps)
    noise = rng.standard_normal((gen_samples, d)) if gen_samples else None  # shared by all gammas: paired comparison
    entropy, w2 = generated_metrics(mu, A, c, noise)
    idx, j = [], 0
    for g in gammas:  # gamma = 0 is the clean model itself
        j += g > 0
        idx.append(j if g > 0 else 0)
    return entropy[idx] - entropy[0], w2[0] - w2[idx], w2[0]


def run_setting(d, n, gammas, trials, rng, mu_norm=1.0, draws=80000, n_classes=1, T=12.0, steps=32, gen_samples=0,
                trained=True, draw_rng=None):
    """All three levels on `trials` random training sets of size n in R^d: per-set arrays, keyed by metric name.

    rng draws the training sets, draw_rng (default: rng) the least-squares draws and generation noise; keeping them
    apart makes the closed-form columns independent of --draws.
    """
    draw_rng = rng if draw_rng is None else draw_rng
    if n <= d:
        raise ValueError(f"need n > d for a full-rank empirical covariance, got d={d}, n={n}")
    mu = unit_mean(d, mu_norm)
    draws_per_point = max(1, math.ceil(draws / n))
    G = len(gammas)
    out = {f"{key}_{form}": np.zeros((trials, G)) for key in ("entropy_gain", "dw2") for form in FORMS}
    out["w2sq_clean"] = np.zeros(trials)
    out["w2sq_clean_trained"] = np.zeros(trials)
    out["sets"] = []
    for k in range(trials):
        X = mu + rng.standard_normal((n, d))  # (n, d) one training set
        mu_hat, Sigma = empirical_stats(X)
        out["sets"].append((mu_hat, Sigma))
        for form in ("paper", "exact"):
            out[f"entropy_gain_{form}"][k], out[f"dw2_{form}"][k] = closed_form_metrics(mu, mu_hat, Sigma, gammas, form)
        out["w2sq_clean"][k] = w2_squared_to_truth(mu, mu_hat, np.linalg.eigvalsh(Sigma))
        if trained:
            gain, dw2, w2c = trained_metrics(mu, X, gammas, draws_per_point, n_classes, T, steps, gen_samples,
                                             draw_rng)
            out["entropy_gain_trained"][k], out["dw2_trained"][k], out["w2sq_clean_trained"][k] = gain, dw2, w2c
    out["mu"] = mu
    return out


def crossover(mu, sets, form, gammas=(), values=()):
    """gamma where the set-averaged closed-form dW2^2 changes sign (corruption stops helping), or None.

    The bracket comes from the sweep's own grid (gammas, values) when it has a sign change, else from a scan up to 5.
    """
    from scipy.optimize import brentq

    mu_hats = np.array([m for m, _ in sets])  # (N, d)
    Sigmas = np.array([S for _, S in sets])  # (N, d, d)
    lam_clean = np.linalg.eigvalsh(Sigmas)
    w2_clean = w2_squared_to_truth(mu, mu_hats, lam_clean)
    outers = mu_hats[:, :, None] * mu_hats[:, None, :]

    def mean_dw2(g):
        a = shrink_factor(g)
        if form == "paper":
            lam = lam_clean + a * np.sum(mu_hats ** 2, axis=1, keepdims=True)
        else:
            lam = np.linalg.eigvalsh(Sigmas + a * outers)
        return float(np.mean(w2_clean - w2_squared_to_truth(mu, mu_hats / (1 + g * g), lam)))

    points = list(zip(gammas, values))
    if grid_crossover(gammas, values) is None:
        points = [(g, mean_dw2(g)) for g in np.geomspace(1e-3, 5.0, 16)]
    for (g0, v0), (g1, v1) in zip(points, points[1:]):
        if v0 > 0 >= v1:
            return float(brentq(mean_dw2, g0, g1, xtol=1e-4))
    return None


def grid_crossover(gammas, values):
    """gamma where a curve sampled on the gamma grid first goes from > 0 to <= 0, by linear interpolation, or None."""
    for g0, g1, v0, v1 in zip(gammas, gammas[1:], values, values[1:]):
        if v0 > 0 >= v1:
            return float(g0 + (g1 - g0) * v0 / (v0 - v1))
    return None


# ---- sweep ----

def thm2_leading(d, n, gamma, mu_norm):
    """Theorem 2's lower bound without its o(gamma^4 d) term: gamma^2 [2d/n + (sqrt(n/(n-1)) - 1)(d^2/n + d |mu|^2)]."""
    return gamma ** 2 * (2 * d / n + (math.sqrt(n / (n - 1)) - 1) * (d * d / n + d * mu_norm ** 2))


def sweep(settings=DEFAULT_SETTINGS, trials=(200, 50), gammas=DEFAULT_GAMMAS, seed=0, mu_norm=1.0, draws=80000,
          n_classes=1, T=12.0, steps=32, gen_samples=0, trained=True):
    """Run every (d, n) setting; returns {"rows": [...], "settings": [...], "config": {...}}."""
    gammas = [float(g) for g in gammas]
    _check_sweep_args(settings, trials, gammas, mu_norm, draws, n_classes, T, steps, gen_samples)
    children = np.random.SeedSequence(seed).spawn(len(settings))
    rows, summaries = [], []
    for (d, n), n_trials, child in zip(settings, trials, children):
        data_seed, draw_seed = child.spawn(2)
        res = run_setting(d, n, gammas, n_trials, np.random.default_rng(data_seed), mu_norm, draws, n_classes, T, steps,
                          gen_samples, trained, np.random.default_rng(draw_seed))
        for j, g in enumerate(gammas):
            row = {"d": d, "n": n, "gamma": g, "trials": n_trials}
            for key in ("entropy_gain", "dw2"):
                for form in FORMS:
                    vals = res[f"{key}_{form}"][:, j]
                    ok = trained or form != "trained"
                    row[f"{key}_{form}"] = float(vals.mean()) if ok else None
                    row[f"{key}_{form}_se"] = float(vals.std(ddof=1) / math.sqrt(n_trials)) if ok else None
                if trained:  # paired over sets: how far the trained level is from the exact closed form
                    diff = res[f"{key}_trained"][:, j] - res[f"{key}_exact"][:, j]
                    row[f"{key}_trained_minus_exact"] = float(diff.mean())
                    row[f"{key}_trained_minus_exact_se"] = float(diff.std(ddof=1) / math.sqrt(n_trials))
            row["dw2_thm2_leading"] = thm2_leading(d, n, g, mu_norm)
            row["w2sq_clean_exact"] = float(res["w2sq_clean"].mean())
            row["w2sq_clean_trained"] = float(res["w2sq_clean_trained"].mean()) if trained else None
            rows.append(row)
        mine = [r for r in rows if r["d"] == d and r["n"] == n]
        summaries.append({
            "d": d, "n": n, "trials": n_trials, "inv_sqrt_n": 1 / math.sqrt(n),
            "crossover_paper": crossover(res["mu"], res["sets"], "paper", gammas, [r["dw2_paper"] for r in mine]),
            "crossover_exact": crossover(res["mu"], res["sets"], "exact", gammas, [r["dw2_exact"] for r in mine]),
            "crossover_grid_paper": grid_crossover(gammas, [r["dw2_paper"] for r in mine]),
            "crossover_grid_exact": grid_crossover(gammas, [r["dw2_exact"] for r in mine]),
            "crossover_grid_trained": grid_crossover(gammas, [r["dw2_trained"] for r in mine]) if trained else None,
        })
    config = {"gammas": gammas, "seed": seed, "mu_norm": mu_norm, "draws": draws, "classes": n_classes, "T": T,
              "steps": steps, "gen_samples": gen_samples, "trained": trained}
    return {"rows": rows, "settings": summaries, "config": config}


def _check_sweep_args(settings, trials, gammas, mu_norm, draws, n_classes, T, steps, gen_samples):
    """Raise ValueError naming the first bad argument."""
    if len(settings) != len(trials):
        raise ValueError(f"{len(settings)} settings but {len(trials)} trial counts")
    for d, n in settings:
        if d < 1 or n <= d:
            raise ValueError(f"setting (d={d}, n={n}): need d >= 1 and n > d")
    if any(t < 2 for t in trials):
        raise ValueError(f"trials must be >= 2 (a standard error needs two sets), got {list(trials)}")
    if not gammas or any(not (g >= 0 and math.isfinite(g)) for g in gammas):
        raise ValueError(f"gammas must be finite and >= 0, got {gammas}")
    if list(gammas) != sorted(gammas) or len(set(gammas)) != len(gammas):
        raise ValueError(f"gammas must be strictly increasing, got {gammas}")
    if not (mu_norm > 0 and math.isfinite(mu_norm)):
        raise ValueError(f"mu norm must be > 0, got {mu_norm}")
    checks = (("draws", draws, draws >= 1), ("classes", n_classes, n_classes >= 1), ("steps", steps, steps >= 1),
              ("gen-samples", gen_samples, gen_samples == 0 or gen_samples >= 2))
    for name, value, ok in checks:
        if not ok:
            raise ValueError(f"{name} = {value} is out of range (draws, classes, steps >= 1; gen-samples 0 or >= 2)")
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"T must be > 0, got {T}")


# ---- output ----

def format_table(result):
    """The sweep as a readable text table, one line per (d, n, gamma), with a crossover note per setting."""
    lines = [
        "entropy gain H = H(corrupt) - H(clean) [nats]; dW2^2 = W2^2(truth, clean) - W2^2(truth, corrupt), > 0: helps",
        "means over random training sets; trained: +- one standard error over sets",
        "thm2 lead = gamma^2 [2d/n + (sqrt(n/(n-1)) - 1)(d^2/n + d|mu|^2)]: Theorem 2's bound without o(gamma^4 d)",
        f"{'d':>4} {'n':>5} {'gamma':>6} | {'H paper':>9} {'H exact':>9} {'H trained':>19} |"
        f" {'dW2 paper':>10} {'dW2 exact':>10} {'dW2 trained':>21} {'thm2 lead':>10}",
    ]
    lines.append("-" * len(lines[-1]))
    for r in result["rows"]:
        def trained(key, width):
            if r[f"{key}_trained"] is None:
                return f"{'-':>{width}}"
            return f"{r[f'{key}_trained']:>{width - 10}.5f} +-{r[f'{key}_trained_se'] or 0.0:.1e}"
        lines.append(
            f"{r['d']:>4} {r['n']:>5} {r['gamma']:>6.3g} |"
            f" {r['entropy_gain_paper']:>9.4f} {r['entropy_gain_exact']:>9.4f}"
            f" {trained('entropy_gain', 19)} | {r['dw2_paper']:>10.5f} {r['dw2_exact']:>10.5f} {trained('dw2', 21)}"
            f" {r['dw2_thm2_leading']:>10.5f}")
    for s in result["settings"]:
        def fmt(x):
            return "none in range" if x is None else f"{x:.3f}"
        lines.append(f"d={s['d']} n={s['n']} ({s['trials']} sets): corruption stops helping (dW2^2 = 0) at gamma = "
                     f"{fmt(s['crossover_paper'])} paper, {fmt(s['crossover_exact'])} exact; "
                     f"linear interpolation on the "
                     f"gamma grid: {fmt(s['crossover_grid_paper'])} paper, {fmt(s['crossover_grid_exact'])} exact, "
                     f"{fmt(s['crossover_grid_trained'])} trained; Theorem 2's scale 1/sqrt(n) = {s['inv_sqrt_n']:.3f}")
    return "\n".join(lines)


def save_plot(result, path):
    """Entropy gain and dW2^2 against gamma per setting, with the crossover and 1/sqrt(n) marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["settings"]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.8 * len(settings)), squeeze=False)
    styles = {"paper": ("tab:red", "-", "o"), "exact": ("tab:blue", "-", "s"), "trained": ("k", ":", "x")}
    for row_axes, s in zip(axes, settings):
        rows = [r for r in result["rows"] if r["d"] == s["d"] and r["n"] == s["n"]]
        g = np.array([r["gamma"] for r in rows])
        for ax, key, title in zip(row_axes, ("entropy_gain", "dw2"), ("entropy gain H(corrupt) - H(clean)",
                                                                      "dW2^2 = W2^2(clean) - W2^2(corrupt)")):
            for form, (color, ls, marker) in styles.items():
                vals = [r[f"{key}_{form}"] for r in rows]
                if None in vals:
                    continue
                se = [r[f"{key}_{form}_se"] or 0.0 for r in rows]
                ax.errorbar(g, vals, yerr=se, color=color, ls=ls, marker=marker, ms=4, capsize=2, label=form)
            ax.axvline(s["inv_sqrt_n"], color="gray", ls="-.", lw=1, label="1/sqrt(n) (Thm 2)")
            if key == "dw2":
                ax.axhline(0.0, color="gray", lw=0.8)
                for form in ("paper", "exact"):
                    x = s[f"crossover_{form}"]
                    if x is not None:
                        ax.axvline(x, color=styles[form][0], ls=":", lw=1, label=f"stops helping ({form}) {x:.2f}")
                ax.set_yscale("symlog", linthresh=1e-4)
            else:
                ax.set_yscale("symlog", linthresh=1e-4)
                ax.set_ylim(bottom=0.0)
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_xlim(0.0, 1.15 * g.max())
            ax.set_xlabel("gamma")
            ax.set_title(f"d={s['d']}, n={s['n']}: {title}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- CLI ----

def _gamma_list(text):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}")


def _check_output_path(path, flag):
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory")
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path!r}: directory {parent!r} does not exist")


def main(argv=None):
    """Command-line entry point; returns the exit code."""
    p = ArgParser(prog="python -m tools.gmm_theory",
                  description="Numerical check of the paper's Gaussian-mixture theory (paper form, exact "
                                    "optimum, trained linear denoiser).")
    p.add_argument("--json", help="write {'rows': [...], 'settings': [...], 'config': {...}} here")
    p.add_argument("--plot", help="save entropy gain and dW2^2 against gamma here (png/pdf)")
    p.add_argument("--trials-d10", type=int, help="training sets for (d=10, n=100) (default 200, --quick 20)")
    p.add_argument("--trials-d100", type=int, help="training sets for (d=100, n=1300) (default 50, --quick 6)")
    p.add_argument("--gammas", type=_gamma_list, default=list(DEFAULT_GAMMAS), help="comma list (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mu-norm", type=float, default=1.0, help="|mu| of the class mean (default 1)")
    p.add_argument("--draws", type=int, help="(eps, xi) base draws per training set for least squares, each used "
                                             "4x antithetically (default 80000, --quick 4000)")
    p.add_argument("--classes", type=int, default=1, help="one-hot width |Y| of c(y) and xi (default 1)")
    p.add_argument("--T", type=float, default=12.0, help="ODE start time (default 12)")
    p.add_argument("--steps", type=int, default=32, help="RK4 steps from T to 0 (default 32)")
    p.add_argument("--gen-samples", type=int, default=0,
                   help="fit the generated Gaussian to this many ODE samples (default 0: the exact push-forward)")
    p.add_argument("--no-trained", action="store_true", help="closed forms only")
    p.add_argument("--quick", action="store_true", help="smoke run: 20/6 sets, 4000 draws (explicit flags win)")
    args = p.parse_args(argv)
    defaults = (20, 6, 4000) if args.quick else (200, 50, 80000)
    trials = tuple(v if v is not None else dv for v, dv in zip((args.trials_d10, args.trials_d100), defaults))
    draws = args.draws if args.draws is not None else defaults[2]
    try:
        for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
            if path:
                _check_output_path(path, flag)
        start = time.perf_counter()
        result = sweep(DEFAULT_SETTINGS, trials, args.gammas, args.seed, args.mu_norm, draws, args.classes, args.T,
                       args.steps, args.gen_samples, trained=not args.no_trained)
    except ValueError as exc:
        print(f"python -m tools.gmm_theory: error: {exc}", file=sys.stderr)
        return 2
    result["seconds"] = time.perf_counter() - start
    print(format_table(result))
    print(f"({result['seconds']:.1f} s)")
    try:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        if args.plot:
            save_plot(result, args.plot)
    except (OSError, ValueError) as exc:
        print(f"python -m tools.gmm_theory: error: cannot write output: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
