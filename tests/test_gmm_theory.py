"""Tests for gmm_theory.py: Gaussian formulas against scipy, the exact optimum against least squares, the closed-form
limits against the ODE integrated numerically, the sign of dW2^2, and the CLI's error paths."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from scipy.integrate import solve_ivp

from tools import gmm_theory as gt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spd(d, rng, floor=0.2):
    A = rng.standard_normal((d, d))
    return A @ A.T / d + floor * np.eye(d)


def _training_set(d, n, seed):
    rng = np.random.default_rng(seed)
    X = gt.unit_mean(d) + rng.standard_normal((n, d))
    return X, *gt.empirical_stats(X)


# ---- Gaussian formulas ----

def test_entropy_matches_scipy():
    rng = np.random.default_rng(0)
    for d in (1, 3, 7):
        C = _spd(d, rng)
        reference = scipy.stats.multivariate_normal(np.zeros(d), C).entropy()
        assert gt.gaussian_entropy(C) == pytest.approx(reference, abs=1e-10)
    with pytest.raises(ValueError):
        gt.gaussian_entropy(np.diag([1.0, -1.0]))


def test_w2_matches_sqrtm_and_1d_formula():
    rng = np.random.default_rng(1)
    for d in (2, 5):
        m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
        C1, C2 = _spd(d, rng), _spd(d, rng)
        r1 = np.real(scipy.linalg.sqrtm(C1))
        ref = np.sum((m1 - m2) ** 2) + np.trace(C1 + C2 - 2 * np.real(scipy.linalg.sqrtm(r1 @ C2 @ r1)))
        assert gt.gaussian_w2_squared(m1, C1, m2, C2) == pytest.approx(ref, rel=1e-9)
        assert gt.gaussian_w2_squared(m1, C1, m2, C2) == pytest.approx(gt.gaussian_w2_squared(m2, C2, m1, C1), rel=1e-9)
        # truth N(mu, I) shortcut used by the sweep
        assert gt.w2_squared_to_truth(m1, m2, np.linalg.eigvalsh(C2)) == pytest.approx(
            gt.gaussian_w2_squared(m1, np.eye(d), m2, C2), rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert gt.gaussian_w2_squared(np.array([0.3]), np.array([[4.0]]), np.array([-1.0]), np.array([[0.25]])) == \
        pytest.approx(1.3 ** 2 + 1.5 ** 2, rel=1e-12)


def test_entropy_gains_follow_determinant_lemma():
    _, mu_hat, Sigma = _training_set(6, 30, 2)
    g = 0.4
    a = gt.shrink_factor(g)
    gain_exact, _ = gt.closed_form_metrics(gt.unit_mean(6), mu_hat, Sigma, [g], "exact")
    gain_paper, _ = gt.closed_form_metrics(gt.unit_mean(6), mu_hat, Sigma, [g], "paper")
    H0 = gt.gaussian_entropy(Sigma)
    for form, gain in (("exact", gain_exact[0]), ("paper", gain_paper[0])):
        H1 = gt.gaussian_entropy(gt.corrupted_covariance(mu_hat, Sigma, g, form))
        assert gain == pytest.approx(H1 - H0, abs=1e-10)
    # rank-one term: 0.5 log(1 + a mu^T Sigma^-1 mu); isotropic: 0.5 sum log(1 + a |mu|^2 / lambda_i)
    assert gain_exact[0] == pytest.approx(0.5 * math.log1p(a * mu_hat @ np.linalg.solve(Sigma, mu_hat)), abs=1e-10)
    lam = np.linalg.eigvalsh(Sigma)
    assert gain_paper[0] == pytest.approx(0.5 * np.sum(np.log1p(a * (mu_hat @ mu_hat) / lam)), abs=1e-10)


# ---- the exact optimum against least squares ----

def test_exact_optimum_matches_plain_least_squares_not_lemma2():
    """Plain iid draws (i, eps, xi), numpy lstsq, |Y| = 2 one-hot: the rank-one optimum, not Lemma 2's isotropic one."""
    d, n, K, gamma, t = 3, 40, 2, 0.7, 0.5
    X, mu_hat, Sigma = _training_set(d, n, 3)
    rng = np.random.default_rng(4)
    N = 200_000
    r, sigma = gt.ou_coefficients(t)
    eps = rng.standard_normal((N, d))
    x_t = r * X[rng.integers(0, n, N)] + sigma * eps
    cond = np.zeros((N, K))
    cond[:, 0] = 1.0
    cond += gamma * rng.standard_normal((N, K))
    theta = np.linalg.lstsq(np.hstack([x_t, cond]), eps, rcond=None)[0]  # eps ~ W x_t + V (c + gamma xi)
    W_fit, V_fit = theta[:d].T, theta[d:].T
    W_ex, b_ex = gt.optimal_denoiser(mu_hat, Sigma, gamma, t, "exact")
    W_pa, b_pa = gt.optimal_denoiser(mu_hat, Sigma, gamma, t, "paper")
    # iid draws re-weight the training points: the fit is the optimum for a slightly perturbed mu_hat, Sigma
    assert np.abs(W_fit - W_ex).max() < 0.01 and np.abs(V_fit[:, 0] - b_ex).max() < 0.01
    assert np.abs(V_fit[:, 1]).max() < 0.01  # the other class's column goes to zero
    assert np.abs(W_fit - W_pa).max() > 0.05  # ...and Lemma 2 as printed is visibly off


