"""The bench's reward-model trainings: every section, method, seed, label-noise level and APLOT setting as
one real `make rm` run (pipelines.rm on the embedded recipe with overrides), run two at a time.

Each training gets one thread: on 2 cores two one-thread runs side by side finish sooner than the same
runs one after the other with two threads each, and a one-thread run does not collapse when other work
shares the machine (two-thread OpenMP kernels slowed 5-10x here when a third process was busy).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from aplot.evaluation import eval_curves
from benchmarks.settings import BenchSettings

DEFAULT_GAMMA, DEFAULT_SCALE = 0.1, 1.0


def run_id(method, seed, noise=0.0, gamma=DEFAULT_GAMMA, scale=DEFAULT_SCALE, section="main") -> str:
    """A run's name (and its directory and Best-of-N scorer name): its section unless main, then what
    differs from the recipe."""
    name = ("" if section == "main" else f"{section}-") + f"{method}-noise{noise:g}"
    if gamma != DEFAULT_GAMMA:
        name += f"-gamma{gamma:g}"
    if scale != DEFAULT_SCALE:
        name += f"-scale{scale:g}"
    return f"{name}-seed{seed}"


def plan(s: BenchSettings) -> list[dict]:
    """Every training the sections need, each once: the main regime's default APLOT run at noise 0 serves
    the quality table, the convergence curves, both sweeps, Best-of-N and PPO. Noise-0 main runs of the
    default settings log the convergence curve; over-fitting runs log theirs after every epoch."""
    specs = {}

    def add(method, seed, noise=0.0, gamma=DEFAULT_GAMMA, scale=DEFAULT_SCALE, section="main"):
        spec = {"id": run_id(method, seed, noise, gamma, scale, section), "section": section, "method": method,
                "seed": seed, "noise": noise, "gamma": gamma, "scale": scale,
                "logs_curve": section == "overfit" or (section == "main" and noise == 0 and gamma == DEFAULT_GAMMA
                                                       and scale == DEFAULT_SCALE)}
        specs.setdefault(spec["id"], spec)

    for i, seed in enumerate(s.seeds):
        for noise in s.noise_levels:
            for method in s.methods:
                add(method, seed, noise)
        if i < s.sweep_seeds:
            for gamma in s.gammas:
                add("aplot", seed, gamma=gamma)
            for scale in s.scales:
                add("aplot", seed, scale=scale)
        for noise in s.scratch_noise_levels:
            for method in s.scratch_methods:
                add(method, seed, noise, section="scratch")
        for noise in s.overfit_noise_levels:
            for method in s.overfit_methods:
                add(method, seed, noise, section="overfit")
    # The runs that also log a curve take longest: start them first so no long run is left at the end.
    return sorted(specs.values(), key=lambda r: not r["logs_curve"])


def rm_argv(spec: dict, s: BenchSettings, out_dir: Path) -> list[str]:
    """The command line of `python -m pipelines.rm` for one run."""
    section = spec.get("section", "main")
    n_train, epochs = 16 * s.max_steps, 1
    if section == "overfit":  # a small training set seen several times, in as many steps as a main run
        n_train, epochs = 16 * s.max_steps // s.overfit_fraction, s.overfit_epochs
    argv = ["--config", s.recipe, "--output_dir", str(out_dir / spec["id"]), "--loss_type", spec["method"],
            "--seed", str(spec["seed"]), "--label_noise", str(spec["noise"]), "--gamma", str(spec["gamma"]),
            "--margin_scale", str(spec["scale"]), "--model_name_or_path", s.preset,
            "--init_from", "scratch" if section == "scratch" else "sft",
            "--learning_rate", str(s.scratch_learning_rate if section == "scratch" else s.learning_rate),
            "--n_train", str(n_train), "--num_train_epochs", str(epochs), "--max_steps", str(n_train * epochs // 16),
            "--warmup_steps", str(s.warmup_steps), "--n_eval", str(s.n_eval),
            "--save_strategy", "no", "--logging_steps", str(max(1, min(50, s.max_steps // 4))),
            "--report_to", "none", "--disable_tqdm", "true",
            "--lineage_dir", str(out_dir.parent / "lineage")]  # the bench's own, beside its rm directory
    if spec["method"] == "margin":
        argv += ["--margin_value", str(s.margin_value)]
    if section == "overfit":
        # every training pair scored after each epoch, beside curve_eval_pairs held-out pairs
        argv += ["--eval_strategy", "epoch", "--curve_train_pairs", str(n_train), "--curve_eval_pairs",
                 str(s.curve_eval_pairs)]
    elif spec["logs_curve"]:
        argv += ["--eval_strategy", "steps", "--eval_steps", str(s.eval_steps),
                 "--curve_eval_pairs", str(s.curve_eval_pairs)]
    else:
        argv += ["--eval_strategy", "no"]
    return argv


def held_out(curves: dict) -> list:
    """The held-out curve of `eval_curves`: the one set that is not the training pairs."""
    return next((curve for name, curve in curves.items() if name != "train"), [])


def _one_thread():
    import torch

    torch.set_num_threads(1)


def train_one(spec: dict, argv: list[str], log_path: str) -> dict:
    """Run pipelines.rm.main(argv), its output to `log_path`; the record the report needs, or why it
    failed (a diverged run is a result, not a reason to stop the bench)."""
    record = dict(spec)
    start = time.perf_counter()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "w") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            from pipelines import rm

            metrics = rm.main(argv)
            out = Path(argv[argv.index("--output_dir") + 1])
            history = json.loads((out / "log_history.json").read_text())
            curves = eval_curves(history)
            record.update(status="ok", train_seconds=metrics["train_seconds"], train_steps=metrics["train_steps"],
                          eval={split: {"accuracy": m["accuracy"], "hard_accuracy": m["hard"]["accuracy"],
                                        "auc": m["auc"], "mean_reward_margin": m["mean_reward_margin"]}
                                for split, m in metrics["eval"].items()},
                          curve=[list(point) for point in held_out(curves)],
                          train_curve=[list(point) for point in curves.get("train", [])],
                          final_train_loss=next((h["train_loss"] for h in history if "train_loss" in h), None))
        except Exception as err:  # noqa: BLE001 - recorded and reported, the other runs go on
            traceback.print_exc()
            record.update(status="failed", error=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                          if str(err).strip() else type(err).__name__)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    record["wall_seconds"] = round(time.perf_counter() - start, 2)
    return record


def run_all(s: BenchSettings, out_dir: Path, log=print, resume=False) -> list[dict]:
    """Every planned training; `s.workers` processes of one thread each, or in this process when 0.
    Each finished run's record is kept beside its log (`<id>.json`), which `resume` reads back."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = plan(s)
    jobs = [(spec, rm_argv(spec, s, out_dir), str(out_dir / f"{spec['id']}.log")) for spec in specs]
    records, start, total = [], time.perf_counter(), len(jobs)

    def done(record):
        records.append(record)
        Path(out_dir / f"{record['id']}.json").write_text(json.dumps(record))
        test_id = record.get("eval", {}).get("test_id", {}).get("accuracy")
        test_ood = record.get("eval", {}).get("test_ood", {}).get("accuracy")
        what = (f"test_id {test_id:.3f}, test_ood {test_ood:.3f}" if record["status"] == "ok"
                else f"FAILED {record['error']}")
        log(f"[{len(records)}/{total} {time.perf_counter() - start:5.0f} s] {record['id']}: {what} "
            f"({record['wall_seconds']:.0f} s)")

    # --resume: a run that finished in an earlier, interrupted bench is read back, not trained again.
    if resume:
        for job in list(jobs):
            saved = Path(job[2]).with_suffix(".json")
            if saved.exists():
                jobs.remove(job)
                records.append(json.loads(saved.read_text()))
        if records:
            log(f"resuming: {len(records)} trainings already done")

    if s.workers <= 0:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for job in jobs:
                done(train_one(*job))
        finally:
            torch.set_num_threads(threads)
    else:
        with ProcessPoolExecutor(s.workers, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
            for future in as_completed([pool.submit(train_one, *job) for job in jobs]):
                done(future.result())
    order = {spec["id"]: i for i, spec in enumerate(specs)}
    return sorted(records, key=lambda r: order[r["id"]])
