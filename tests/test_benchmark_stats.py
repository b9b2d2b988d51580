"""The benchmark report's statistics (benchmarks/stats.py) against cases worked out by other means: the
minimum detectable difference against the power integral, the over-optimisation fit against known curves
and scipy's own nonlinear least squares, and the degenerate inputs a three-seed report meets for real."""

import math
import statistics

import numpy as np
import pytest

from benchmarks import report
from benchmarks.stats import (
    detectable_difference,
    detection_power,
    fit_overoptimisation,
    kl_best_of_n_bound,
    mean_interval,
    n_at_kl,
    paired_comparison,
    undetectable_reason,
)

# ------------------------------------------------------------------------------------- detectable difference


def power_by_quadrature(delta, sd, n, alpha=0.05):
    """The two-sided paired t-test's power without scipy's noncentral t: T = (Z + lam) / sqrt(V / df) with
    Z standard normal, V chi-square(df), lam = delta sqrt(n) / sd, so given V = v the test rejects with
    probability Phi(lam - c sqrt(v/df)) + Phi(-lam - c sqrt(v/df)); integrated over the chi-square density."""
    from scipy import integrate
    from scipy.stats import chi2, norm, t

    df, c, lam = n - 1, t.ppf(1 - alpha / 2, n - 1), delta * math.sqrt(n) / sd

    def given_v(v):
        edge = c * math.sqrt(v / df)
        return (norm.cdf(lam - edge) + norm.cdf(-lam - edge)) * chi2.pdf(v, df)

    return integrate.quad(given_v, 0, math.inf, epsabs=1e-12, epsrel=1e-12)[0]


def test_detectable_difference_hand_worked_at_five_seeds():
    # n = 5 pairs, sd = 1, two-sided alpha 0.05, power 0.80. df = 4, t_crit = t_{0.975,4} = 2.77645.
    # Power is P(|T| > 2.77645) for T noncentral t(4, lam), lam = delta sqrt(5). Solving
    # P(T > 2.77645) + P(T < -2.77645) = 0.80 gives lam = 3.76106 (the lower tail adds 1.4e-7), so
    # delta = 3.76106 / sqrt(5) = 1.68200. The normal shortcut (t_{0.975,4} + t_{0.80,4}) / sqrt(5)
    # = (2.77645 + 0.94096) / 2.23607 = 1.66248 is 1.2 % lower: it ignores the noncentral t's skew.
    delta = detectable_difference(1.0, 5, 0.05, 0.80)
    assert delta == pytest.approx(1.68200, abs=1e-5)
    assert (2.77645 + 0.94096) / math.sqrt(5) < delta
    # it solves the power equation, and the power integral computed without nct agrees
    assert detection_power(delta, 1.0, 5) == pytest.approx(0.80, abs=1e-9)
    assert power_by_quadrature(delta, 1.0, 5) == pytest.approx(0.80, abs=1e-8)
    assert power_by_quadrature(0.95 * delta, 1.0, 5) < 0.79  # and no smaller delta reaches it


@pytest.mark.parametrize("n", [2, 3, 10, 40])
def test_detectable_difference_has_the_stated_power_at_any_n(n):
    delta = detectable_difference(0.02, n)
    assert power_by_quadrature(delta, 0.02, n) == pytest.approx(0.80, abs=1e-8)
    assert detectable_difference(0.04, n) == pytest.approx(2 * delta)  # linear in the spread


def test_detectable_difference_falls_with_more_seeds_and_at_a_looser_level():
    by_n = [detectable_difference(1.0, n) for n in (2, 3, 5, 10, 30)]
    assert by_n == sorted(by_n, reverse=True)
    assert detectable_difference(1.0, 5, alpha=0.10) < detectable_difference(1.0, 5, alpha=0.05)
    assert detectable_difference(1.0, 5, power=0.9) > detectable_difference(1.0, 5, power=0.8)


@pytest.mark.parametrize("sd,n,why", [
    (1.0, 1, "at least two"), (1.0, 0, "at least two"), (0.0, 5, "same difference"),
    (math.nan, 5, "not a number"), (None, 5, "not a number"), (-1.0, 5, "not a number"),
])
def test_detectable_difference_says_why_it_cannot_be_told(sd, n, why):
    assert detectable_difference(sd, n) is None
    assert why in undetectable_reason(sd, n)