def test_moment_fit_equals_lstsq_on_explicit_draws():
    d, n, K, m = 3, 12, 2, 5
    X, _, _ = _training_set(d, n, 5)
    Z = gt.explicit_draws(X, m, K, rng=6)
    S = gt.draw_moments(X, m, K, rng=6)
    np.testing.assert_allclose(S, Z.T @ Z / len(Z), atol=1e-12)
    for t in (0.05, 0.8, 4.0):
        for gamma in (0.3, 1.5):
            F, target = gt.design_from_draws(Z, d, K, t, gamma)
            theta = np.linalg.lstsq(F, target, rcond=None)[0]
            W, V = gt.fit_denoiser(S, d, K, t, [gamma])
            np.testing.assert_allclose(W[0], theta[:d].T, atol=1e-9)
            np.testing.assert_allclose(V[0], theta[d:].T, atol=1e-9)


def test_closed_form_least_squares_matches_normal_equations():
    d, n, K = 4, 20, 3
    X, _, _ = _training_set(d, n, 7)
    S = gt.draw_moments(X, 30, K, rng=8)
    gammas = [0.1, 0.6, 2.0]
    sol = gt.least_squares_solution(S, d, K, [0.0] + gammas)
    S1 = gt.draw_moments(X, 30, 1, rng=8)  # same eps; the clean model sees a single one-hot
    for t in (1e-3, 0.3, 2.5):
        W, b = gt.ls_denoiser(sol, t)
        W_ne, V_ne = gt.fit_denoiser(S, d, K, t, gammas)
        np.testing.assert_allclose(W[1:], W_ne, atol=1e-10)
        np.testing.assert_allclose(b[1:], V_ne[..., 0], atol=1e-10)
        W0, V0 = gt.fit_denoiser(S1, d, 1, t, [0.0])
        np.testing.assert_allclose(W[0], W0[0], atol=1e-10)
        np.testing.assert_allclose(b[0], V0[0, :, 0], atol=1e-10)
    Z = gt.explicit_draws(X, 2, K, rng=9)
    Z[:, d] += 0.1  # a biased eps breaks the antithetic structure the closed form relies on
    with pytest.raises(ValueError):
        gt.least_squares_solution(Z.T @ Z / len(Z), d, K, gammas)


# ---- closed-form limits against the ODE integrated numerically ----

