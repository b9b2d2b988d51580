"""benchmarks/results.json -> benchmarks/RESULTS.md and the plots: every number and every verdict in
the results file is computed here from the raw numbers, none is typed by hand.

    python -m benchmarks.report [benchmarks/results.json] [--out benchmarks]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import textwrap
from pathlib import Path

from benchmarks.stats import fit_overoptimisation, mean_interval, n_at_kl, paired_comparison

METRICS = {  # column: (eval set, key in the run record, label)
    "id_acc": ("test_id", "accuracy", "ID acc"),
    "ood_acc": ("test_ood", "accuracy", "OOD acc"),
    "id_hard": ("test_id", "hard_accuracy", "ID hard"),
    "ood_hard": ("test_ood", "hard_accuracy", "OOD hard"),
    "id_auc": ("test_id", "auc", "ID AUC"),
    "ood_auc": ("test_ood", "auc", "OOD AUC"),
}
DEFAULT_GAMMA, DEFAULT_SCALE = 0.1, 1.0
POWER = 0.8  # of the detectable difference each verdict states
COLORS = {"bt": "tab:blue", "aplot": "tab:orange"}  # the two compared methods, alike in every plot


# ---------------------------------------------------------------------------------------------- numbers

def mean_std(values) -> tuple[float, float, int]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def fmt(mean, std=None, n=None, digits=3) -> str:
    if n == 0 or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    text = f"{mean:.{digits}f}"
    return text if std is None or (n is not None and n < 2) else f"{text} ± {std:.{digits}f}"


def value(run, metric):
    split, key, _ = METRICS[metric]
    return run.get("eval", {}).get(split, {}).get(key)


def ok_runs(results) -> list[dict]:
    runs = results.get("runs")
    return [r for r in runs if r.get("status") == "ok"] if isinstance(runs, list) else []


def default_runs(results, method, noise=0.0, section="main") -> dict[int, dict]:
    """The runs of a section and method at a noise level with the recipe's gamma and scale, by seed."""
    return {r["seed"]: r for r in ok_runs(results) if r.get("section", "main") == section and r["method"] == method
            and r["noise"] == noise and r["gamma"] == DEFAULT_GAMMA and r["scale"] == DEFAULT_SCALE}


def metric_by_seed(results, method, metric, noise=0.0, section="main") -> dict[int, float]:
    return {k: value(r, metric) for k, r in default_runs(results, method, noise, section).items()}


def compare(aplot: dict, bt: dict, confidence: float, higher_is_better=True) -> dict:
    """APLOT - BT paired by seed (same initialisation and data order): `stats.paired_comparison`."""
    return paired_comparison(aplot, bt, confidence, higher_is_better, POWER)


def steps_to(curve, target):
    """The first logged step from which test_id accuracy stays at or above `target` to the end of the
    run, or None. Early curves spike and fall back (the warm-up's high learning rate), so the first
    crossing alone would time a spike rather than convergence."""
    step = None
    for at, acc in curve:
        if acc < target:
            step = None
        elif step is None:
            step = at
    return step


def quality_table(results, methods, noise, section="main") -> str:
    """Mean ± sd over seeds of every metric, a row per method; the best mean per column in bold."""
    table = {m: {k: mean_std([value(r, k) for r in default_runs(results, m, noise, section).values()])
                 for k in METRICS} for m in methods}
    best = {k: max((table[m][k][0] for m in table if table[m][k][2]), default=None) for k in METRICS}
    body = []
    for m in methods:
        cells = []
        for k in METRICS:
            mean, sd, n = table[m][k]
            cell = fmt(mean, sd, n)
            cells.append(f"**{cell}**" if n and mean == best[k] and len(table) > 1 else cell)
        body.append([f"`{m}`", str(table[m]["id_acc"][2]), *cells])
    return md_table(["method", "n", *[v[2] for v in METRICS.values()]], body)


# ----------------------------------------------------------------------------------------------- text

def verdict_line(claim: str, c: dict, confidence: float, unit="", digits=3, ahead="ahead") -> str:
    """One plain sentence per claim, from `compare`'s numbers."""
    if c["verdict"] == "not measured":
        return f"- {claim}: not measured."
    d = f"{c['mean']:+.{digits}f}{unit}"
    if c["verdict"] == "one seed":
        return (f"- {claim}: one seed only, APLOT − BT = {d}; no verdict (one seed cannot show the "
                f"seed-to-seed spread).")
    ci = (f"{confidence:.0%} CI {c['low']:+.{digits}f} to {c['high']:+.{digits}f}{unit}, {c['n']} seeds, "
          f"APLOT {ahead} in {c['ahead']} of {c['n']}")
    word = {"beats": "**APLOT beats BT**", "worse": "**APLOT does worse than BT**",
            "no clear difference": "**no clear difference**"}[c["verdict"]]
    power = (f"; a true difference of ±{c['detectable']:.{digits}f}{unit} would be detected {c['power']:.0%} of the "
             "time" if c.get("detectable") is not None else f"; no detectable difference: {c['detectable_reason']}")
    if c.get("sign_test_p") is not None:
        power += f"; the verdict is the sign test's, p = {c['sign_test_p']:.3g}"
    return f"- {claim}: {word}, APLOT − BT = {d} ({ci}{power})."