def test_detectable_difference_refuses_a_power_at_or_below_the_level():
    with pytest.raises(ValueError, match="alpha < power"):
        detectable_difference(1.0, 5, alpha=0.05, power=0.05)


# ------------------------------------------------------------------------------------------ intervals


def test_mean_interval_hand_worked():
    # 1, 2, 3: mean 2, sd 1, half width t_{0.975,2} / sqrt(3) = 4.30265 / 1.73205 = 2.48414
    c = mean_interval([1.0, 2.0, None, 3.0])  # a missing seed is left out, not counted
    assert (c["n"], c["mean"], c["sd"]) == (3, 2.0, 1.0)
    assert (c["low"], c["high"]) == (pytest.approx(2 - 2.48414, abs=1e-5), pytest.approx(2 + 2.48414, abs=1e-5))
    assert c["note"] is None
    assert mean_interval([1.0, 2.0, 3.0], 0.5)["high"] < c["high"]


def test_mean_interval_degenerate_inputs_are_stated():
    one = mean_interval([0.7])
    assert one["mean"] == 0.7 and one["low"] is None and "one value" in one["note"]
    none = mean_interval([None, math.nan])
    assert none["n"] == 0 and none["mean"] is None and none["note"] == "no values"
    flat = mean_interval([0.3, 0.3, 0.3])
    assert flat["low"] == flat["high"] == pytest.approx(0.3) and "no width" in flat["note"]


# ---------------------------------------------------------------------------------------- paired comparison


def test_paired_comparison_pairs_by_seed_and_states_its_power():
    aplot = {0: 0.85, 1: 0.80, 2: 0.83, 3: 0.9}  # seed 3 has no BT partner: left out
    bt = {0: 0.82, 1: 0.84, 2: 0.81, 4: 0.7}
    c = paired_comparison(aplot, bt)
    diffs = [0.85 - 0.82, 0.80 - 0.84, 0.83 - 0.81]
    assert c["n"] == 3 and c["diffs"] == pytest.approx(diffs)
    assert c["mean"] == pytest.approx(statistics.fmean(diffs)) and c["sd"] == pytest.approx(statistics.stdev(diffs))
    assert c["verdict"] == "no clear difference" and c["ahead"] == 2
    assert c["detectable"] == pytest.approx(detectable_difference(statistics.stdev(diffs), 3))
    assert c["detectable_reason"] is None and c["power"] == 0.8
    # fewer is better (steps to a target): the same numbers read the other way round
    assert paired_comparison({0: 100, 1: 90, 2: 95}, {0: 200, 1: 210, 2: 190}, higher_is_better=False)[
        "verdict"] == "beats"
    assert paired_comparison({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.8, 1: 0.82, 2: 0.81})["verdict"] == "beats"
    assert paired_comparison({0: 0.8, 1: 0.82, 2: 0.81}, {0: 0.9, 1: 0.91, 2: 0.92})["verdict"] == "worse"


def test_paired_comparison_degenerate_inputs_are_stated():
    assert paired_comparison({}, {0: 1.0})["verdict"] == "not measured"
    assert paired_comparison({0: None}, {0: 1.0})["verdict"] == "not measured"
    one = paired_comparison({0: 0.9}, {0: 0.8})
    assert one["verdict"] == "one seed" and one["mean"] == pytest.approx(0.1)
    same = paired_comparison({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.7, 2: 0.6})  # every seed +0.1
    assert same["sd"] == pytest.approx(0, abs=1e-12)
    assert same["detectable"] is None and "same difference" in same["detectable_reason"]
    # a zero-width interval is no certainty: three seeds all +0.1 is p = 1/4 by the sign test, no verdict
    assert same["verdict"] == "no clear difference" and same["sign_test_p"] == pytest.approx(0.25)
    six = paired_comparison({k: 0.9 for k in range(6)}, {k: 0.8 for k in range(6)})  # six seeds all one way
    assert six["verdict"] == "beats" and six["sign_test_p"] == pytest.approx(1 / 32)
    assert paired_comparison({k: 0.8 for k in range(6)}, {k: 0.9 for k in range(6)})["verdict"] == "worse"
    assert paired_comparison({0: 1, 1: 2}, {0: 1, 1: 2})["verdict"] == "no clear difference"