@pytest.mark.parametrize("form", ["paper", "exact"])
def test_ode_matches_lemma_3_4_finite_T_and_limits(form):
    _, mu_hat, Sigma = _training_set(4, 25, 10)
    gamma = 0.5
    m, C = gt.limit_distribution(mu_hat, Sigma, gamma, form)
    for T in (1.5, 12.0):
        A, c = gt.integrate_flow(gt.gaussian_score_field(m, C), 4, T, steps=64)
        mean_T, cov_T = gt.finite_T_moments(m, C, T)
        np.testing.assert_allclose(c, mean_T, atol=1e-8)
        np.testing.assert_allclose(A @ A.T, cov_T, atol=1e-7)
    np.testing.assert_allclose(c, m, atol=1e-4)  # T = 12: the limit of Lemmas 3-4
    np.testing.assert_allclose(A @ A.T, C, atol=1e-4)


def test_finite_T_moments_match_lemma_4_as_printed():
    """Lemma 4's per-eigendirection formulas, transcribed literally, with a = g^2/(1+g^2) |mu_hat|^2."""
    _, mu_hat, Sigma = _training_set(3, 15, 11)
    gamma, T = 0.8, 0.7
    a = gt.shrink_factor(gamma) * mu_hat @ mu_hat
    lam, U = np.linalg.eigh(Sigma)
    e = (1 - np.sqrt(lam + a) * math.exp(-T) / np.sqrt(1 + (lam - 1 + a) * math.exp(-2 * T))) / (1 + gamma ** 2)
    v = (lam + a) / (1 + (lam - 1 + a) * math.exp(-2 * T))
    mean_T, cov_T = gt.finite_T_moments(*gt.limit_distribution(mu_hat, Sigma, gamma, "paper"), T)
    np.testing.assert_allclose(mean_T, U @ np.diag(e) @ U.T @ mu_hat, atol=1e-12)
    np.testing.assert_allclose(cov_T, U @ np.diag(v) @ U.T, atol=1e-12)


def test_rk4_flow_agrees_with_scipy_solve_ivp_in_t():
    d = 3
    _, mu_hat, Sigma = _training_set(d, 20, 12)
    W_of = lambda t: gt.optimal_denoiser(mu_hat, Sigma, 0.6, t, "exact")  # noqa: E731

    def rhs(t, z):  # forward-time PF ODE dz/dt = -z + (W_t z + b_t) / sigma_t, run backwards
        W, b = W_of(t)
        return -z + (W @ z + b) / gt.ou_coefficients(t)[1]

    T = 6.0
    A, c = gt.integrate_flow(gt.gaussian_score_field(*gt.limit_distribution(mu_hat, Sigma, 0.6, "exact")), d, T, 32)
    for z_T in np.random.default_rng(13).standard_normal((3, d)):
        sol = solve_ivp(rhs, (T, 1e-7), z_T, method="DOP853", rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sol.y[:, -1], A @ z_T + c, atol=1e-5)


def test_structured_flow_matches_dense_flow_of_fitted_denoiser():
    d = 4
    X, _, _ = _training_set(d, 30, 14)
    S = gt.draw_moments(X, 25, 1, rng=15)
    gammas = [0.0, 0.2, 0.9]
    A_dense, c_dense = gt.integrate_flow(gt.fitted_score_field(S, d, 1, gammas), d, 10.0, 24)
    A_fast, c_fast = gt.ls_flow(gt.least_squares_solution(S, d, 1, gammas), 10.0, 24)
    np.testing.assert_allclose(A_fast, A_dense, atol=1e-7)
    np.testing.assert_allclose(c_fast, c_dense, atol=1e-7)


def test_trained_level_lands_on_exact_form_not_paper_form():
    d, n = 5, 60
    X, mu_hat, Sigma = _training_set(d, n, 16)
    mu, gammas = gt.unit_mean(d), [0.0, 0.3, 1.0]
    gain, dw2, _ = gt.trained_metrics(mu, X, gammas, 2000, 1, 12.0, 32, 0, np.random.default_rng(17))
    gain_ex, dw2_ex = gt.closed_form_metrics(mu, mu_hat, Sigma, gammas, "exact")
    gain_pa, _ = gt.closed_form_metrics(mu, mu_hat, Sigma, gammas, "paper")
    np.testing.assert_allclose(gain, gain_ex, atol=5e-3)
    np.testing.assert_allclose(dw2, dw2_ex, atol=5e-3)
    assert np.all(np.abs(gain - gain_pa)[1:] > 0.05)
    # generated samples, Gaussian fit: same numbers up to sampling error
    gain_s, dw2_s, _ = gt.trained_metrics(mu, X, gammas, 2000, 1, 12.0, 32, 40_000, np.random.default_rng(17))
    np.testing.assert_allclose(gain_s, gain, atol=2e-3)
    np.testing.assert_allclose(dw2_s, dw2, atol=1e-2)


