"""The statistics behind the benchmark report's verdicts: the paired APLOT − BT comparison over seeds (mean,
Student-t interval, the smallest difference the run could have detected), a mean with its t interval over
seeds, and the Gao et al. (2023) over-optimisation fit of a Best-of-N curve.

Every function takes plain numbers and returns plain numbers, None where a quantity cannot be told, and a
sentence saying why; none of them raises on data that is merely too small or degenerate, because a report
with three seeds meets those cases for real.
"""

from __future__ import annotations

import math
import statistics

# ------------------------------------------------------------------------------------------ over seeds


def _finite(values) -> list[float]:
    # a run that failed or was not measured leaves None (or NaN) in its place; it is left out, not counted as 0
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean_interval(values, confidence: float = 0.95) -> dict:
    """Mean of per-seed values and its Student-t interval: {n, mean, sd, low, high, note}. low/high are
    None, with the reason in note, under two values; equal values give a zero-width interval, noted."""
    from scipy.stats import t

    values = _finite(values)
    n = len(values)
    out = {"n": n, "mean": None, "sd": None, "low": None, "high": None, "note": None}
    if n == 0:
        return {**out, "note": "no values"}
    out["mean"] = statistics.fmean(values)
    if n == 1:
        return {**out, "note": "one value: no spread over seeds to build an interval from"}
    out["sd"] = statistics.stdev(values)
    half = t.ppf((1 + confidence) / 2, n - 1) * out["sd"] / math.sqrt(n)
    out.update(low=float(out["mean"] - half), high=float(out["mean"] + half))
    if out["sd"] == 0:
        out["note"] = "all values equal: the interval has no width"
    return out


# ------------------------------------------------------------------------------------ paired comparison


def undetectable_reason(sd, n: int) -> str | None:
    """Why no minimum detectable difference can be given for paired standard deviation `sd` over `n`
    pairs, or None when it can."""
    if n < 2:
        return f"{n} paired seed{'s' * (n != 1)}: a paired t-test needs at least two"
    if sd is None or not math.isfinite(sd) or sd < 0:
        return f"the paired standard deviation is {sd}, not a number the test can use"
    if sd == 0:
        # the t statistic is 0/0 or infinite: no power curve exists to read a difference from
        return "every seed gave the same difference: with no spread the t-test's power is undefined"
    return None


