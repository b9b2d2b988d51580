"""Benchmark: APLOT/BT training-step time of a recipe's reward model (the embedded default unless told), side
by side in one run.

Two trainers start from the same weights and take the same batches; their steps (forward,
backward, optimizer) are interleaved, alternating which goes first, so machine noise hits both
alike. Prints the median of the per-step time ratios with its interquartile range, and the OT
solve's share of an APLOT step.

    python -m benchmarks.step_time [--steps 60] [--batch 16] [--threads 1] [--recipe recipes/rm/embedded.yaml]
    python -m benchmarks.step_time --recipe recipes/rm/smollm2-135m-instruct.yaml --steps 8 --warmup 2   # real
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch


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
    began = time.perf_counter()
    for step, batch in enumerate(batches):
        if opts.max_seconds and time.perf_counter() - began > opts.max_seconds and len(times["bt"]) >= 5:
            break
        order = list(trainers) if step % 2 == 0 else list(reversed(trainers))
        for name in order:
            trainer = trainers[name]
            start = time.perf_counter()
            trainer.training_step(trainer.model, dict(batch))
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad()
            if step >= opts.warmup:
                times[name].append(time.perf_counter() - start)

    ratios = [a / b for a, b in zip(times["aplot"], times["bt"])]
    solve = trainers["aplot"]._metrics["train"]["ot_solve_ms"][opts.warmup:]
    r_lo, r_med, r_hi = quartiles(ratios)
    result = {
        "steps": len(ratios), "pairs_per_step": opts.batch, "threads": torch.get_num_threads(),
        "bt_step_ms": statistics.median(times["bt"]) * 1e3,
        "aplot_step_ms": statistics.median(times["aplot"]) * 1e3,
        "aplot_over_bt": r_med, "aplot_over_bt_iqr": [r_lo, r_hi],
        "ot_solve_ms": statistics.median(solve),
        "ot_solve_share_of_aplot_step": statistics.median(solve) / (statistics.median(times["aplot"]) * 1e3),
    }
    print(f"BT step     {result['bt_step_ms']:7.1f} ms (median of {len(ratios)}, {result['threads']} threads)")
    print(f"APLOT step  {result['aplot_step_ms']:7.1f} ms")
    print(f"APLOT/BT step-time ratio: {r_med:.3f} (interquartile {r_lo:.3f}-{r_hi:.3f}; target <= 1.05)")
    print(f"OT solve: {result['ot_solve_ms']:.2f} ms, {100 * result['ot_solve_share_of_aplot_step']:.1f} % "
          "of an APLOT step")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