# ---- slight corruption helps, severe hurts ----

def test_dw2_positive_for_small_gamma_negative_for_gamma_one():
    gammas = [0.03, 0.1, 1.0]
    res = gt.run_setting(10, 100, gammas, 150, np.random.default_rng(18), trained=False)
    for form in ("paper", "exact"):
        mean = res[f"dw2_{form}"].mean(axis=0)
        se = res[f"dw2_{form}"].std(axis=0, ddof=1) / math.sqrt(150)
        assert np.all(mean[:2] > 4 * se[:2]), (form, mean, se)
        assert mean[2] < -4 * se[2], (form, mean, se)
        assert np.all(res[f"entropy_gain_{form}"] > 0)
    # the crossover sits between the helping and hurting gammas, and dW2^2 averages to ~0 there
    g_star = gt.crossover(res["mu"], res["sets"], "exact")
    assert 0.1 < g_star < 1.0
    at_star = [gt.closed_form_metrics(res["mu"], m, S, [g_star], "exact")[1][0] for m, S in res["sets"]]
    assert abs(np.mean(at_star)) < 1e-3


def test_sweep_rows_and_determinism():
    kw = dict(settings=((4, 30),), trials=(3,), gammas=(0.0, 0.2, 1.0), draws=600)
    a, b = gt.sweep(seed=1, **kw), gt.sweep(seed=1, **kw)
    assert a["rows"] == b["rows"]
    assert [r["gamma"] for r in a["rows"]] == [0.0, 0.2, 1.0]
    assert a["rows"][0]["dw2_trained"] == 0.0 and a["rows"][0]["entropy_gain_exact"] == 0.0
    # the closed-form columns do not depend on the least-squares draws
    c = gt.sweep(seed=1, **{**kw, "draws": 900})
    assert [r["dw2_exact"] for r in c["rows"]] == [r["dw2_exact"] for r in a["rows"]]
    with pytest.raises(ValueError):
        gt.sweep(settings=((5, 5),), trials=(3,))


# ---- CLI ----

def test_cli_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    rc = gt.main(["--trials-d10", "3", "--trials-d100", "2", "--draws", "1500", "--gammas", "0,0.1,1",
                  "--json", str(out), "--plot", str(png)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "H paper" in table and "stops helping" in table
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and {(r["d"], r["n"]) for r in rows} == {(10, 100), (100, 1300)}
    for key in ("d", "n", "gamma", "entropy_gain_paper", "dw2_paper", "entropy_gain_exact", "dw2_exact",
                "entropy_gain_trained", "dw2_trained"):
        assert all(key in r for r in rows)
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("argv", [
    ["--bogus"], ["--trials-d10", "x"], ["--gammas", "0.1,abc"], ["--gammas", "-0.1"], ["--gammas", "0.5,0.1"],
    ["--trials-d10", "1"], ["--draws", "0"], ["--T", "0"], ["--json", "/nonexistent_dir_gmm/out.json"],
])
def test_cli_bad_flags_exit_2_one_line(argv, tmp_path, capsys):
    keep = tmp_path / "keep.json"
    keep.write_text("untouched")
    with pytest.raises(SystemExit) as exc_info:
        rc = gt.main(argv + (["--json", str(keep)] if "--json" not in argv else []))
        raise SystemExit(rc)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("python -m tools.gmm_theory: error:")
    assert keep.read_text() == "untouched"


def test_cli_subprocess_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "tools.gmm_theory", "--gammas", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--gammas" in proc.stderr
