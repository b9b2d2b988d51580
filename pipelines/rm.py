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
    from aplot.config import parse_rm_recipe
    from aplot.distributed import init_distributed
    from aplot.outputs import lock

    init_distributed()  # before the recipe builds TrainingArguments: one process group for every rank
    data_cfg, args, model_cfg = parse_rm_recipe(argv)
    with lock(args.output_dir):  # one run per output directory, held until its results are published
        return run(data_cfg, args, model_cfg)


def run(data_cfg, args, model_cfg) -> dict:
    from transformers import set_seed
    from trl import get_peft_config

    from aplot import lineage
    from aplot.config import check_model_source, run_settings
    from aplot.data import load_eval_sets, load_train
    from aplot.data.formats import as_pairs
    from aplot.distributed import zero3_init_disabled
    from aplot.evaluation import (
        evaluate_reward_models,
        format_table,
        plot_reward_distributions,
        plot_training_curve,
        require_rows,
        write_json,
    )
    from aplot.outputs import STAGING, RunPlan, publish_model
    from aplot.reward_model import (
        CHAT_KEY,
        RewardScorer,
        build_reward_model,
        check_weights,
        load_reward_model,
        load_tokenizer,
        tokenize_pairs,
    )
    from aplot.trainer import APLOTRewardTrainer

    check_model_source(model_cfg.model_name_or_path, "model", args.trust_remote_code, model_cfg.init_from)
    out = Path(args.output_dir)  # checked writable by lock() in main(), before any of this

    # Everything that can fail on bad input happens before training starts (the data first: building a
    # preset's lineage below takes a while the first time).
    train, train_counts = load_train(data_cfg)
    eval_sets = load_eval_sets(data_cfg)
    require_rows(eval_sets)  # an empty one would fail only in the evaluation after training
    if len(train) == 0:
        raise UserError(f"{data_cfg.dataset_name}: no usable training pairs ({train_counts})")
    if args.loss_type == "margin" and args.margin_value is None and "margin" not in train.column_names:
        raise UserError("loss_type=margin needs margin_value, or a `margin` column in the dataset")
    init_path = lineage.model_path(model_cfg.model_name_or_path, model_cfg.init_from, model_cfg.lineage_dir)
    if args.ot_embedder:  # a preset's name becomes its directory; the recorded settings keep the name
        check_model_source(args.ot_embedder, "ot_embedder", args.trust_remote_code)
        args.ot_embedder = lineage.model_path(args.ot_embedder, "sft", model_cfg.lineage_dir)
    tokenizer = load_tokenizer(data_cfg.tokenizer_name_or_path or lineage.tokenizer_path(init_path,
                                                                                         model_cfg.lineage_dir),
                               args.trust_remote_code)
    # Read-only: an output_dir that is not this stage's, or is or holds an input model, and resuming a
    # checkpoint of other settings are refused here, before any work.
    plan = RunPlan(out, args.resume, run_settings(data_cfg, args, model_cfg), args.resume_from_checkpoint,
                   results=RESULTS, stage="rm", overwrite=args.overwrite_output_dir,
                   inputs={"model_name_or_path": [model_cfg.model_name_or_path, init_path],
                           "tokenizer_name_or_path": data_cfg.tokenizer_name_or_path})
    if plan.checkpoint is not None:  # resumed weights are held to the same loading policy as any others
        check_weights(str(plan.checkpoint), "checkpoint", args.trust_remote_code)
    work = plan.work  # the run writes everything here (checkpoints too); publish() swaps it into out
    args.output_dir = str(work)

    def for_trainer(pairs):
        # TRL adds a `margin` column to every loss; keep it only for loss_type=margin.
        if args.loss_type != "margin" and "margin" in pairs.column_names:
            pairs = pairs.remove_columns("margin")
        return tokenize_pairs(pairs, tokenizer, args.max_length, data_cfg.as_chat)

    train, train_counts["truncated"] = for_trainer(train)
    # Trainer seeds only after the model exists: without this a fresh score head (and the tiny
    # models' every weight) would differ from run to run, and a rerun could not match a first run.
    set_seed(args.seed)
    model = build_reward_model(init_path, tokenizer, model_cfg.dtype, args.trust_remote_code,
                               fresh=model_cfg.init_from == "scratch")
    setattr(model.config, CHAT_KEY, data_cfg.as_chat)  # saved with it: every stage then scores as trained

    curve_set = None
    if eval_sets and args.eval_strategy != "no":
        first, _ = next(iter(eval_sets.values()))
        first = as_pairs(first)  # a response_lists set is tracked as its chosen x rejected pairs
        curve_set, _ = for_trainer(first.select(range(min(data_cfg.curve_eval_pairs, len(first)))))
        if data_cfg.curve_train_pairs:
            # the pairs as trained on (flipped labels included), beside the held-out set, so that the two
            # curves show how far the model fits its training pairs beyond what carries over
            curve_set = {next(iter(eval_sets)): curve_set,
                         "train": train.select(range(min(data_cfg.curve_train_pairs, len(train))))}
    trainer = APLOTRewardTrainer(model, args, train_dataset=train, eval_dataset=curve_set,
                                 processing_class=tokenizer, peft_config=get_peft_config(model_cfg))

    # Only now, with every input checked, does the run start working (aside: an earlier run in out stays
    # as it is until this one has finished).
    if trainer.accelerator.is_main_process:
        plan.prepare()
    trainer.accelerator.wait_for_everyone()
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
    train_seconds = time.perf_counter() - start
    # Saved aside, then moved in weights-last: a kill mid-save never leaves weights without their tokenizer.
    trainer.save_model(str(work / STAGING))
    trainer.accelerator.wait_for_everyone()  # DeepSpeed may have every rank write its shard there
    if trainer.accelerator.is_main_process:
        publish_model(work / STAGING, work)

    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    metrics = {"loss_type": args.loss_type, "train_seconds": round(train_seconds, 2),
               "train_steps": trainer.state.global_step, "train_pairs": len(train),
               "processes": trainer.accelerator.num_processes, "zero_stage": zero_stage,
               "data": {"train": train_counts, **{name: counts for name, (_, counts) in eval_sets.items()}}}
    if zero_stage == 3:
        # The sharded model scores a few training sequences on every rank (each forward gathers the
        # shards), to be set against what the consolidated model.safetensors scores below.
        probe = list(train["chosen_ids"][:8]) + list(train["rejected_ids"][:8])
        live = RewardScorer(trainer.model.eval(), tokenizer, batch_size=16).score_ids(probe)
    if trainer.accelerator.is_main_process:
        # Under ZeRO-3 this rank holds only a shard of each weight: evaluate the consolidated model
        # that save_model just wrote (and so prove it loads without DeepSpeed).
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        if zero_stage == 3:
            with zero3_init_disabled():
                model = load_reward_model(str(work), device=str(trainer.args.device))[0]
            saved = RewardScorer(model, tokenizer, batch_size=16).score_ids(probe)
            metrics["zero3_saved_vs_live_max_abs_diff"] = (saved - live).abs().max().item()
        scorer = RewardScorer(model, tokenizer, batch_size=args.per_device_eval_batch_size, max_length=args.max_length)
        results, rewards = evaluate_reward_models({out.name: scorer}, eval_sets)
        metrics["eval"] = results[out.name]
        metrics["reward_stats"] = record_reward_stats(work, rewards[out.name], results[out.name], model)
        write_json(work / "metrics.json", metrics)
        from aplot.cards import write_model_card

        write_model_card(work, kind="reward_model", base_model=model_cfg.model_name_or_path,
                         recipe=run_settings(data_cfg, args, model_cfg), data_counts=metrics["data"],
                         metrics={k: metrics[k] for k in ("train_seconds", "train_steps", "reward_stats", "eval")})
        write_json(work / "log_history.json", trainer.state.log_history)
        plot_training_curve(trainer.state.log_history, work / "training_curve.png",
                            title=f"{args.loss_type} reward model: {out.name}")
        if rewards[out.name]:
            plot_reward_distributions(rewards, work / "reward_distributions.png")
        plan.publish()
        print(format_table(results))
        print(f"trained {metrics['train_steps']} steps in {train_seconds:.0f} s; wrote {out}/ "
              "(model.safetensors, metrics.json, training_curve.png, reward_distributions.png)")
    return metrics


