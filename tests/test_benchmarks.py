"""The benchmark machinery: the step-time ratio from its own timings, the micro form of `make bench`
end to end through the real pipelines, and a results file that is computed from the json alone."""

import copy
import json
from pathlib import Path

import pytest

from benchmarks import quality, report, run, step_time
from benchmarks.settings import FULL, QUICK


def test_a_step_target_is_met_or_missed_only_when_its_interval_is_on_one_side():
    step = {"aplot_over_bt": 1.0, "aplot_over_bt_mean": 1.0}
    assert report.step_verdict({**step, "aplot_over_bt_mean_ci95": [0.99, 1.005]}, 1.01).startswith("met (")
    assert report.step_verdict({**step, "aplot_over_bt_mean_ci95": [1.02, 1.05]}, 1.01).startswith("**not met**")
    assert report.step_verdict({**step, "aplot_over_bt_mean_ci95": [0.9, 1.1]}, 1.01) == (
        "not shown either way (mean 1.000, 95 % interval 0.900-1.100, which contains 1.01)")
    assert report.step_verdict({"aplot_over_bt": 1.054}, 1.01) == "**not met**"  # an entry from before the interval
    assert report.step_verdict({"aplot_over_bt": 1.054}, 1.01, "cpu_aplot_over_bt_mean") is None
    cpu = {"cpu_aplot_over_bt_mean": 1.001, "cpu_aplot_over_bt_mean_ci95": [0.995, 1.007]}
    assert report.step_verdict(cpu, 1.01, "cpu_aplot_over_bt_mean") == "met (mean 1.001, 95 % interval 0.995-1.007)"


def test_step_time_benchmark_reports_the_ratio_of_its_medians():
    result = step_time.main(["--steps", "4", "--warmup", "1", "--batch", "4", "--threads", "1"])
    assert result["steps"] == 4 and result["pairs_per_step"] == 4 and result["threads"] == 1
    assert result["bt_step_ms"] > 0 and result["aplot_step_ms"] > 0 and result["ot_solve_ms"] > 0
    low, high = result["aplot_over_bt_iqr"]
    assert low <= result["aplot_over_bt"] <= high
    low, high = result["aplot_over_bt_mean_ci95"]  # over two pairs of steps, each pair one in either order
    assert result["order_balanced_pairs"] == 2 and low < result["aplot_over_bt_mean"] < high
    low, high = result["cpu_aplot_over_bt_mean_ci95"]
    assert low <= result["cpu_aplot_over_bt_mean"] <= high and len(result["aplot_cpu_ms"]) == 4
    assert len(result["bt_ms"]) == len(result["aplot_ms"]) == 4 and set(result["aplot_over_bt_by_first"]) == {
        "bt_first", "aplot_first"}
    assert result["ot_solve_share_of_aplot_step"] == pytest.approx(
        result["ot_solve_ms"] / result["aplot_step_ms"])


@pytest.mark.parametrize("form", [FULL, QUICK])
def test_plans_cover_every_section_once(form):
    specs = quality.plan(form)
    ids = [s["id"] for s in specs]
    assert len(ids) == len(set(ids))
    for i, seed in enumerate(form.seeds):
        for noise in form.noise_levels:
            for method in form.methods:
                assert quality.run_id(method, seed, noise) in ids
        swept = [quality.run_id("aplot", seed, gamma=g) for g in form.gammas if g != quality.DEFAULT_GAMMA]
        swept += [quality.run_id("aplot", seed, scale=x) for x in form.scales if x != quality.DEFAULT_SCALE]
        assert all((run_id in ids) == (i < form.sweep_seeds) for run_id in swept)
        for section, methods, noises in (("scratch", form.scratch_methods, form.scratch_noise_levels),
                                         ("overfit", form.overfit_methods, form.overfit_noise_levels)):
            assert all(quality.run_id(m, seed, nz, section=section) in ids for m in methods for nz in noises)
    # curves: the main regime's default runs at noise 0 (convergence) and every over-fitting run
    assert {s["id"] for s in specs if s["logs_curve"]} == (
        {quality.run_id(m, seed) for m in form.methods for seed in form.seeds}
        | {s["id"] for s in specs if s["section"] == "overfit"})
    argv = quality.rm_argv(next(s for s in specs if s["method"] == "margin"), form, Path("out"))
    assert argv[argv.index("--margin_value") + 1] == str(form.margin_value)
    assert argv[argv.index("--n_train") + 1] == str(16 * form.max_steps)
    assert argv[argv.index("--init_from") + 1] == "sft"
    scratch = quality.rm_argv(next(s for s in specs if s["section"] == "scratch"), form, Path("out"))
    assert scratch[scratch.index("--init_from") + 1] == "scratch"
    assert scratch[scratch.index("--learning_rate") + 1] == str(form.scratch_learning_rate)
    # over-fitting: a fraction of the pairs for several epochs, in as many steps as a main run
    small = quality.rm_argv(next(s for s in specs if s["section"] == "overfit"), form, Path("out"))
    n = int(small[small.index("--n_train") + 1])
    assert n * form.overfit_fraction == 16 * form.max_steps
    assert int(small[small.index("--max_steps") + 1]) == form.max_steps
    assert small[small.index("--num_train_epochs") + 1] == str(form.overfit_epochs)
    assert small[small.index("--curve_train_pairs") + 1] == str(n)
    assert small[small.index("--eval_strategy") + 1] == "epoch"