def test_every_verdict_line_states_the_detectable_difference():
    c = paired_comparison({0: 0.85, 1: 0.80, 2: 0.83}, {0: 0.82, 1: 0.84, 2: 0.81}, 0.95)
    line = report.verdict_line("ID accuracy", c, 0.95)
    assert "**no clear difference**" in line and "CI" in line
    assert f"a true difference of ±{c['detectable']:.3f} would be detected 80% of the time" in line
    flat = paired_comparison({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8}, 0.95)  # identical models
    assert "no detectable difference: every seed gave the same difference" in report.verdict_line("x", flat, 0.95)


# ------------------------------------------------------------------------------------- over-optimisation

NS = [2**k for k in range(9)]  # n = 1 .. 256, as pipelines.bon tabulates them
KL = [kl_best_of_n_bound(n) for n in NS]


def gao(kl, alpha, beta):
    return [math.sqrt(k) * (alpha - beta * math.sqrt(k)) for k in kl]


def test_kl_bound_is_the_one_the_best_of_n_table_uses():
    from aplot.bon import kl_best_of_n

    assert [kl_best_of_n_bound(n) for n in NS] == pytest.approx([kl_best_of_n(n) for n in NS], abs=1e-15)


def test_fit_recovers_a_known_curve_and_its_peak_exactly():
    alpha, beta = 0.30, 0.08
    fit = fit_overoptimisation(KL, gao(KL, alpha, beta))
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-12) and fit["beta"] == pytest.approx(beta, abs=1e-12)
    # d* = 0.30 / 0.16 = 1.875, KL* = 3.515625, gold* = 0.09 / 0.32 = 0.28125
    assert fit["peak_d"] == pytest.approx(1.875) and fit["peak_kl"] == pytest.approx(3.515625)
    assert fit["peak_gold"] == pytest.approx(0.28125)
    assert kl_best_of_n_bound(fit["peak_n"]) == pytest.approx(3.515625, abs=1e-10)  # the n inverts the bound
    assert 64 < fit["peak_n"] < 128 and fit["extrapolated"] is False and fit["note"] is None
    beyond = fit_overoptimisation(KL[:5], gao(KL[:5], alpha, beta))  # sampled only to n = 16
    assert beyond["peak_n"] == pytest.approx(fit["peak_n"]) and beyond["extrapolated"] is True


def test_fit_with_seeded_noise_is_least_squares_on_the_gold_residuals():
    from scipy.optimize import curve_fit

    alpha, beta, noise = 0.30, 0.08, 0.002
    d = np.sqrt(KL)
    gold = np.array(gao(KL, alpha, beta)) + np.random.default_rng(0).normal(0, noise, len(KL))
    gold[0] = 0.0  # normalised: gold(n = 1) = 0 by construction
    fit = fit_overoptimisation(KL, gold)
    # within 4 standard errors of the truth: (X'X)^-1 noise^2 for the design columns d and -d^2
    design = np.stack([d, -d * d], 1)
    se = np.sqrt(np.diag(np.linalg.inv(design.T @ design))) * noise
    assert abs(fit["alpha"] - alpha) < 4 * se[0] and abs(fit["beta"] - beta) < 4 * se[1]
    # and it is the least-squares fit of gold itself, not of gold / d (which weights the points otherwise)
    (a, b), _ = curve_fit(lambda x, a, b: x * (a - b * x), d, gold, p0=(0.1, 0.01))
    assert (fit["alpha"], fit["beta"]) == (pytest.approx(a, abs=1e-8), pytest.approx(b, abs=1e-8))
    over_d = np.polyfit(d[1:], gold[1:] / d[1:], 1)  # gold / d = alpha - beta d, the shortcut not taken
    assert abs(-over_d[0] - fit["beta"]) > 1e-6


@pytest.mark.parametrize("n", [1.0, 1.5, 2, 16, 64, 1000, 1e6, 1e12])
def test_n_at_kl_inverts_the_kl_bound(n):
    assert n_at_kl(kl_best_of_n_bound(n)) == pytest.approx(n, rel=1e-6)


def test_n_at_kl_edges():
    assert n_at_kl(0.0) == 1.0 and n_at_kl(-0.1) == 1.0
    assert n_at_kl(math.inf) == math.inf and n_at_kl(800.0) == math.inf  # n = e^801 is past float range
    assert kl_best_of_n_bound(n_at_kl(1e-9)) == pytest.approx(1e-9, rel=1e-6)


