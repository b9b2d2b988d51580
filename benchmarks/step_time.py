"""Benchmark: APLOT/BT training-step time of a recipe's reward model (the embedded default unless told), side
by side in one run.

Two trainers start from the same weights and take the same batches; their steps (forward,
backward, optimizer) are interleaved, alternating which goes first, so machine noise hits both
alike. Prints the median of the per-step time ratios with its interquartile range, the 95 % interval
of their mean over pairs of consecutive steps (one in each order, which cancels an order effect),
and the OT solve's share of an APLOT step.

    python -m benchmarks.step_time [--steps 60] [--batch 16] [--threads 1] [--recipe recipes/rm/embedded.yaml]
    python -m benchmarks.step_time --recipe recipes/rm/smollm2-135m-instruct.yaml --steps 8 --warmup 2   # real
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

from benchmarks.stats import mean_interval


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/rm/embedded.yaml")
    parser.add_argument("--steps", type=int, default=60, help="measured steps per trainer")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="pairs per step (the embedded recipe: 16)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, as make rm)")
    parser.add_argument("--max_seconds", type=float, default=None,
                        help="stop measuring after this long (at least 5 steps): when other work keeps the cores "
                             "busy, multi-threaded steps can take 50x longer")
    opts = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        return measure(opts)
    finally:
        torch.set_num_threads(threads)  # called in-process by the bench: leave the process as it was


def measure(opts):
    from datasets import Dataset

    from aplot.config import parse_rm_recipe
    from aplot.data import load_train
    from aplot.lineage import model_path, tokenizer_path
    from aplot.reward_model import build_reward_model, has_weights, load_tokenizer
    from aplot.trainer import APLOTRewardTrainer

    n_pairs = opts.batch * (opts.steps + opts.warmup)
    common = ["--config", opts.recipe, "--output_dir", "/tmp/aplot-bench-step", "--report_to", "none",
              "--per_device_train_batch_size", str(opts.batch), "--n_train", str(n_pairs), "--disable_tqdm", "true",
              "--eval_strategy", "no"]
    data_cfg, _, model_cfg = parse_rm_recipe(common)
    tokenizer = load_tokenizer(data_cfg.tokenizer_name_or_path
                               or tokenizer_path(model_cfg.model_name_or_path, model_cfg.lineage_dir))
    train, _ = load_train(data_cfg)
    torch.manual_seed(0)
    # what `make rm` starts from: a preset's (or an imported checkpoint's) weights, or the recipe's path itself;
    # an embedded preset with no weights yet is built from its config (the step time does not depend on them)
    path = model_cfg.model_name_or_path
    if model_cfg.init_from != "scratch" and (has_weights(path) or not Path(path, "config.json").is_file()):
        path = model_path(path, model_cfg.init_from, model_cfg.lineage_dir)
    base = build_reward_model(path, tokenizer, fresh=not has_weights(path))

    trainers = {}
    for loss_type in ("bt", "aplot"):
        _, args, _ = parse_rm_recipe(common + ["--loss_type", loss_type])
        trainers[loss_type] = APLOTRewardTrainer(copy.deepcopy(base), args, train_dataset=Dataset.from_dict(
            train.to_dict()), processing_class=tokenizer)
        trainers[loss_type].create_optimizer_and_scheduler(num_training_steps=opts.steps + opts.warmup)
        trainers[loss_type].current_gradient_accumulation_steps = 1  # set by train(); we drive the steps
    batches = list(trainers["bt"].get_train_dataloader())

    times = {name: [] for name in trainers}
    # CPU time too, which leaves out time that other work (or a hypervisor) takes the cores for: where the two
    # intervals disagree, the machine was shared; where they agree, the spread is in the work itself
    cpu = {name: [] for name in trainers}
    began = time.perf_counter()
    for step, batch in enumerate(batches):
        if opts.max_seconds and time.perf_counter() - began > opts.max_seconds and len(times["bt"]) >= 5:
            break
        order = list(trainers) if step % 2 == 0 else list(reversed(trainers))
        for name in order:
            trainer = trainers[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            trainer.training_step(trainer.model, dict(batch))
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad()
            if step >= opts.warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)

    ratios = [a / b for a, b in zip(times["aplot"], times["bt"])]
    solve = trainers["aplot"]._metrics["train"]["ot_solve_ms"][opts.warmup:]
    r_lo, r_med, r_hi = quartiles(ratios)
    # Whether a target such as 1.01 is shown: a 95 % interval, not the median alone. Whichever trainer goes
    # second in a step may run warmer or colder (caches, the allocator); two consecutive steps, one in each
    # order, cancel that, so the interval is over those pairs (the geometric mean of their two ratios).
    def balanced(ratios):
        return [math.sqrt(ratios[i] * ratios[i + 1]) for i in range(0, len(ratios) - 1, 2)]

    pairs = balanced(ratios)
    mean = mean_interval(pairs)
    cpu_mean = mean_interval(balanced([a / b for a, b in zip(cpu["aplot"], cpu["bt"])]))
    first = {name: [r for i, r in enumerate(ratios) if (i + opts.warmup) % 2 == (name == "aplot")]
             for name in ("bt", "aplot")}
    result = {
        "steps": len(ratios), "pairs_per_step": opts.batch, "threads": torch.get_num_threads(),
        "bt_step_ms": statistics.median(times["bt"]) * 1e3,
        "aplot_step_ms": statistics.median(times["aplot"]) * 1e3,
        "aplot_over_bt": r_med, "aplot_over_bt_iqr": [r_lo, r_hi],
        "aplot_over_bt_mean": mean["mean"], "aplot_over_bt_mean_ci95": [mean["low"], mean["high"]],
        "order_balanced_pairs": len(pairs),
        "cpu_aplot_over_bt_mean": cpu_mean["mean"], "cpu_aplot_over_bt_mean_ci95": [cpu_mean["low"], cpu_mean["high"]],
        "aplot_over_bt_by_first": {f"{name}_first": statistics.median(r) if r else None for name, r in first.items()},
        "bt_ms": [t * 1e3 for t in times["bt"]], "aplot_ms": [t * 1e3 for t in times["aplot"]],
        "bt_cpu_ms": [t * 1e3 for t in cpu["bt"]], "aplot_cpu_ms": [t * 1e3 for t in cpu["aplot"]],
        "ot_solve_ms": statistics.median(solve),
        "ot_solve_share_of_aplot_step": statistics.median(solve) / (statistics.median(times["aplot"]) * 1e3),
    }
    print(f"BT step     {result['bt_step_ms']:7.1f} ms (median of {len(ratios)}, {result['threads']} threads)")
    print(f"APLOT step  {result['aplot_step_ms']:7.1f} ms")
    print(f"APLOT/BT step-time ratio: {r_med:.3f} (interquartile {r_lo:.3f}-{r_hi:.3f}; target <= 1.05)")
    if mean["low"] is not None:
        print(f"  over {len(pairs)} pairs of steps in both orders: mean {mean['mean']:.3f}, 95 % interval "
              f"{mean['low']:.3f}-{mean['high']:.3f}; in CPU time {cpu_mean['mean']:.3f}, "
              f"{cpu_mean['low']:.3f}-{cpu_mean['high']:.3f}")
    print(f"OT solve: {result['ot_solve_ms']:.2f} ms, {100 * result['ot_solve_share_of_aplot_step']:.3f} % "
          "of an APLOT step")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