@pytest.mark.slow
def test_micro_bench_runs_every_stage_and_writes_results_from_its_json(tmp_path):
    from tests.conftest import make_preset

    form = run.FORMS["micro"]
    results = run.main(["--form", "micro", "--out", str(tmp_path / "work"), "--results", str(tmp_path / "res"),
                        "--preset", make_preset(tmp_path)])
    runs = results["runs"]
    assert {r["id"] for r in runs} == {s["id"] for s in quality.plan(form)}
    assert all(r["status"] == "ok" for r in runs), [r.get("error") for r in runs]
    # the numbers are the pipeline's own: what pipelines.rm wrote for that run
    bt = next(r for r in runs if r["id"] == quality.run_id("bt", 0))
    saved = json.loads((tmp_path / "work" / "rm" / bt["id"] / "metrics.json").read_text())
    assert bt["eval"]["test_id"]["accuracy"] == saved["eval"]["test_id"]["accuracy"]
    assert bt["curve"] and all(step > 0 for step, _ in bt["curve"]) and not bt["train_curve"]
    # the main regime starts from the bench's own lineage; the scratch regime does not
    settings = {r["id"]: json.loads((tmp_path / "work" / "rm" / r["id"] / "run_settings.json").read_text())
                for r in runs}
    assert {r["section"]: settings[r["id"]]["init_from"] for r in runs} == {
        "main": "sft", "overfit": "sft", "scratch": "scratch"}
    assert list((tmp_path / "work" / "lineage").glob("*/sft/lineage.json"))
    # over-fitting: training-pair and held-out accuracy after each of its epochs
    small = next(r for r in runs if r["section"] == "overfit")
    steps_per_epoch = form.max_steps // form.overfit_fraction
    assert [s for s, _ in small["train_curve"]] == [s for s, _ in small["curve"]] == [
        steps_per_epoch * (e + 1) for e in range(form.overfit_epochs)]
    assert results["bon"]["status"] == "ok" and results["bon"]["n_samples"] == 4
    ppo = results["ppo"]
    assert ppo["status"] == "ok" and {r["method"] for r in ppo["runs"].values()} == {"bt", "aplot"}
    assert all(r["status"] == "ok" and len(r["gold_curve"]) >= 2 for r in ppo["runs"].values())
    assert results["speed_step"]["1"]["aplot_over_bt"]["median"] > 0
    assert results["speed_scoring"]["scorer_ids_over_bare"]["median"] > 0

    res = tmp_path / "res"
    on_disk = json.loads((res / "results.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(runs))
    text = (res / "RESULTS.md").read_text()
    plots = ("quality", "overfit", "convergence", "sweeps", "bon", "ppo", "speed")
    assert text == report.render(on_disk, {name: (res / f"{name}.png").exists() for name in plots})
    for name in plots:
        assert (res / f"{name}.png").stat().st_size > 1000, name
    assert f"{bt['eval']['test_id']['accuracy']:.3f}" in text
    for heading in ("## Where APLOT does and does not beat BT", "## 2. From scratch", "## 3. Over-fitting",
                    "## 6. Best-of-N", "## 7. PPO", "## Beside an independent replication"):
        assert heading in text


def fake_results(id_acc_aplot, id_acc_bt, seeds=(0, 1, 2)):
    """A results json with only what the quality section reads."""
    runs = []
    for method, accs in (("aplot", id_acc_aplot), ("bt", id_acc_bt)):
        for seed, acc in zip(seeds, accs):
            runs.append({"id": quality.run_id(method, seed), "method": method, "seed": seed, "noise": 0.0,
                         "gamma": 0.1, "scale": 1.0, "logs_curve": True, "status": "ok", "wall_seconds": 1.0,
                         "train_seconds": 1.0,
                         "curve": [[25, acc - 0.1], [50, acc]],
                         "eval": {split: {"accuracy": acc, "hard_accuracy": acc, "auc": acc, "mean_reward_margin": 1}
                                  for split in ("test_id", "test_ood")}})
    settings = copy.deepcopy(run.FORMS["micro"].to_dict())
    settings.update(methods=["bt", "aplot"], noise_levels=[0.0], seeds=list(seeds), max_steps=50, eval_steps=25,
                    target_accuracy=0.75)
    return {"form": "micro", "settings": settings, "targets": run.TARGETS, "confidence": run.CONFIDENCE,
            "started": "now", "wall_seconds": 60, "sections": {"runs": 1.0}, "runs": runs,
            "environment": {"cpu_count": 2, "commit": "x", "packages": {}}}


@pytest.mark.parametrize("aplot,bt,verdict", [
    ((0.90, 0.91, 0.92), (0.80, 0.82, 0.81), "**APLOT beats BT**"),
    ((0.80, 0.82, 0.81), (0.90, 0.91, 0.92), "**APLOT does worse than BT**"),
    ((0.85, 0.80, 0.83), (0.82, 0.84, 0.81), "**no clear difference**"),
])
def test_verdicts_follow_the_numbers(tmp_path, aplot, bt, verdict):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fake_results(aplot, bt)))
    text = report.write(path, tmp_path)
    line = next(x for x in text.splitlines() if x.startswith("- In-distribution accuracy"))
    assert verdict in line
    diff = sum(a - b for a, b in zip(aplot, bt)) / 3
    assert f"{diff:+.3f}" in line
    assert (tmp_path / "RESULTS.md").read_text() == text