def count(n: float) -> str:
    """A sample count: whole below a million, else in powers of ten (an extrapolated peak can be 1e13)."""
    return "inf" if math.isinf(n) else f"{n:.0f}" if n < 1e6 else f"{n:.1e}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ---------------------------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality(results, path) -> bool:
    """Accuracy against the share of flipped training labels, one line per method (main regime)."""
    s = results["settings"]
    if not ok_runs(results):
        return False
    plt = _plt()
    noises = s["noise_levels"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, ("id_acc", "ood_acc", "id_hard")):
        for i, method in enumerate(s["methods"]):
            stats = [mean_std(metric_by_seed(results, method, metric, nz).values()) for nz in noises]
            shift = (i - (len(s["methods"]) - 1) / 2) * 0.004  # keeps the error bars apart
            ax.errorbar([nz + shift for nz in noises], [m for m, _, _ in stats], yerr=[sd for _, sd, _ in stats],
                        fmt="o-", capsize=2, label=method, lw=1.8 if method in ("bt", "aplot") else 0.9)
        ax.set_xticks(noises, [f"{nz:.0%}" for nz in noises])
        ax.set(xlabel="training labels flipped", title=METRICS[metric][2] + " (mean ± sd over seeds)")
        ax.axhline(0.5, color="grey", lw=0.5)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_convergence(results, path) -> bool:
    s = results["settings"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    for method in s["methods"]:
        curves = [r["curve"] for r in default_runs(results, method).values() if r.get("curve")]
        if not curves:
            continue
        steps = sorted(set.intersection(*[{st for st, _ in c} for c in curves]))
        acc = [[dict(map(tuple, c))[st] for c in curves] for st in steps]
        mean = [statistics.fmean(a) for a in acc]
        sd = [statistics.stdev(a) if len(a) > 1 else 0 for a in acc]
        ax.plot(steps, mean, label=method, lw=1.8 if method in ("bt", "aplot") else 1)
        ax.fill_between(steps, [m - e for m, e in zip(mean, sd)], [m + e for m, e in zip(mean, sd)], alpha=0.15)
        drawn = True
    ax.axhline(s["target_accuracy"], color="grey", ls="--", lw=0.8, label=f"target {s['target_accuracy']}")
    ax.set(xlabel="training step (16 pairs)", ylabel="test_id accuracy (curve pairs)",
           title="Convergence (mean ± sd over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def sweep(results, key):
    """{setting: {metric: (mean, sd, n)}} of the APLOT runs at noise 0 that vary `key` alone."""
    other = "scale" if key == "gamma" else "gamma"
    fixed = DEFAULT_SCALE if key == "gamma" else DEFAULT_GAMMA
    runs = [r for r in ok_runs(results) if r.get("section", "main") == "main" and r["method"] == "aplot"
            and r["noise"] == 0 and r[other] == fixed]
    return {v: {m: mean_std([value(r, m) for r in runs if r[key] == v]) for m in METRICS}
            for v in sorted({r[key] for r in runs})}


def plot_sweeps(results, path) -> bool:
    plt = _plt()
    bt = {m: mean_std([value(r, m) for r in default_runs(results, "bt").values()]) for m in METRICS}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    drawn = False
    for ax, key in zip(axes, ("gamma", "scale")):
        table = sweep(results, key)
        if not table:
            continue
        xs = list(table)
        for metric, style in (("id_acc", "o-"), ("ood_acc", "s-"), ("id_hard", "^-")):
            ax.errorbar(xs, [table[x][metric][0] for x in xs], yerr=[table[x][metric][1] for x in xs], fmt=style,
                        capsize=2, label=f"APLOT {METRICS[metric][2]}")
            if bt[metric][2]:
                ax.axhline(bt[metric][0], ls=":", lw=0.8, color=ax.lines[-1].get_color(),
                           label=f"BT {METRICS[metric][2]}")
        ax.set(xlabel=key if key == "gamma" else "margin_scale (log)", ylabel="accuracy",
               title=f"APLOT {key} sweep (noise 0, mean ± sd)")
        if key == "scale":
            ax.set_xscale("log")
        ax.legend(fontsize=6)
        drawn = True
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def bon_by_method(results) -> dict:
    """{method: {n: [gold per seed]}} and {n: kl} from the Best-of-N table."""
    bon = results.get("bon", {})
    by_method, kl = {}, {}
    for row in bon.get("table", []):
        model = bon["models"].get(row["proxy"])
        if model:
            by_method.setdefault(model["method"], {}).setdefault(row["n"], {})[model["seed"]] = row["gold"]
            kl[row["n"]] = row["kl"]
    return by_method, kl


def overoptimisation_lines(bon: dict, confidence: float) -> list[str]:
    """The fitted over-optimisation curve of each method, per seed and as a mean with its interval."""
    fits = {}
    for proxy, model in bon.get("models", {}).items():
        rows = sorted((r for r in bon["table"] if r["proxy"] == proxy), key=lambda r: r["n"])
        if len(rows) >= 3:
            fits.setdefault(model["method"], []).append(
                fit_overoptimisation([r["kl"] for r in rows], [r["gold_normalized"] for r in rows]))
    if not fits:
        return []
    n_max = bon["n_samples"]

    def interval(values):
        c = mean_interval(values, confidence)
        if c["low"] is None:
            return fmt(c["mean"], n=c["n"])
        return f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"

    def peak(f):
        if f["alpha"] is None:
            return "not fitted"
        return "none" if f["peak_n"] is None else count(f["peak_n"]) + ("*" if f["extrapolated"] else "")

    def peak_interval(per_seed):
        # on d* = sqrt(KL) at the peak, where seeds spread about evenly, then read as n (n grows as e^(d*^2))
        ds = [f["peak_d"] for f in per_seed if f["peak_d"] is not None]
        if len(ds) < 2 or len(ds) < len(per_seed):
            return "-"
        c = mean_interval(ds, confidence)
        return (f"{count(n_at_kl(c['mean'] ** 2))} [{count(n_at_kl(max(c['low'], 0.0) ** 2))}, "
                f"{count(n_at_kl(c['high'] ** 2))}]")

    body = []
    for method, per_seed in fits.items():
        golds = [f["peak_gold"] for f in per_seed if f["peak_gold"] is not None]
        body.append([f"`{method}`", interval([f["alpha"] for f in per_seed]), interval([f["beta"] for f in per_seed]),
                     ", ".join(map(peak, per_seed)), peak_interval(per_seed),
                     interval(golds) if len(golds) == len(per_seed) else "-"])
    return [f"Over-optimisation: each seed's curve of gold reward (0 at n = 1) against d = sqrt(KL) fitted to Gao et "
            f"al. (2023)'s gold(d) = d (alpha - beta d); mean and {confidence:.0%} interval over seeds. KL here is "
            "log n - (n - 1)/n, an upper bound on the true KL of best-of-n (Beirami et al., 2024). The curve peaks "
            f"only where beta > 0; * marks a peak beyond the sampled n = {n_max}, extrapolated by the fit:", "",
            md_table(["proxy", "alpha", "beta", "peak n (per seed)", "peak n [interval, on d*]", "gold at the peak"],
                     body), "",
            "The interval on the peak is taken on d* = alpha / (2 beta) over the seeds whose curve peaks, then read "
            "as n; it is given only when every seed's curve peaks. A wide interval on n is a narrow one on d*: n "
            "grows as the exponential of d*^2.", ""]


def plot_bon(results, path) -> bool:
    by_method, kl = bon_by_method(results)
    if not by_method:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, by_n in by_method.items():
        ns = sorted(by_n)
        stats = [mean_std(list(by_n[n].values())) for n in ns]
        ax.errorbar([kl[n] for n in ns], [m for m, _, _ in stats], yerr=[sd for _, sd, _ in stats], fmt="o-",
                    capsize=2, label=method)
        for n, (m, _, _) in zip(ns, stats):
            ax.annotate(str(n), (kl[n], m), fontsize=7, alpha=0.6, textcoords="offset points", xytext=(2, 3))
    oracle = results["bon"].get("oracle_gold_at_n", {})
    ax.set(xlabel="KL(best-of-n || policy)", ylabel="gold reward of the proxy's pick",
           title="Best-of-N (mean ± sd over seeds)" + (" — oracle in the table" if oracle else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def overfit_pairs(s: dict) -> int:
    """The over-fitting runs' training set: 1/overfit_fraction of a main run's pairs (benchmarks.quality)."""
    return 16 * s["max_steps"] // s["overfit_fraction"]


def overfit_finals(results, method, noise) -> dict[int, dict]:
    """Per seed, an over-fitting run's accuracy on its training pairs and held out after the last epoch,
    their gap, and its best held-out accuracy over the epochs."""
    out = {}
    for seed, r in default_runs(results, method, noise, "overfit").items():
        train, held = dict(map(tuple, r.get("train_curve") or [])), dict(map(tuple, r.get("curve") or []))
        both = sorted(set(train) & set(held))
        if both:
            last = both[-1]
            out[seed] = {"train": train[last], "held_out": held[last], "gap": train[last] - held[last],
                         "best_held_out": max(held.values())}
    return out


def plot_overfit(results, path) -> bool:
    """Training-pair (dashed) and held-out (solid) accuracy after each epoch, mean over seeds; a panel
    per noise level."""
    s = results["settings"]
    noises = [nz for nz in s["overfit_noise_levels"] if any(
        default_runs(results, m, nz, "overfit") for m in s["overfit_methods"])]
    if not noises:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(noises), figsize=(5.5 * len(noises), 3.8), squeeze=False)
    for ax, noise in zip(axes[0], noises):
        for method in s["overfit_methods"]:
            runs = default_runs(results, method, noise, "overfit").values()
            for key, style in (("train_curve", "--"), ("curve", "-")):
                curves = [dict(map(tuple, r[key])) for r in runs if r.get(key)]
                if not curves:
                    continue
                steps = sorted(set.intersection(*[set(c) for c in curves]))
                color = COLORS.get(method)
                # an evaluation after every epoch: the i-th point is epoch i + 1
                ax.plot(range(1, len(steps) + 1), [statistics.fmean(c[st] for c in curves) for st in steps],
                        style, marker="o", ms=3, color=color,
                        label=f"{method} {'training pairs' if key == 'train_curve' else 'held out'}")
        ax.set(xlabel="epoch", ylabel="accuracy", title=f"Over-fitting, {noise:.0%} flipped (mean over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def ppo_by_method(results) -> dict[str, dict[int, list]]:
    """{method: {seed: gold curve}} of the PPO section's finished runs, bt first."""
    out = {}
    for run in results.get("ppo", {}).get("runs", {}).values():
        if run.get("status") == "ok":
            out.setdefault(run["method"], {})[run["seed"]] = run["gold_curve"]
    return dict(sorted(out.items(), key=lambda item: item[0] != "bt"))


def gold_at_kl(curve: list[dict], kl: float) -> float | None:
    """Gold reward where a PPO run's curve (evaluations in order) first reaches `kl`, linear between the two
    evaluations around it; None if the run never got there."""
    for before, after in zip(curve, curve[1:]):
        if before["kl"] <= kl <= after["kl"]:
            share = 0.0 if after["kl"] == before["kl"] else (kl - before["kl"]) / (after["kl"] - before["kl"])
            return before["gold"] + share * (after["gold"] - before["gold"])
    return None


def plot_ppo(results, path) -> bool:
    """Gold reward against KL to the reference through PPO: each seed faint, the mean over seeds bold."""
    by_method = ppo_by_method(results)
    if not by_method:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, curves in by_method.items():
        color = COLORS.get(method)
        for curve in curves.values():
            ax.plot([p["kl"] for p in curve], [p["gold"] for p in curve], "-", color=color, alpha=0.25, lw=0.8)
        length = min(len(c) for c in curves.values())
        ax.plot([statistics.fmean(c[i]["kl"] for c in curves.values()) for i in range(length)],
                [statistics.fmean(c[i]["gold"] for c in curves.values()) for i in range(length)], "o-",
                color=color, lw=2, label=f"{method} (mean of {len(curves)} seeds)")
    ax.set(xlabel="KL(policy || reference)", ylabel="gold reward", title="PPO: gold reward against KL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def speed_rows(results) -> list[dict]:
    """The speed section's ratios: what, median, spread, target (None: none), and whether it is met."""
    targets, rows = results["targets"], []

    def add(what, spread_, target=None, at_most=True):
        if not isinstance(spread_, dict) or "median" not in spread_:
            rows.append({"what": what, "median": None, "target": target, "at_most": at_most})
            return
        met = None if target is None else (spread_["median"] <= target if at_most else spread_["median"] >= target)
        rows.append({"what": what, **spread_, "target": target, "at_most": at_most, "met": met})

    for threads, step in threaded(results.get("speed_step")):
        add(f"APLOT / BT training-step time, {threads} thread{'s' * (threads > 1)}", step.get("aplot_over_bt"),
            targets["aplot_over_bt_step_time_max"])
        add(f"OT margin (cost, plan, margins) share of an APLOT step, {threads} thread{'s' * (threads > 1)}",
            step.get("ot_solve_share"))
    for b, row in results.get("speed_sinkhorn", {}).items():
        if isinstance(row, dict) and "pot_over_transport_plan" in row:
            add(f"Sinkhorn plan, batch {b}: POT time / `transport_plan` time", row["pot_over_transport_plan"])
    gen = results.get("speed_generation", {})
    for name, label in (("embedded_policy", "embedded policy"), ("medium_qwen2", "larger Qwen2")):
        if name in gen:
            add(f"vLLM / transformers samples per second, {label}, transformers at torch's default threads",
                gen[name].get("vllm_over_transformers"))
            add(f"vLLM / transformers samples per second, {label}, transformers at 1 thread",
                gen[name].get("vllm_over_transformers_1thread"))
            add(f"vLLM / transformers samples per second, {label}, against the faster of the two",
                gen[name].get("vllm_over_faster_transformers"), targets["vllm_over_transformers_min"],
                at_most=False)
    score = results.get("speed_scoring", {})
    add("RewardScorer (token ids) / bare forward, sequences per second", score.get("scorer_ids_over_bare"),
        targets["scorer_over_bare_min"], at_most=False)
    # From texts the scorer also tokenizes, which the bare forward of ready tokens does not: shown, not held
    # to the target.
    add("RewardScorer from texts (tokenizing included) / bare forward of the tokens",
        score.get("scorer_texts_over_bare"))
    return rows


def threaded(speed_step) -> list[tuple[int, dict]]:
    """The step-time measurements by thread count, fewest threads first."""
    if not isinstance(speed_step, dict):
        return []
    return sorted(((v["threads"], v) for v in speed_step.values() if isinstance(v, dict) and "threads" in v),
                  key=lambda x: x[0])


def plot_speed(results, path) -> bool:
    rows = [r for r in speed_rows(results) if r.get("median") is not None]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        ax.barh(y, r["median"], xerr=[[r["median"] - r["min"]], [r["max"] - r["median"]]], capsize=3,
                color="tab:green" if r["met"] else "tab:red" if r["met"] is False else "tab:grey")
        if r["target"] is not None:
            ax.plot([r["target"]] * 2, [y - 0.4, y + 0.4], "k--", lw=1)
    ax.set_yticks(ys, [textwrap.fill(r["what"].replace("`", ""), 44) for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="ratio (median, min-max bars; dashed: target)", title="Speed ratios, measured side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------- report

def render(results: dict, plots: dict[str, bool]) -> str:
    s, conf = results["settings"], results["confidence"]
    runs = results.get("runs") if isinstance(results.get("runs"), list) else []
    failed = [r for r in runs if r.get("status") != "ok"]
    env = results["environment"]
    out = ["# Benchmark results", "",
           f"Generated by `make bench{' QUICK=1' if s['name'] == 'quick' else ''}` (`python -m benchmarks.run"
           f"{' --form ' + s['name'] if s['name'] != 'full' else ''}`) from `results.json` beside this file, by "
           "`benchmarks/report.py`: no number here is typed by hand. "
           f"Form **{s['name']}**, started {results['started']}, {results.get('wall_seconds', 0) / 60:.1f} min "
           f"wall time; {env['cpu_count']} CPUs, commit {env['commit']}, "
           + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + ".", ""]

    if results.get("resumed_from"):
        kept = ", ".join(results["resumed_from"]["sections"])
        out += [f"This bench was interrupted (started {results['resumed_from']['started']}) and continued with "
                f"`--resume`: its finished sections ({kept}) and trainings were kept; all attempts together took "
                f"{results.get('wall_seconds_all_attempts', results.get('wall_seconds', 0)) / 60:.1f} min of "
                "section time.", ""]

    # How the runs were made.
    per_epoch = math.ceil(overfit_pairs(s) / 16)  # steps of 16 pairs
    out += ["Every training is `make rm` (pipelines.rm) on `" + s["recipe"] + "` with these overrides: "
            f"{s['max_steps']} steps of 16 pairs, {s['warmup_steps']} warm-up steps, final evaluation on "
            f"{s['n_eval']} pairs of each of test_id and test_ood, `margin` with margin_value {s['margin_value']}, "
            f"`label_smoothing` at the recipe's value; {len(s['seeds'])} seed(s) ({', '.join(map(str, s['seeds']))}; "
            "the seed sets initialisation and data order, the world is the same). The runs fall in three regimes:", "",
            f"- **main**: the reward model starts from the SFT policy of the embedded lineage (built by the bench "
            f"itself: tokenizer, base LM, SFT policy) with a new score head, as one starts from a hub checkpoint; "
            f"learning rate {s['learning_rate']:g}; n_train {16 * s['max_steps']} (one epoch); every method at "
            f"{', '.join(f'{nz:.0%}' for nz in s['noise_levels'])} flipped labels; the gamma and margin_scale sweeps "
            f"on the first {min(s['sweep_seeds'], len(s['seeds']))} seed(s);",
            f"- **from scratch**: the same architecture built from its config, learning rate "
            f"{s['scratch_learning_rate']:g} (tuned for it); {', '.join(s['scratch_methods'])} at "
            f"{', '.join(f'{nz:.0%}' for nz in s['scratch_noise_levels'])} flipped;",
            f"- **over-fitting**: from the SFT policy on 1/{s['overfit_fraction']} of the pairs "
            f"({overfit_pairs(s)}) for {s['overfit_epochs']} epochs (as many steps as a "
            f"main run), accuracy on every training pair and on {s['curve_eval_pairs']} held-out test_id pairs after "
            "each epoch; "
            f"{', '.join(s['overfit_methods'])} at {', '.join(f'{nz:.0%}' for nz in s['overfit_noise_levels'])} "
            "flipped.", "",
            f"{len(runs)} trainings, {len(failed)} failed, {s['workers'] or 1} at a time with one thread each. "
            "Best-of-N and PPO use the main regime's bt and aplot models at 0% flipped.", ""]
    if failed:
        out += ["Failed runs (left out of every mean below): " + "; ".join(f"`{r['id']}` ({r['error']})"
                                                                          for r in failed), ""]
    out += [f"Verdicts compare APLOT with BT run for run on the same seed: the mean of the paired differences "
            f"and its {conf:.0%} confidence interval (Student t over seeds). APLOT *beats* BT where the whole "
            "interval is on its side, does *worse* where it is on BT's side, and otherwise there is *no clear "
            "difference*; a single seed gets no verdict, and where every seed gave the same difference (an interval "
            "of no width) the exact sign test decides. Each verdict also gives the smallest true difference that "
            f"a two-sided paired t-test at {1 - conf:.0%} over these seeds would detect {POWER:.0%} of the time (the "
            "noncentral t at the observed spread of the differences): *no clear difference* speaks against "
            "differences about that large, which would usually have shown, not against smaller ones; with few seeds "
            "the spread, and so that size, is itself rough.", ""]

    # Verdicts, grouped by the paper's claims.
    def versus(metric, noise=0.0, section="main"):
        return compare(metric_by_seed(results, "aplot", metric, noise, section),
                       metric_by_seed(results, "bt", metric, noise, section), conf)

    out += ["## Where APLOT does and does not beat BT", "",
            "**Main regime, reward model from the SFT policy** (the paper: better preference accuracy, in and out "
            "of distribution):", ""]
    for metric, claim in (("id_acc", "In-distribution accuracy (test_id)"),
                          ("ood_acc", "Out-of-distribution accuracy (test_ood)"),
                          ("id_hard", "Hard-pair accuracy, test_id"), ("ood_hard", "Hard-pair accuracy, test_ood"),
                          ("id_auc", "Reward separation (AUC), test_id")):
        out.append(verdict_line(claim, versus(metric), conf))
    out += ["", "**Label noise, main regime** (the paper: robust to noisy preferences):", ""]
    for noise in [nz for nz in s["noise_levels"] if nz > 0]:
        for metric, where in (("id_acc", "in-distribution"), ("ood_acc", "out-of-distribution")):
            out.append(verdict_line(f"{noise:.0%} flipped, {where} accuracy", versus(metric, noise), conf))
    out += ["", "**From scratch** (no pretrained backbone):", ""]
    for noise in s["scratch_noise_levels"]:
        for metric, where in (("id_acc", "in-distribution"), ("ood_acc", "out-of-distribution")):
            out.append(verdict_line(f"{noise:.0%} flipped, {where} accuracy", versus(metric, noise, "scratch"),
                                    conf))
    out += ["", f"**Over-fitting**, {s['overfit_epochs']} epochs of 1/{s['overfit_fraction']} of the pairs (the "
            "paper: APLOT reduces over-fitting). The gap is accuracy on the training pairs minus held-out "
            "accuracy after the last epoch; smaller is better:", ""]
    for noise in s["overfit_noise_levels"]:
        finals = {m: overfit_finals(results, m, noise) for m in ("aplot", "bt")}
        gap, held = ({m: {k: v[key] for k, v in finals[m].items()} for m in finals} for key in ("gap", "held_out"))
        out.append(verdict_line(f"{noise:.0%} flipped, train − held-out gap", compare(
            gap["aplot"], gap["bt"], conf, higher_is_better=False), conf, ahead="smaller"))
        out.append(verdict_line(f"{noise:.0%} flipped, held-out accuracy after the last epoch", compare(
            held["aplot"], held["bt"], conf), conf))
    censored = s["max_steps"] + s["eval_steps"]
    steps = {m: {k: steps_to(r.get("curve") or [], s["target_accuracy"]) for k, r in default_runs(results, m).items()}
             for m in s["methods"]}
    c = compare({k: v if v is not None else censored for k, v in steps.get("aplot", {}).items()},
                {k: v if v is not None else censored for k, v in steps.get("bt", {}).items()}, conf,
                higher_is_better=False)
    out += ["", "**Convergence, main regime** (the paper: faster convergence):", "",
            verdict_line(f"Steps to {s['target_accuracy']} test_id accuracy (fewer is better)", c, conf,
                         unit=" steps", digits=0, ahead="faster")]
    by_method, kl = bon_by_method(results)
    out += ["", "**Best-of-N**, gold reward of the proxy's pick (the paper: a better reward signal for "
            "alignment):", ""]
    bon_ns = sorted({n for by_n in by_method.values() for n in by_n} & {16, 64, 256})
    for n in bon_ns if {"bt", "aplot"} <= set(by_method) else []:
        out.append(verdict_line(f"Best-of-{n}", compare(by_method["aplot"].get(n, {}), by_method["bt"].get(n, {}),
                                                         conf), conf))
    if not bon_ns or not {"bt", "aplot"} <= set(by_method):
        out.append("- Best-of-16, 64 and 256: not measured.")
    ppo_runs = ppo_by_method(results)
    if {"bt", "aplot"} <= set(ppo_runs):
        after = {m: {k: c[-1]["gold"] for k, c in ppo_runs[m].items()} for m in ("aplot", "bt")}
        kls = {m: mean_std([c[-1]["kl"] for c in ppo_runs[m].values()]) for m in ("aplot", "bt")}
        # A policy that moved further from the reference is expected to score higher: the gold reward is also
        # compared at one KL that every run reached, read off each run's own gold-against-KL curve.
        kl_common = min(c[-1]["kl"] for m in ("aplot", "bt") for c in ppo_runs[m].values())
        at_kl = {m: {k: gold_at_kl(c, kl_common) for k, c in ppo_runs[m].items()} for m in ("aplot", "bt")}
        out += ["", "**PPO** against each reward model (the paper: better downstream alignment):", "",
                verdict_line("Gold reward after PPO", compare(after["aplot"], after["bt"], conf), conf)
                + f" KL to the reference after PPO: aplot {fmt(*kls['aplot'])}, bt {fmt(*kls['bt'])}.",
                verdict_line(f"Gold reward at equal KL ({kl_common:.2f}, the smallest any run ended at; each run's "
                             "gold where its curve first reached it, interpolated)",
                             compare(at_kl["aplot"], at_kl["bt"], conf), conf)]
    main_id = versus("id_acc")
    ours = {"beats": "finds APLOT ahead of BT, unlike theirs",
            "worse": "finds APLOT behind BT, as theirs does",
            "no clear difference": "cannot tell APLOT and BT apart"}.get(main_id["verdict"])
    out += ["", "## Beside an independent replication", "",
            "Lin et al. (2026), \"From soft targets to reward signals\", re-implemented APLOT with a DeBERTa-v3-base "
            "reward model on 100k preference pairs over 3 seeds and found APLOT slightly below BT in pair accuracy: "
            "APLOT 73.6-73.8 % against BT 74.3-74.9 % (their numbers, quoted, not measured here)."
            + (f" On in-distribution accuracy in the main regime this run {ours} (APLOT − BT = {main_id['mean']:+.3f}, "
               f"{conf:.0%} CI {main_id['low']:+.3f} to {main_id['high']:+.3f} over {main_id['n']} seeds)."
               if ours else " This run has no verdict of its own on in-distribution accuracy to set beside it.")
            + " Their gap, about 0.009 in accuracy, is " + (
                (f"smaller than the ±{main_id['detectable']:.3f} this run would detect 80% of the time: a gap like "
                 "theirs could go unseen here." if main_id["detectable"] > 0.009 else
                 f"at least the ±{main_id['detectable']:.3f} this run would detect 80% of the time: a gap like theirs "
                 "would usually show here.") if main_id.get("detectable") is not None
                else "not a size this run's power can be stated against."), ""]

    rows = speed_rows(results)
    out += ["Speed targets: " + "; ".join(
        f"{r['what']} {'≤' if r['at_most'] else '≥'} {r['target']:g}: "
        + ("not measured" if r.get("median") is None else f"{r['median']:.3f}, **{'met' if r['met'] else 'not met'}**")
        for r in rows if r["target"] is not None) + ".", ""]

    # 1. Quality.
    out += ["## 1. Quality, main regime", "",
            "Mean ± standard deviation over seeds (n = seeds that finished). ID/OOD: test_id/test_ood; hard: "
            "the pairs tagged hard (one word-edit apart); AUC: P(a chosen reward > a rejected reward), the "
            "separation of the two reward distributions. Best mean per column in bold.", ""]
    for noise in s["noise_levels"]:
        out += [f"**{noise:.0%} of training labels flipped**", "", quality_table(results, s["methods"], noise), ""]
    if plots.get("quality"):
        out += ["![quality](quality.png)", ""]

    out += ["## 2. From scratch", "",
            "The same reward model built from its config rather than from the SFT policy, at the learning rate "
            "tuned for that; set it against section 1's rows of the same methods and noise.", ""]
    for noise in s["scratch_noise_levels"]:
        out += [f"**{noise:.0%} of training labels flipped, from scratch**", "",
                quality_table(results, s["scratch_methods"], noise, "scratch"), ""]

    out += ["## 3. Over-fitting", "",
            f"1/{s['overfit_fraction']} of the pairs for {s['overfit_epochs']} epochs ({per_epoch} steps each). "
            "After the last epoch: accuracy on the training pairs (against the labels trained on, flipped ones "
            "included), held out, the gap, and the best held-out accuracy over the epochs; mean ± sd over seeds.", ""]
    body = []
    for noise in s["overfit_noise_levels"]:
        for m in s["overfit_methods"]:
            finals = overfit_finals(results, m, noise).values()
            body.append([f"{noise:.0%}", f"`{m}`", str(len(finals)),
                         *[fmt(*mean_std([f[k] for f in finals])) for k in ("train", "held_out", "gap",
                                                                            "best_held_out")]])
    out += [md_table(["flipped", "method", "n", "training pairs", "held out", "gap", "best held out"], body), ""]
    if plots.get("overfit"):
        out += ["![over-fitting](overfit.png)", ""]

    # 4. Convergence.
    out += ["## 4. Convergence", "",
            f"test_id accuracy on {s['curve_eval_pairs']} pairs every {s['eval_steps']} steps (main regime, noise 0, "
            f"the paper's Figure 3), and the first logged step from which it stays at or above "
            f"{s['target_accuracy']} to the end of the run (runs that never settle there count as {censored} in "
            "the verdict).", ""]
    body = []
    for m in s["methods"]:
        reached = [v for v in steps.get(m, {}).values() if v is not None]
        mean, sd, n = mean_std(reached)
        finals = [r["curve"][-1][1] for r in default_runs(results, m).values() if r.get("curve")]
        body.append([f"`{m}`", f"{len(reached)} of {len(steps.get(m, {}))}", fmt(mean, sd, n, digits=0),
                     fmt(*mean_std(finals))])
    out += [md_table(["method", "settled at target", "steps to target (those that settled)", "last curve accuracy"],
                     body), ""]
    if plots.get("convergence"):
        out += ["![convergence](convergence.png)", ""]

    # 5. Sweeps.
    out += ["## 5. APLOT settings: gamma and scale", "",
            "APLOT at noise 0 in the main regime with one setting changed (gamma weighs the semantic cost, 1 − gamma "
            "the reward cost; the paper's Figure 2). `margin_scale` multiplies the margin; a scale equal to the "
            "batch size is the margin multiplied by B, which the paper leaves open.", ""]
    bt0 = default_runs(results, "bt")
    bt_row = [fmt(*mean_std([value(r, k) for r in bt0.values()])) for k in ("id_acc", "ood_acc", "id_hard")]
    for key in ("gamma", "scale"):
        table = sweep(results, key)
        body = [[f"{v:g}", str(t["id_acc"][2]), *[fmt(*t[k]) for k in ("id_acc", "ood_acc", "id_hard")]]
                for v, t in table.items()]
        out += [md_table([key, "n", "ID acc", "OOD acc", "ID hard"], body + [["BT (reference)", str(len(bt0)),
                                                                              *bt_row]]), ""]
        if table:
            best = max(table, key=lambda v: table[v]["id_acc"][0])
            out += [f"Best {key} by mean ID accuracy: {best:g} ({fmt(*table[best]['id_acc'])}).", ""]
    if plots.get("sweeps"):
        out += ["![sweeps](sweeps.png)", ""]

    # 6. Best-of-N.
    out += ["## 6. Best-of-N", ""]
    bon = results.get("bon", {})
    if bon.get("status") == "ok":
        ns = [n for n in sorted(kl) if n in (1, 4, 16, 64, 256)]
        out += [f"`pipelines.bon` ({bon['backend']} sampling) on {bon['n_prompts']} test_id prompts × "
                f"{bon['n_samples']} samples of the lineage's SFT policy in one sampling pass, scored by the main "
                f"regime's bt and aplot models at noise 0 (seeds "
                f"{', '.join(sorted({str(m['seed']) for m in bon['models'].values()}))}) and the world's gold "
                "reward; exact expectation over n-subsets. Gold reward of the proxy's pick, mean ± sd over seeds:", ""]
        body = [[f"`{m}`", *[fmt(*mean_std(list(by_method[m].get(n, {}).values()))) for n in ns]] for m in by_method]
        body.append(["gold itself (ceiling)", *[fmt(bon["oracle_gold_at_n"].get(str(n))) for n in ns]])
        out += [md_table(["proxy", *[f"gold@{n}" for n in ns]], body), ""]
        if plots.get("bon"):
            out += ["![Best-of-N](bon.png)", ""]
        out += overoptimisation_lines(bon, conf)
    else:
        out += [f"Not measured: {bon.get('error', 'no result')}.", ""]

    # 7. PPO.
    out += ["## 7. PPO", ""]
    ppo = results.get("ppo", {})
    if ppo.get("status") == "ok" and ppo_runs:
        failed_ppo = [name for name, r in ppo["runs"].items() if r.get("status") != "ok"]
        updates = next(r["updates"] for r in ppo["runs"].values() if r.get("status") == "ok")
        out += [f"`pipelines.ppo` on `{ppo['recipe']}` ({updates} updates, {ppo['episodes']} episodes) against each "
                "main-regime reward model at noise 0, the PPO seed the reward model's, one thread each. Gold reward, "
                "the proxy's reward and KL to the reference on the recipe's held-out prompts, mean ± sd over seeds"
                + (f"; failed: {', '.join(failed_ppo)}" if failed_ppo else "") + ":", ""]
        body = []
        for m, curves in ppo_runs.items():
            firsts, lasts = [c[0] for c in curves.values()], [c[-1] for c in curves.values()]
            body.append([f"`{m}`", str(len(curves)), fmt(*mean_std([p["gold"] for p in firsts])),
                         fmt(*mean_std([p["gold"] for p in lasts])), fmt(*mean_std([p["proxy"] for p in lasts])),
                         fmt(*mean_std([p["kl"] for p in lasts]))])
        out += [md_table(["reward model", "n", "gold before", "gold after", "proxy after", "KL after"], body), ""]
        if plots.get("ppo"):
            out += ["![PPO](ppo.png)", ""]
    else:
        out += [f"Not measured: {ppo.get('error', 'no result')}.", ""]

    # 8. Speed.
    out += ["## 8. Speed", "",
            "Each ratio is of two things timed side by side in one process, interleaved, so that the load of "
            "whatever else shares the machine falls on both; the median of the repeats, min–max beside it.", ""]
    body = []
    for r in rows:
        if r.get("median") is None:
            body.append([r["what"], "not measured", "", "" if r["target"] is None else f"{r['target']:g}", ""])
            continue
        target = "" if r["target"] is None else f"{'≤' if r['at_most'] else '≥'} {r['target']:g}"
        met = "" if r["met"] is None else ("met" if r["met"] else "**not met**")
        body.append([r["what"], f"{r['median']:.3f}", f"{r['min']:.3f}–{r['max']:.3f} (n = {r['n']})", target, met])
    out += [md_table(["ratio", "median", "spread", "target", ""], body), ""]
    out += speed_details(results)
    if plots.get("speed"):
        out += ["![speed](speed.png)", ""]

    out += ["## Time", "", md_table(["section", "seconds"], [[k, f"{v:.0f}"] for k, v in results["sections"].items()]),
            ""]
    if runs:
        out += [f"Training runs: median wall time {statistics.median(r['wall_seconds'] for r in runs):.0f} s "
                f"each ({statistics.median(r.get('train_seconds', 0) for r in runs if 'train_seconds' in r):.0f} "
                "s of it training)." if any("train_seconds" in r for r in runs) else "", ""]
    return "\n".join(out).rstrip() + "\n"


def speed_details(results) -> list[str]:
    """The absolute numbers behind the ratios, as sentences."""
    lines = []
    for threads, step in threaded(results.get("speed_step")):
        lines.append(f"- Training step ({step['runs'][0]['pairs_per_step']} pairs, {threads} thread"
                     f"{'s' * (threads > 1)}, {step['runs'][0]['steps']} interleaved steps a run, "
                     f"{len(step['runs'])} runs): BT {step['bt_step_ms']['median']:.1f} ms "
                     f"({step['bt_step_ms']['min']:.1f}–{step['bt_step_ms']['max']:.1f}), the OT margin "
                     f"{step['ot_solve_ms']['median']:.2f} ms (medians).")
    steps = threaded(results.get("speed_step"))
    if len(steps) > 1 and steps[-1][1]["bt_step_ms"]["median"] > steps[0][1]["bt_step_ms"]["median"]:
        (one, first), (many, last) = steps[0], steps[-1]
        lines.append(f"- The {many}-thread BT step was slower than the {one}-thread one "
                     f"({last['bt_step_ms']['median']:.1f} against {first['bt_step_ms']['median']:.1f} ms): other "
                     f"work was competing for the cores, which stalls multi-threaded kernels, so the {many}-thread "
                     f"ratio is mostly that noise. The {one}-thread ratio is the one to read.")
    for b, row in results.get("speed_sinkhorn", {}).items():
        if isinstance(row, dict) and "pot_ms" in row:
            lines.append(f"- Sinkhorn plan, batch {b}, 50 iterations: POT {row['pot_ms']:.3f} ms, `transport_plan` "
                         f"{row['transport_plan_ms']:.3f} ms; largest difference between the plans "
                         f"{row['max_plan_difference']:.1e}.")
    score = results.get("speed_scoring", {})
    if "sequences_per_s" in score:
        sps = score["sequences_per_s"]
        lines.append(f"- Scoring {score['sequences']} sequences (mean {score['mean_tokens']:.0f} tokens, batches of "
                     f"{score['batch_size']}, {score['threads']} threads): bare forward {sps['bare_forward']:.0f}/s, "
                     f"scorer from ids {sps['scorer_ids']:.0f}/s, from texts {sps['scorer_texts']:.0f}/s.")
    for name, g in results.get("speed_generation", {}).items():
        if g.get("status") == "ok":
            sps = g["samples_per_s"]
            lines.append(f"- Generation, {name} (`{g['model']}`): {g['n_prompts']} prompts × {g['n']} samples × "
                         f"{g['max_new_tokens']} tokens each, {g['repeats']} rounds after a warm-up: vLLM "
                         f"{sps['vllm']:.0f} samples/s, transformers {sps['transformers']:.0f} samples/s at "
                         f"{g['torch_threads']} threads and {sps['transformers_1thread']:.0f} at 1 (medians); "
                         f"vLLM's engine start, not counted: {g['vllm_engine_start_s']:.0f} s.")
        elif isinstance(g, dict):
            lines.append(f"- Generation, {name}: not measured ({g.get('error')}).")
    return lines + [""] if lines else []


# ------------------------------------------------------------------------- the real backbone (its own run)

REAL_LABELS = {"bt": "bt", "aplot": "aplot (own hidden state)", "aplot_minilm": "aplot (MiniLM cost)"}


def real_by_seed(real, method, metric, noise) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in real["runs"] if r["method"] == method and r["noise"] == noise}


def plot_real_backbone(real, path) -> bool:
    """Held-out accuracy by method and flipped share (each seed a dot), and Best-of-N gold against n."""
    if not real or not real.get("runs"):
        return False
    s = real["settings"]
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, metric, title in ((axes[0], "id_acc", "test_id accuracy"), (axes[1], "ood_acc", "test_ood accuracy")):
        for i, method in enumerate(s["methods"]):
            for j, noise in enumerate(s["noise_levels"]):
                values = list(real_by_seed(real, method, metric, noise).values())
                x = j + (i - (len(s["methods"]) - 1) / 2) * 0.22
                ax.scatter([x] * len(values), values, s=14, color=f"C{i}", alpha=0.7,
                           label=REAL_LABELS.get(method, method) if j == 0 else None)
                if values:
                    ax.hlines(sum(values) / len(values), x - 0.09, x + 0.09, color=f"C{i}")
        ax.set_xticks(range(len(s["noise_levels"])), [f"{nz:.0%} flipped" for nz in s["noise_levels"]])
        ax.set(title=f"{title} (dots: seeds, bar: mean)")
    axes[0].legend(fontsize=7)
    bon = real["bon"]
    ns = sorted(int(n) for n in bon["ceiling"])
    for i, method in enumerate(s["methods"]):
        rows = [r["gold"] for r in bon["proxies"] if r["method"] == method]
        if rows:
            means = [sum(r[str(n)] if str(n) in r else r[n] for r in rows) / len(rows) for n in ns]
            axes[2].plot(ns, means, "o-", color=f"C{i}", label=REAL_LABELS.get(method, method))
    axes[2].plot(ns, [bon["ceiling"][str(n)] if str(n) in bon["ceiling"] else bon["ceiling"][n] for n in ns], "k--",
                 label="gold itself (ceiling)")
    axes[2].set_xscale("log", base=2)
    axes[2].set(xlabel="n (samples per prompt)", ylabel="gold reward of the pick",
                title=f"Best-of-n, {bon['prompts']} test_id prompts (mean over seeds)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render_real_backbone(real: dict, plotted: bool) -> list[str]:
    """The section of RESULTS.md on a real pretrained backbone, from benchmarks/real_backbone.json alone."""
    s, conf, env = real["settings"], real["confidence"], real["environment"]
    trunk, pairs, t = real["trunk"], real["pairs"], real["timing"]
    sampling = real["sampling"]
    rec = real["recipe"]
    out = ["", "## A real backbone: SmolLM2-135M-Instruct on the spoken world", "",
           f"Generated by `make bench-real` (`python -m benchmarks.real_backbone --form {s['name']}`) from "
           f"`real_backbone.json` beside this file: started {real['started']}, {real['wall_seconds'] / 60:.1f} min "
           f"wall time, largest process {real['peak_rss_gib']:.1f} GiB; {env['cpu_count']} CPUs, commit "
           f"{env['commit']}.", "",
           f"**Data.** The spoken world (`dataset_name: spoken`, recipe `{s['recipe']}`): the embedded world's "
           f"constraint task asked as chat requests and answered by `{rec['spoken_policy']}` itself with vLLM, "
           f"{s['spoken_samples']} samples per prompt, {s['pairs_per_prompt']} pairs of distinct samples per prompt "
           "chosen by the world's gold reward (half hard: gap at most 0.55 between the most similar texts; half "
           "easy: gap at least 0.6). **The labels are synthetic (the gold function), the text is a real model's.** "
           f"{s['n_train']} training pairs ({pairs['train']['hard']} hard, {pairs['train']['easy']} easy, from "
           f"{pairs['train']['prompts']} prompts), {pairs['test_id']} test_id and {pairs['test_ood']} test_ood pairs "
           "(prompts no training prompt shares; test_ood asks for 4 words from both topics). Drawing the samples "
           f"this run needed took {t['sampling_s']:.0f} s (largest sampling process {sampling['peak_rss_gib']:.1f} "
           "GiB); samples already in the cache are reused, so a rerun's time says little about a first build.", "",
           f"**Training mode** (what fits 2 CPU cores): the reward model is `{rec['model']}` with a new score head; "
           f"its top {trunk['trained_layers']} of {trunk['layers']} decoder layers, final norm and score head are "
           f"trained, the {trunk['layers'] - trunk['trained_layers']} layers below frozen. The frozen layers ran "
           f"once per distinct text ({trunk['texts']} texts, {trunk['mean_tokens']:.0f} tokens on average, "
           f"{t['trunk_s']:.0f} s), and every training ran on their output: {s['epochs']} epochs of "
           f"{s['batch_pairs']} pairs a step, AdamW at {s['learning_rate']:g} (cosine, {s['warmup_fraction']:.0%} "
           f"warm-up), weight decay {s['weight_decay']:g}, max_length {rec['max_length']}. The loss is "
           "`aplot.objective`'s as the trainer calls it (gamma "
           f"{rec['gamma']:g}, epsilon {rec['epsilon']:g}, {rec['sinkhorn_iters']} Sinkhorn iterations, margin_scale "
           f"{rec['margin_scale']:g}) in a plain PyTorch loop, not TRL's trainer, which takes token ids rather than "
           f"cached states. {len(real['runs'])} trainings in {t['training_s'] / 60:.1f} min; "
           f"{len(s['seeds'])} seeds ({', '.join(map(str, s['seeds']))}: the seed sets the score head's "
           "initialisation and the data order; the pairs and flipped labels are the same for every seed).", "",
           "Methods: `bt`; `aplot` with the semantic cost from the reward model's own hidden state (the score "
           "head's input, as `make rm` does by default); `aplot` with the cost from a frozen all-MiniLM-L6-v2's "
           "embeddings of the response texts (`ot_embedder: minilm-l6`).", ""]
    header = ["method", "flipped", "n", "test_id acc", "test_id hard", "test_ood acc", "test_id margin"]
    rows = []
    for noise in s["noise_levels"]:
        for method in s["methods"]:
            cells = []
            for metric in ("id_acc", "id_hard_acc", "ood_acc", "id_margin"):
                values = [v for v in real_by_seed(real, method, metric, noise).values() if v is not None]
                cells.append(fmt(*mean_std(values)))
            rows.append([f"`{REAL_LABELS.get(method, method)}`", f"{noise:.0%}",
                         str(len(real_by_seed(real, method, "id_acc", noise))), *cells])
    out += [md_table(header, rows), ""]
    if plotted:
        out += ["![accuracy and Best-of-N on the real backbone](real_backbone.png)", ""]
    out += [f"**Verdicts** (paired by seed, {conf:.0%} Student-t interval; the detectable difference is at 80 % "
            "power):", ""]
    for noise in s["noise_levels"]:
        for method in [m for m in s["methods"] if m != "bt"]:
            for metric, what in (("id_acc", "in distribution"), ("ood_acc", "out of distribution")):
                c = compare(real_by_seed(real, method, metric, noise), real_by_seed(real, "bt", metric, noise), conf)
                label = REAL_LABELS.get(method, method)
                out.append(verdict_line(f"{label} against bt, {what}, {noise:.0%} flipped", c, conf))
    bon = real["bon"]
    ns = sorted(int(n) for n in bon["ceiling"])
    get = lambda d, n: d[str(n)] if str(n) in d else d[n]  # noqa: E731 - json keys are strings
    rows = []
    for method in s["methods"]:
        got = [r["gold"] for r in bon["proxies"] if r["method"] == method]
        if got:
            rows.append([f"`{REAL_LABELS.get(method, method)}`", str(len(got)),
                         *[fmt(*mean_std([get(g, n) for g in got])) for n in ns]])
    rows.append(["gold itself (ceiling)", "", *[f"{get(bon['ceiling'], n):.3f}" for n in ns]])
    out += ["", f"**Best-of-N of the real policy**: {bon['prompts']} test_id prompts, {bon['samples']} samples each "
            "from SmolLM2-135M-Instruct (vLLM); each proxy (the 0 %-flipped models, one per seed) picks the best of n "
            "by its reward, and the table gives the pick's gold reward, exact over the random n-subsets of the "
            "samples (`aplot.bon.best_of_n`); mean ± sd over seeds.", "",
            md_table(["proxy", "seeds", *[f"N={n}" for n in ns]], rows), ""]
    top = ns[-1]
    for method in [m for m in s["methods"] if m != "bt"]:
        a = {r["seed"]: get(r["gold"], top) for r in bon["proxies"] if r["method"] == method}
        b = {r["seed"]: get(r["gold"], top) for r in bon["proxies"] if r["method"] == "bt"}
        out.append(verdict_line(f"Best-of-{top} gold, {REAL_LABELS.get(method, method)} against bt",
                                compare(a, b, conf), conf))
    return out + [""]


def step_verdict(step: dict, target: float, mean: str = "aplot_over_bt_mean") -> str | None:
    """Whether a step-time ratio meets `target`, from the 95 % interval of its mean per-step ratio (`mean`: the
    wall-clock one, or `cpu_aplot_over_bt_mean`): met or not only when the interval is on one side. Entries from
    before the interval was kept use the median (wall clock) or have none (None)."""
    low, high = step.get(f"{mean}_ci95") or (None, None)
    if low is None:
        return None if mean.startswith("cpu") else "met" if step["aplot_over_bt"] <= target else "**not met**"
    interval = f"mean {step[mean]:.3f}, 95 % interval {low:.3f}-{high:.3f}"
    if high <= target:
        return f"met ({interval})"
    if low > target:
        return f"**not met** ({interval})"
    return f"not shown either way ({interval}, which contains {target:g})"


def render_real_speed(entries: dict) -> list[str]:
    """RESULTS.md's table of the speed ratios on real checkpoints, from benchmarks/real_speed.json alone."""
    rows = []
    for preset, r in entries.items():
        step, score, gen, targets = r["step"], r["scoring"], r["generation"], r["targets"]
        met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
        ratio = step["aplot_over_bt"]
        cells = [f"`{preset}`", f"{r['started'][:10]}, commit {r['environment']['commit']}, {r['torch_threads']} "
                 f"threads, {r['wall_seconds'] / 60:.1f} min",
                 f"{ratio:.3f} (interquartile {step['aplot_over_bt_iqr'][0]:.3f}-"
                 f"{step['aplot_over_bt_iqr'][1]:.3f}; {step['steps']} steps of {step['pairs_per_step']} pairs, "
                 f"BT {step['bt_step_ms'] / 1e3:.1f} s a step; the OT solve {step['ot_solve_ms']:.2f} ms, "
                 f"{100 * step['ot_solve_share_of_aplot_step']:.3f} % of an APLOT step; "
                 f"target <= 1.01: {step_verdict(step, 1.01)}"
                 + (f"; in CPU time: {cpu}" if (cpu := step_verdict(step, 1.01, "cpu_aplot_over_bt_mean")) else "")
                 + ")",
                 f"{score['scorer_ids_over_bare']['median']:.3f} ({score['sequences']} sequences, "
                 f"{score['mean_tokens']:.0f} tokens on average; target >= {targets['scorer_over_bare_min']}: "
                 f"{met(score['scorer_ids_over_bare']['median'] >= targets['scorer_over_bare_min'])})"]
        if "vllm_over_faster_transformers" in gen:
            v = gen["vllm_over_faster_transformers"]["median"]
            cells.append(f"{v:.2f} ({gen['n_prompts']} prompts x {gen['n']} samples of {gen['max_new_tokens']} "
                         "tokens; "
                         f"vLLM {gen['samples_per_s']['vllm']:.1f} samples/s; target >= "
                         f"{targets['vllm_over_transformers_min']:g}: "
                         f"{met(v >= targets['vllm_over_transformers_min'])})")
        else:
            cells.append(f"{gen.get('status', 'failed')}: {gen.get('error')}")
        rows.append(cells)
    return ["", "## Speed on real checkpoints", "",
            "Generated by `make bench-speed-real` (`python -m benchmarks.real_speed --preset <name>`) from "
            "`real_speed.json` beside this file. Each ratio is two things timed side by side in one run, "
            "alternating: APLOT against BT training steps of the preset's reward model (its rm recipe, a new score "
            "head), the project's scorer against a bare batched forward of the same padded batches, and vLLM "
            "against transformers `generate` (the faster of its two thread settings in each round) on the preset "
            "as a policy, every sample of fixed length. With a few steps of several seconds each, the step ratio's "
            "spread is the machine's; the OT solve's share of a step is what APLOT adds.", "",
            md_table(["preset", "run", "APLOT/BT step time", "scorer / bare forward", "vLLM / transformers samples/s"],
                     rows), ""]


def write(results_path, out_dir) -> str:
    """RESULTS.md and the plots in `out_dir`, from the results json alone (and, where the real-backbone
    section has run, `real_backbone.json` beside it)."""
    results = json.loads(Path(results_path).read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    real_path = Path(results_path).parent / "real_backbone.json"
    real = json.loads(real_path.read_text()) if real_path.exists() else None
    for name, draw in (("quality", plot_quality), ("overfit", plot_overfit), ("convergence", plot_convergence),
                       ("sweeps", plot_sweeps), ("bon", plot_bon), ("ppo", plot_ppo), ("speed", plot_speed),
                       ("real_backbone", lambda _, path: plot_real_backbone(real, path))):
        path = out_dir / f"{name}.png"
        plots[name] = draw(results, path)
        if not plots[name] and path.exists():
            path.unlink()  # a plot of an earlier run must not stand beside these numbers
    text = render(results, plots)
    if real:
        text = text.rstrip("\n") + "\n" + "\n".join(render_real_backbone(real, plots["real_backbone"]))
    speed_path = Path(results_path).parent / "real_speed.json"
    if speed_path.exists():
        text = text.rstrip("\n") + "\n" + "\n".join(render_real_speed(json.loads(speed_path.read_text())))
    (out_dir / "RESULTS.md").write_text(text)
    return text


def write_section(out_dir, name: str, data) -> Path:
    """A section's own results file (`real_backbone.json`, `real_speed.json`) into `out_dir`, and RESULTS.md
    regenerated beside it where the main bench's results.json is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    file = out / name
    file.write_text(json.dumps(data, indent=1) + "\n")
    if (out / "results.json").exists():
        write(out / "results.json", out)
    return file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="benchmarks/results.json")
    parser.add_argument("--out", default=None, help="default: the directory of the results file")
    opts = parser.parse_args(argv)
    write(opts.results, opts.out or Path(opts.results).parent)
    print(f"wrote {Path(opts.out or Path(opts.results).parent) / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