def detection_power(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Probability that a two-sided paired t-test at level `alpha` over `n` pairs rejects "no difference"
    when the true mean difference is `delta` and the paired standard deviation `sd`: P(|T| > t_crit) for T
    noncentral t with n - 1 degrees of freedom and noncentrality delta sqrt(n) / sd."""
    from scipy.stats import nct, t

    df, crit = n - 1, t.ppf(1 - alpha / 2, n - 1)
    nc = delta * math.sqrt(n) / sd
    # The lower tail as nct.sf at -nc rather than nct.cdf(-crit, nc): scipy's nct.cdf returns NaN far in
    # the tail (df 4, nc 10: the probability underflows), while sf at the mirrored noncentrality is clean.
    return float(nct.sf(crit, df, nc) + nct.sf(crit, df, -nc))


def detectable_difference(sd, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The minimum detectable difference: the smallest true mean difference that a two-sided paired t-test
    at level `alpha` over `n` pairs detects with probability `power`, given the paired standard deviation
    `sd`. Exact: `detection_power(delta) = power` solved for delta with brentq on the noncentral t (the
    normal shortcut (t_{1-alpha/2} + t_{power}) sd / sqrt(n) is about 1 % low at n = 5 and 14 % low at n = 2).
    None where `undetectable_reason` gives a reason. It takes the observed sd as the true one, so with few
    seeds it is as uncertain as that sd."""
    from scipy.optimize import brentq
    from scipy.stats import t

    if undetectable_reason(sd, n):
        return None
    if not 0 < alpha < power < 1:
        raise ValueError(f"need 0 < alpha < power < 1, got alpha {alpha}, power {power}")
    # In units of sd the answer depends on n alone. Power rises from alpha at delta = 0 towards 1; the
    # normal shortcut is the natural first bracket end and falls short of the exact answer (n = 2: by
    # 14 %), so it is widened until the power is reached.
    high = max((t.ppf(1 - alpha / 2, n - 1) + t.ppf(power, n - 1)) / math.sqrt(n), 1.0)
    for _ in range(64):
        if detection_power(high, 1.0, n, alpha) >= power:
            break
        high *= 2
    unit = brentq(lambda x: detection_power(x, 1.0, n, alpha) - power, 0.0, high, xtol=1e-13)
    return unit * sd


def paired_comparison(treated: dict, control: dict, confidence: float = 0.95, higher_is_better: bool = True,
                      power: float = 0.8) -> dict:
    """treated - control paired by key (the seed: same initialisation and data order), over the keys both
    have a value for: n, diffs, mean, sd, the Student-t interval low/high, how many pairs favour `treated`
    (ahead), the minimum detectable difference at `power` for a two-sided test at 1 - confidence
    (detectable, or None with detectable_reason), and the verdict: "beats" / "worse" where the whole
    interval lies on one side of 0, else "no clear difference"; "one seed" and "not measured" below two.
    Where every seed gave the same difference the interval has no width, and the exact sign test
    (sign_test_p) decides instead."""
    keys = sorted(set(treated) & set(control))
    diffs = [treated[k] - control[k] for k in keys if treated[k] is not None and control[k] is not None]
    n = len(diffs)
    out = {"n": n, "diffs": diffs}
    if n == 0:
        return {**out, "verdict": "not measured"}
    interval = mean_interval(diffs, confidence)
    out["mean"] = interval["mean"]
    if n == 1:
        return {**out, "verdict": "one seed"}
    if max(diffs) - min(diffs) <= 1e-9 * max(map(abs, diffs)):
        # 0.9 - 0.8 and 0.8 - 0.7 differ in the last bits: that is rounding, not spread between seeds, and a
        # "detectable difference" of 1e-16 read from it would be noise presented as a result
        interval.update(sd=0.0, low=interval["mean"], high=interval["mean"])
    out.update(sd=interval["sd"], low=interval["low"], high=interval["high"],
               ahead=sum((d > 0) == higher_is_better and d != 0 for d in diffs),
               detectable=detectable_difference(interval["sd"], n, 1 - confidence, power),
               detectable_reason=undetectable_reason(interval["sd"], n), power=power)
    good, bad = (out["low"] > 0, out["high"] < 0) if higher_is_better else (out["high"] < 0, out["low"] > 0)
    if out["sd"] == 0:
        # Every seed moved by the same amount: the t interval has no width and would call any nonzero mean
        # certain. The exact two-sided sign test decides instead (n seeds all one way: p = 2 / 2^n, so it
        # takes 6 seeds at 95 %); a zero difference favours neither.
        out["sign_test_p"] = min(1.0, 2 * 0.5**n) if out["mean"] != 0 else 1.0
        good = good and out["sign_test_p"] < 1 - confidence
        bad = bad and out["sign_test_p"] < 1 - confidence
    out["verdict"] = "beats" if good else "worse" if bad else "no clear difference"
    return out


# ------------------------------------------------------------------------------- Best-of-N over-optimisation


def kl_best_of_n_bound(n: float) -> float:
    """log n - (n - 1) / n: the analytic KL(best-of-n || policy) the Best-of-N table uses as its x-axis
    (aplot.bon.kl_best_of_n; repeated here so the report does not import torch). Beirami et al. (2024) show
    it is an upper bound on the true KL, not the KL itself; n may be fractional (n >= 1)."""
    return math.log(n) - (n - 1) / n


def n_at_kl(kl: float) -> float:
    """The n >= 1 at which `kl_best_of_n_bound(n)` equals `kl`: 1 for kl <= 0, inf beyond float range."""
    from scipy.optimize import brentq

    if not kl > 0:
        return 1.0
    if math.isinf(kl):
        return math.inf
    # In u = log n the bound is u - 1 + exp(-u): increasing, -kl below target at u = 0 and exp(-(kl+1)) above
    # it at u = kl + 1, a bracket with no search; solving in u also keeps n = e^u from overflowing mid-solve.
    u = brentq(lambda u: u - 1 + math.exp(-u) - kl, 0.0, kl + 1.0, xtol=1e-14)
    return math.exp(u) if u < math.log(1.7e308) else math.inf


def fit_overoptimisation(kl, gold) -> dict:
    """Gao et al. (2023)'s Best-of-N form gold(d) = d (alpha - beta d), d = sqrt(KL), fitted to one proxy's
    curve by least squares on the gold residuals (a linear regression in alpha and beta with no intercept:
    gold is normalised to 0 at n = 1, where d = 0).

    Returns alpha, beta and, where beta > 0 (the curve turns down), the peak: d* = alpha / (2 beta),
    peak_kl = d*^2, peak_gold = alpha^2 / (4 beta), peak_n (the n whose KL bound is peak_kl) and
    extrapolated (the peak lies beyond the largest KL fitted). KL here is log n - (n - 1)/n, an upper bound
    on the true KL of best-of-n (Beirami et al., 2024): peak_n is exact for the curve as fitted against that
    axis, but d*^2 overstates the true KL at the peak. Where no peak can be told the peak fields are None
    and note says why; inputs too few or degenerate to fit give alpha = beta = None and a note."""
    import numpy as np

    kl, gold = np.asarray(kl, dtype=float), np.asarray(gold, dtype=float)
    if kl.shape != gold.shape or kl.ndim != 1:
        raise ValueError(f"kl and gold must be 1-d and of one length, got shapes {kl.shape} and {gold.shape}")
    out = {"alpha": None, "beta": None, "points": int(kl.size), "peak_d": None, "peak_kl": None, "peak_n": None,
           "peak_gold": None, "extrapolated": None, "note": None}
    if not (np.isfinite(kl).all() and np.isfinite(gold).all()):
        return {**out, "note": "not fitted: a KL or gold value is missing or not finite"}
    if (kl < 0).any():
        return {**out, "note": "not fitted: a negative KL, which no best-of-n has"}
    d = np.sqrt(kl)
    design = np.stack([d, -d * d], axis=1)
    (alpha, beta), _, rank, _ = np.linalg.lstsq(design, gold, rcond=None)
    if rank < 2:
        # lstsq would still return its minimum-norm answer, one of infinitely many that fit equally well
        return {**out, "note": "not fitted: two parameters need at least two distinct n > 1"}
    out.update(alpha=float(alpha), beta=float(beta))
    if not beta > 0:
        return {**out, "note": "no peak: beta <= 0, the fitted gold does not turn down (no over-optimisation "
                               "in this range)"}
    if not alpha > 0:
        # the parabola's vertex sits at d <= 0, so over d >= 0 the fitted gold only falls from n = 1
        return {**out, "peak_d": 0.0, "peak_kl": 0.0, "peak_n": 1.0, "peak_gold": 0.0, "extrapolated": False,
                "note": "peak at n = 1: alpha <= 0, the fitted gold never rises above the unselected policy"}
    peak_d = float(alpha / (2 * beta))
    out.update(peak_d=peak_d, peak_kl=peak_d**2, peak_n=n_at_kl(peak_d**2), peak_gold=float(alpha**2 / (4 * beta)),
               extrapolated=bool(peak_d**2 > kl.max()))
    return out
