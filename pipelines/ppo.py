"""Stage 3, `make ppo`: optimise a policy with TRL's PPO against a trained reward model, measuring gold
reward, proxy reward and KL to the reference as it goes. Writes the policy (safetensors + tokenizer),
metrics.json, gold_curve.json and gold_vs_kl.png to `output_dir`.

    python -m pipelines.ppo --config recipes/ppo/embedded.yaml [--key value ...]
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from aplot.errors import UserError, run_pipeline


def main(argv=None) -> dict:
    from aplot.config import RecipeParser
    from aplot.distributed import init_distributed
    from aplot.ppo import APLOTPPOConfig

    init_distributed()  # before the recipe builds TrainingArguments: one process group for every rank
    (args,) = RecipeParser((APLOTPPOConfig,)).parse_recipe(argv)
    return run(args)


def run(args) -> dict:
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    from aplot import lineage
    from aplot.data import load_prompts
    from aplot.evaluation import write_json
    from aplot.outputs import STAGING, RunPlan, check_output_dir, publish_model
    from aplot.ppo import (
        GoldEvaluation,
        RetokenizedReward,
        distinct_pad,
        load_trainer_class,
        plot_gold_vs_kl_curve,
        rendering_mismatch,
        same_tokenizer,
    )
    from aplot.reward_model import (
        RewardScorer,
        check_path,
        load_report,
        load_reward_model,
        load_tokenizer,
        quiet_load_report,
    )

    out = Path(args.output_dir)
    check_output_dir(out)
    # Resume: the newest complete checkpoint holds the policy, the value model, the optimizer and
    # scheduler state and the gold history; one made with other settings is refused before any work.
    plan = RunPlan(out, args.resume, run_settings(args), results=RESULTS, marker=GOLD_HISTORY)
    for path, what in ((args.reward_model_path, "reward model"), (args.gold, "gold reward model"),
                       (args.value_model_path, "value model")):
        if path not in (None, "embedded"):
            check_path(path, what)
    prompts = load_prompts(args.prompt_dataset, args.prompt_split, args.n_prompts, args.prompt_format,
                           args.prompt_config, args.prompt_columns, args.world_seed)
    eval_prompts = load_prompts(args.prompt_dataset, args.eval_prompt_split, args.n_eval_prompts, args.prompt_format,
                                args.prompt_config, args.prompt_columns, args.world_seed)

    # Every model and tokenizer is loaded, and the pair checked, before the first update.
    policy_path = lineage.policy_path(args.sft_model_path, args.lineage_dir)
    tokenizer = load_tokenizer(policy_path, args.trust_remote_code)
    tokenizer.padding_side = "left"
    reward_model, reward_tokenizer = load_reward_model(args.reward_model_path, device="cpu", dtype=args.dtype,
                                                       trust_remote_code=args.trust_remote_code)
    proxy = RewardScorer(reward_model, reward_tokenizer, args.score_batch_size, args.score_max_length,
                         normalize=args.normalize_rewards)
    gold = args.gold
    if gold != "embedded":
        gold_model, gold_tokenizer = load_reward_model(gold, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        gold = RewardScorer(gold_model, gold_tokenizer, args.score_batch_size, args.score_max_length)

    query_ids, counts = encode_prompts(tokenizer, prompts, args.max_prompt_length)
    eval_ids, _ = encode_prompts(tokenizer, eval_prompts, None)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # PPO finds the end of each response by its padding, so padding must not look like eos.
        tokenizer.pad_token = distinct_pad(tokenizer, [q for q in query_ids + eval_ids if q is not None])
        print(f"{policy_path}: the policy pads with {tokenizer.pad_token!r} in PPO (its own pad is its eos)")
    # TRL's PPO hands the reward model the policy's token ids (query, response, eos) and reads the reward
    # at the eos: checked before the first update that those are the ids the reward model was trained on.
    vocab = same_tokenizer(tokenizer, reward_tokenizer)
    mismatch = (f"have different tokenizers ({vocab})" if vocab
                else rendering_mismatch(tokenizer, proxy, eval_prompts[0], eval_ids[0]))
    if mismatch and not args.retokenize_rewards:
        raise UserError(f"policy {policy_path} and reward model {args.reward_model_path} {mismatch}: PPO would "
                        "score token ids the reward model reads differently; set retokenize_rewards: true to "
                        "decode each response and re-encode it as the reward model was trained, or use a reward "
                        "model trained with the policy's tokenizer and layout")
    train = Dataset.from_dict({"input_ids": [q for q in query_ids if q is not None]})
    if len(train) < args.per_device_train_batch_size * args.gradient_accumulation_steps:
        raise UserError(f"only {len(train)} training prompts (after max_prompt_length), fewer than one PPO batch")

    checkpoint, done, history = plan.checkpoint, 0, []
    if checkpoint is not None:
        done = int(checkpoint.name.split("-")[-1])
        history = json.loads((checkpoint / GOLD_HISTORY).read_text())
    world = max(1, torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    total = math.ceil((args.total_episodes or int(args.num_train_epochs * len(train))) / batch)
    if done >= total:
        print(f"{checkpoint} already holds all {total} updates")
    args.total_episodes = (total - done) * batch

    if PartialState().is_main_process:
        plan.prepare()
    PartialState().wait_for_everyone()
    set_seed(args.seed)  # before any fresh weights (a value head started from the policy) are made
    load = {"trust_remote_code": args.trust_remote_code}
    if args.dtype not in (None, "auto"):
        load["dtype"] = getattr(torch, args.dtype)
    start_path = str(checkpoint) if checkpoint else policy_path
    policy = AutoModelForCausalLM.from_pretrained(start_path, **load)
    reference = AutoModelForCausalLM.from_pretrained(policy_path, **load)
    for model in (policy, reference):  # sequences that stop early are padded with the tokenizer's pad
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    # The value model reads the policy's token ids: from the reward model when they share a vocabulary.
    value_path = (str(checkpoint / "value_model") if checkpoint else args.value_model_path
                  or (policy_path if vocab else args.reward_model_path))
    with quiet_load_report():  # one line, not transformers' key table, when the value head is new
        value_model, info = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1,
                                                                               output_loading_info=True, **load)
    if report := load_report(value_path, value_model, info):
        print(f"value model: {report}")
    value_model.config.pad_token_id = tokenizer.pad_token_id
    scorer_for_ppo = (RetokenizedReward(proxy, tokenizer, prompts, [q for q in query_ids if q is not None])
                      if mismatch else reward_model)

    gold_eval = GoldEvaluation(args, eval_prompts, tokenizer, proxy, gold, step_offset=done, history=history)
    trainer_class = load_trainer_class()
    trainer_class.schedule_steps = total
    trainer = trainer_class(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                            reward_model=scaled_reward(scorer_for_ppo, proxy, args), train_dataset=train,
                            value_model=value_model, eval_dataset=Dataset.from_dict({"input_ids": eval_ids}),
                            callbacks=[gold_eval])
    trainer.gold = gold_eval
    gold_eval.set_trainer(trainer, eval_ids)
    if checkpoint is not None:
        if (checkpoint / "optimizer.pt").exists():
            trainer.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        else:  # DeepSpeed keeps its optimizer state in its own format: the optimizer starts afresh
            print(f"{checkpoint}: no optimizer.pt (a DeepSpeed checkpoint); the optimizer state restarts")
        trainer.lr_scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))

    started = time.perf_counter()
    if done < total:
        trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model(str(out / STAGING))  # then moved in weights-last: a killed save never looks finished

    history = gold_eval.history
    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    metrics = {"reward_model": args.reward_model_path, "policy": str(policy_path), "gold": args.gold,
               "updates": total, "resumed_from_update": done or None, "train_seconds": round(seconds, 2),
               "episodes_per_update": batch, "kl_coef": args.kl_coef, "prompts": counts,
               "processes": trainer.accelerator.num_processes, "zero_stage": zero_stage,
               "before": history[0], "after": history[-1], "gold_curve": history,
               "ppo_log": trainer.state.log_history}
    if trainer.accelerator.is_main_process:
        publish_model(out / STAGING, out)
        write_json(out / "metrics.json", metrics)
        write_json(out / "gold_curve.json", history)
        plot_gold_vs_kl_curve({out.name: history}, out / "gold_vs_kl.png")
        from aplot.cards import write_model_card

        dropped = {"too long": counts["too_long"]} if counts["too_long"] else {}
        prompt_counts = {"rows_read": counts["prompts"], "kept": counts["prompts"] - counts["too_long"],
                         "dropped": dropped}
        write_model_card(out, kind="policy", base_model=str(policy_path), recipe=run_settings(args),
                         data_counts={"prompts": prompt_counts},
                         metrics={k: metrics[k] for k in ("reward_model", "gold", "updates", "train_seconds",
                                                          "before", "after")},
                         trainer="TRL's PPOTrainer")
        b, a = history[0], history[-1]
        print(f"{'':<8}{'gold':>8}{'proxy':>8}{'KL':>8}\n{'before':<8}{b['gold']:>8.3f}{b['proxy']:>8.3f}"
              f"{b['kl']:>8.3f}\n{'after':<8}{a['gold']:>8.3f}{a['proxy']:>8.3f}{a['kl']:>8.3f}")
        print(f"{total} PPO updates in {seconds:.0f} s; wrote {out}/ (model.safetensors, metrics.json, "
              "gold_curve.json, gold_vs_kl.png)")
    return metrics


def encode_prompts(tokenizer, prompts, max_length):
    """The policy's query ids for each prompt (its chat template for conversations); prompts longer
    than `max_length` become None and are counted."""
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
           if isinstance(p, list) else tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = [list(x) for x in ids]
    too_long = sum(max_length is not None and len(x) > max_length for x in ids)
    if too_long:
        ids = [x if len(x) <= max_length else None for x in ids]
    return ids, {"prompts": len(prompts), "too_long": too_long}


# A PPO checkpoint's last file (aplot.ppo writes it after the value model): its presence marks it complete.
GOLD_HISTORY = "gold_history.json"
RESULTS = ("metrics.json", "gold_curve.json", "gold_vs_kl.png", "training_args.bin", "README.md")
# What a checkpoint's run must share with the rerun that resumes it.
RUN_KEYS = ("sft_model_path", "reward_model_path", "value_model_path", "retokenize_rewards", "gold", "prompt_dataset",
            "prompt_config", "prompt_format", "prompt_split", "n_prompts", "max_prompt_length", "eval_prompt_split",
            "n_eval_prompts", "eval_samples_per_prompt", "world_seed", "total_episodes", "num_train_epochs",
            "per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "num_ppo_epochs",
            "response_length", "temperature", "stop_token", "missing_eos_penalty", "kl_coef", "kl_estimator",
            "learning_rate", "lr_scheduler_type", "cliprange", "vf_coef", "cliprange_value", "gamma", "lam",
            "whiten_rewards", "seed", "dtype", "world_size", "normalize_rewards", "reward_clip")


def scaled_reward(reward_model, proxy, args):
    """The reward model PPO optimises: normalised with the proxy scorer's stats and clipped when asked."""
    from aplot.ppo import ScaledReward

    if proxy.normalization is None and args.reward_clip is None:
        return reward_model
    mean, std = proxy.normalization or (0.0, 1.0)
    return ScaledReward(reward_model, mean, std, args.reward_clip)


def run_settings(args) -> dict:
    return {key: getattr(args, key) for key in RUN_KEYS}


if __name__ == "__main__":
    run_pipeline(main)
