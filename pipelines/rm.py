"""Stage 1, `make rm`: train a reward model with APLOTRewardTrainer, then evaluate it in and out of
distribution. Writes the model (safetensors + tokenizer), metrics.json, training_curve.png and
reward_distributions.png.

    python -m pipelines.rm --config recipes/rm/embedded.yaml [--key value ...]
"""

from __future__ import annotations

import time
from pathlib import Path

from aplot.errors import UserError, run_pipeline


def main(argv=None) -> dict:
    from transformers import set_seed
    from trl import get_peft_config

    from aplot.config import parse_rm_recipe, run_settings
    from aplot.data import load_eval_sets, load_train
    from aplot.distributed import init_distributed, zero3_init_disabled
    from aplot.evaluation import (
        evaluate_reward_models,
        format_table,
        plot_reward_distributions,
        plot_training_curve,
        write_json,
    )
    from aplot.outputs import STAGING, RunPlan, publish_model
    from aplot.reward_model import (
        RewardScorer,
        build_reward_model,
        check_path,
        load_reward_model,
        load_tokenizer,
        tokenize_pairs,
    )
    from aplot.trainer import APLOTRewardTrainer

    init_distributed()  # before the recipe builds TrainingArguments: one process group for every rank
    data_cfg, args, model_cfg = parse_rm_recipe(argv)
    if not model_cfg.model_name_or_path:
        raise UserError("model_name_or_path is not set: name a model directory, hub id or config directory")
    check_path(model_cfg.model_name_or_path, "model")
    out = Path(args.output_dir)
    check_writable(out)
    # Read-only: resuming a checkpoint of other settings is refused here, before any work.
    plan = RunPlan(out, args.resume, run_settings(data_cfg, args, model_cfg), args.resume_from_checkpoint,
                   results=RESULTS)

    # Everything that can fail on bad input happens before training starts.
    tokenizer = load_tokenizer(data_cfg.tokenizer_name_or_path or model_cfg.model_name_or_path,
                               args.trust_remote_code)
    train, train_counts = load_train(data_cfg)
    eval_sets = load_eval_sets(data_cfg)
    if len(train) == 0:
        raise UserError(f"{data_cfg.dataset_name}: no usable training pairs ({train_counts})")
    if args.loss_type == "margin" and args.margin_value is None and "margin" not in train.column_names:
        raise UserError("loss_type=margin needs margin_value, or a `margin` column in the dataset")
    def for_trainer(pairs):
        # TRL adds a `margin` column to every loss; keep it only for loss_type=margin.
        if args.loss_type != "margin" and "margin" in pairs.column_names:
            pairs = pairs.remove_columns("margin")
        return tokenize_pairs(pairs, tokenizer, args.max_length)

    train, train_counts["truncated"] = for_trainer(train)
    # Trainer seeds only after the model exists: without this a fresh score head (and the tiny
    # models' every weight) would differ from run to run, and a rerun could not match a first run.
    set_seed(args.seed)
    model = build_reward_model(model_cfg.model_name_or_path, tokenizer, model_cfg.dtype, args.trust_remote_code)

    curve_set = None
    if eval_sets and args.eval_strategy != "no":
        first, _ = next(iter(eval_sets.values()))
        curve_set, _ = for_trainer(first.select(range(min(data_cfg.curve_eval_pairs, len(first)))))
    trainer = APLOTRewardTrainer(model, args, train_dataset=train, eval_dataset=curve_set,
                                 processing_class=tokenizer, peft_config=get_peft_config(model_cfg))

    # Only now, with every input checked, does the output directory change: partial leftovers of a
    # killed run go, and so does an earlier run when this one starts over.
    if trainer.accelerator.is_main_process:
        plan.prepare()
    trainer.accelerator.wait_for_everyone()
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
    train_seconds = time.perf_counter() - start
    # Saved aside, then moved in weights-last: a kill mid-save never leaves weights without their tokenizer.
    trainer.save_model(str(out / STAGING))
    trainer.accelerator.wait_for_everyone()  # DeepSpeed may have every rank write its shard there
    if trainer.accelerator.is_main_process:
        publish_model(out / STAGING, out)

    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    metrics = {"loss_type": args.loss_type, "train_seconds": round(train_seconds, 2),
               "train_steps": trainer.state.global_step, "train_pairs": len(train),
               "processes": trainer.accelerator.num_processes, "zero_stage": zero_stage,
               "data": {"train": train_counts, **{name: counts for name, (_, counts) in eval_sets.items()}}}
    if trainer.accelerator.is_main_process:
        # Under ZeRO-3 this rank holds only a shard of each weight: evaluate the consolidated model
        # that save_model just wrote (and so prove it loads without DeepSpeed).
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        if zero_stage == 3:
            with zero3_init_disabled():
                model = load_reward_model(str(out), device=str(trainer.args.device))[0]
        scorer = RewardScorer(model, tokenizer, batch_size=args.per_device_eval_batch_size, max_length=args.max_length)
        results, rewards = evaluate_reward_models({out.name: scorer}, eval_sets)
        metrics["eval"] = results[out.name]
        write_json(out / "metrics.json", metrics)
        write_json(out / "log_history.json", trainer.state.log_history)
        plot_training_curve(trainer.state.log_history, out / "training_curve.png",
                            title=f"{args.loss_type} reward model: {out.name}")
        if rewards[out.name]:
            plot_reward_distributions(rewards, out / "reward_distributions.png")
        print(format_table(results))
        print(f"trained {metrics['train_steps']} steps in {train_seconds:.0f} s; wrote {out}/ "
              "(model.safetensors, metrics.json, training_curve.png, reward_distributions.png)")
    return metrics


RESULTS = ("metrics.json", "log_history.json", "training_curve.png", "reward_distributions.png", "training_args.bin")


def check_writable(out: Path) -> None:
    """Fail before any work when the output directory cannot be written (used by every stage)."""
    from aplot.outputs import check_output_dir

    check_output_dir(out)


if __name__ == "__main__":
    run_pipeline(main)