def test_one_seed_gets_no_verdict_and_a_changed_number_changes_the_file(tmp_path):
    results = fake_results((0.9,), (0.8,), seeds=(0,))
    first = report.render(results, {})
    assert "one seed only, APLOT − BT = +0.100; no verdict" in first
    results["runs"][0]["eval"]["test_id"]["accuracy"] = 0.7
    assert "APLOT − BT = -0.100" in report.render(results, {})


def test_resume_reads_finished_trainings_back_instead_of_training(tmp_path):
    form = run.FORMS["micro"]
    for spec in quality.plan(form):
        (tmp_path / f"{spec['id']}.json").write_text(json.dumps({**spec, "status": "ok", "wall_seconds": 0}))
    messages = []
    records = quality.run_all(form, tmp_path, log=messages.append, resume=True)
    assert [r["id"] for r in records] == [s["id"] for s in quality.plan(form)]
    assert messages == [f"resuming: {len(records)} trainings already done"]


def test_detectable_difference_has_the_stated_power():
    """n = 5 seeds, paired sd = 1, two-sided 5 % test: the delta returned is detected 80 % of the time.
    Checked by simulation, independently of the noncentral-t equation the function solves: 200,000 runs
    of a paired t-test on normal differences with that mean reject in 80 % of them (+-0.5 %). The normal
    approximation (t_0.975,4 + t_0.8,4) / sqrt(5) = (2.776 + 0.941) / 2.236 = 1.662 lies close by."""
    import numpy as np
    from scipy.stats import t

    from benchmarks.stats import detectable_difference

    delta = detectable_difference(1.0, 5, 0.05)
    assert delta == pytest.approx(1.662, rel=0.03)
    diffs = np.random.default_rng(0).normal(delta, 1.0, size=(200_000, 5))
    stat = diffs.mean(1) / (diffs.std(1, ddof=1) / np.sqrt(5))
    assert np.mean(np.abs(stat) > t.ppf(0.975, 4)) == pytest.approx(0.80, abs=0.005)
    assert detectable_difference(2.0, 5, 0.05) == pytest.approx(2 * delta)  # scales with the spread
    assert detectable_difference(1.0, 20, 0.05) < delta  # more seeds see smaller differences
    assert detectable_difference(1.0, 1, 0.05) is None and detectable_difference(0.0, 5, 0.05) is None



def test_ppo_gold_is_read_at_the_kl_where_each_curve_first_reaches_it():
    curve = [{"kl": 0.0, "gold": 0.1}, {"kl": 2.0, "gold": 0.3}, {"kl": 4.0, "gold": 0.2}, {"kl": 3.0, "gold": 0.5}]
    assert report.gold_at_kl(curve, 1.0) == pytest.approx(0.2)  # half way from 0.1 to 0.3
    assert report.gold_at_kl(curve, 3.0) == pytest.approx(0.25)  # on the way up, not where KL fell back to 3
    assert report.gold_at_kl(curve, 5.0) is None