RESULTS = ("metrics.json", "log_history.json", "training_curve.png", "reward_distributions.png", "training_args.bin",
           "README.md")


def record_reward_stats(out: Path, rewards: dict, results: dict, model) -> dict | None:
    """Mean and standard deviation of the trained model's rewards (chosen and rejected together) on the
    first eval set, written into `out/config.json` as `reward_stats` for `normalize_rewards: true`, with
    what OpenRLHF and verl read there (`aplot.reward_model.engine_config`: the head's name, the same mean
    and std); without an eval set, only the latter's head fields."""
    import json

    import numpy as np

    from aplot.outputs import write_json
    from aplot.reward_model import engine_config

    stats = None
    if rewards:
        name = next(iter(rewards))
        values = np.array(rewards[name]["chosen"] + rewards[name]["rejected"], dtype=float)
        if len(values) >= 2:
            stats = {"mean": float(values.mean()), "std": float(values.std()), "eval_set": name,
                     "pairs": results[name].get("n", 0), "responses": len(values)}
    config = json.loads((out / "config.json").read_text())
    fields = engine_config(model, stats) | ({"reward_stats": stats} if stats else {})
    write_json(out / "config.json", {**config, **fields})
    return stats


if __name__ == "__main__":
    run_pipeline(main, resume="--resume true")