def test_fit_degenerate_inputs_are_stated():
    rising = fit_overoptimisation(KL, [0.1 * math.sqrt(k) + 0.01 * k for k in KL])  # beta = -0.01
    assert rising["beta"] == pytest.approx(-0.01) and rising["peak_n"] is None and "no peak" in rising["note"]
    flat = fit_overoptimisation(KL, [0.0] * len(KL))  # the proxy's pick is no better than chance
    assert flat["alpha"] == pytest.approx(0) and flat["beta"] == pytest.approx(0) and "no peak" in flat["note"]
    falling = fit_overoptimisation(KL, gao(KL, -0.05, 0.02))  # worse than the policy from the first pick
    assert falling["peak_n"] == 1.0 and falling["peak_gold"] == 0.0 and "n = 1" in falling["note"]
    for kl, gold in (([0.0], [0.0]), (KL[:2], [0.0, 0.03]), ([0.0, 0.0, 0.0], [0.0, 0.1, 0.2]), ([], [])):
        unfit = fit_overoptimisation(kl, gold)  # under two distinct n > 1: two parameters cannot be told
        assert unfit["alpha"] is None and unfit["peak_n"] is None and "at least two distinct" in unfit["note"]
    assert "not finite" in fit_overoptimisation(KL, [math.nan] + gao(KL, 0.3, 0.08)[1:])["note"]
    assert "negative KL" in fit_overoptimisation([-0.1] + KL[1:], gao(KL, 0.3, 0.08))["note"]
    with pytest.raises(ValueError, match="one length"):
        fit_overoptimisation(KL, [0.0])


def test_report_section_fits_each_seed_and_gives_intervals_over_seeds():
    # three bt seeds with alpha 0.29, 0.30, 0.31 and beta 0.08: alpha 0.300, half width
    # t_{0.975,2} * 0.01 / sqrt(3) = 4.30265 * 0.01 / 1.73205 = 0.02484 -> [0.275, 0.325]; beta exactly 0.08.
    # One aplot seed rises throughout (beta < 0): no peak, so no gold-at-peak interval for aplot.
    curves = {"bt-0": ("bt", 0.29, 0.08), "bt-1": ("bt", 0.30, 0.08), "bt-2": ("bt", 0.31, 0.08),
              "aplot-0": ("aplot", 0.30, 0.08), "aplot-1": ("aplot", 0.30, -0.01)}
    ns = NS[:7]  # to n = 64
    bon = {"n_samples": 64, "models": {p: {"method": m, "seed": int(p[-1])} for p, (m, _, _) in curves.items()},
           "table": [{"proxy": p, "n": n, "kl": kl_best_of_n_bound(n), "gold_normalized": g}
                     for p, (_, a, b) in curves.items() for n, g in zip(ns, gao(map(kl_best_of_n_bound, ns), a, b))]}
    lines = "\n".join(report.overoptimisation_lines(bon, 0.95)).splitlines()  # the table comes as one string
    bt = next(x for x in lines if x.startswith("| `bt`"))
    assert "| 0.300 [0.275, 0.325] | 0.080 [0.080, 0.080] |" in bt
    peaks = [fit_overoptimisation([kl_best_of_n_bound(n) for n in ns], gao(map(kl_best_of_n_bound, ns), a, 0.08))
             for a in (0.29, 0.30, 0.31)]
    assert ", ".join(f"{f['peak_n']:.0f}*" for f in peaks) in bt  # each past n = 64: marked as extrapolated
    aplot = next(x for x in lines if x.startswith("| `aplot`"))
    assert aplot.endswith(", none | - | - |")  # no peak interval either: one seed's curve has no peak
    # the peak's interval is taken on d* = alpha / (2 beta): 1.8125, 1.875, 1.9375, mean 1.875, half width
    # 4.30265 * 0.0625 / sqrt(3) = 0.15526, read as n through the KL bound
    low, mid, high = (n_at_kl(d**2) for d in (1.875 - 0.15526, 1.875, 1.875 + 0.15526))
    assert f"| {mid:.0f} [{low:.0f}, {high:.0f}] |" in bt
    assert any("upper bound on the true KL" in x and "Beirami" in x for x in lines)
