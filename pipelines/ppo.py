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
    from aplot.outputs import lock
    from aplot.ppo import APLOTPPOConfig

    init_distributed()  # before the recipe builds TrainingArguments: one process group for every rank
    (args,) = RecipeParser((APLOTPPOConfig,)).parse_recipe(argv)
    with lock(args.output_dir):  # one run per output directory, held until its results are published
        return run(args)


def run(args) -> dict:
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    from aplot import lineage
    from aplot.config import check_model_source
    from aplot.data import load_prompts
    from aplot.evaluation import write_json
    from aplot.outputs import STAGING, RunPlan, publish_model
    from aplot.ppo import (
        GoldEvaluation,
        RetokenizedReward,
        load_trainer_class,
        plot_gold_vs_kl_curve,
        rendering_mismatch,
        same_tokenizer,
    )
    from aplot.reward_model import RewardScorer, check_reward_model, check_weights, load_reward_model, load_tokenizer

    out = Path(args.output_dir)
    check_model_source(args.sft_model_path, "policy", args.trust_remote_code)
    for path in (args.reward_model_path, args.gold):
        if path != "embedded":
            check_reward_model(path, args.trust_remote_code)
    if args.value_model_path is not None:
        check_weights(args.value_model_path, "value model", args.trust_remote_code)
    prompts = load_prompts(args.prompt_dataset, args.prompt_split, args.n_prompts, args.prompt_format,
                           args.prompt_config, args.prompt_columns, args.world_seed)
    eval_prompts = load_prompts(args.prompt_dataset, args.eval_prompt_split, args.n_eval_prompts, args.prompt_format,
                                args.prompt_config, args.prompt_columns, args.world_seed)
    # Resume: the newest complete checkpoint holds the policy, the value model, the optimizer and
    # scheduler state and the gold history; one made with other settings is refused before any work,
    # and so is an output_dir that is not this stage's or is or holds an input model.
    plan = RunPlan(out, args.resume, run_settings(args), results=RESULTS, marker=GOLD_HISTORY, stage="ppo",
                   overwrite=args.overwrite_output_dir,
                   inputs={key: getattr(args, key) for key in ("sft_model_path", "reward_model_path",
                                                                "value_model_path", "gold")})
    if plan.checkpoint is not None:  # a resumed run loads its policy and value model from the checkpoint
        for path in (plan.checkpoint, plan.checkpoint / "value_model"):
            check_weights(str(path), "checkpoint", args.trust_remote_code)
    work = plan.work  # the run writes everything here (checkpoints too); publish() swaps it into out

    # Every model and tokenizer is loaded, and the pair checked, before the first update.
    policy_path = lineage.policy_path(args.sft_model_path, args.lineage_dir)
    check_weights(policy_path, "policy", args.trust_remote_code)
    tokenizer = load_tokenizer(policy_path, args.trust_remote_code)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # PPO finds the end of each response by its padding, so padding must not look like eos.
        raise UserError(f"{policy_path}: the tokenizer needs a pad token distinct from eos for PPO")
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

    set_seed(args.seed)  # before any fresh weights (a value head started from the policy) are made
    load = {"trust_remote_code": args.trust_remote_code, "use_safetensors": True}
    if args.dtype not in (None, "auto"):
        load["dtype"] = getattr(torch, args.dtype)
    start_path = str(checkpoint) if checkpoint else policy_path
    policy = AutoModelForCausalLM.from_pretrained(start_path, **load)
    reference = AutoModelForCausalLM.from_pretrained(policy_path, **load)
    # The value model reads the policy's token ids: from the reward model when they share a vocabulary.
    value_path = (str(checkpoint / "value_model") if checkpoint else args.value_model_path
                  or (policy_path if vocab else args.reward_model_path))
    value_model = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1, **load)
    value_model.config.pad_token_id = tokenizer.pad_token_id
    # Every model is loaded: only now does the run start working (aside, out stays as it is till the end).
    if PartialState().is_main_process:
        plan.prepare()
    PartialState().wait_for_everyone()
    args.output_dir = str(work)
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
            trainer.optimizer.load_state_dict(load_state(checkpoint / "optimizer.pt"))
        else:  # DeepSpeed keeps its optimizer state in its own format: the optimizer starts afresh
            print(f"{checkpoint}: no optimizer.pt (a DeepSpeed checkpoint); the optimizer state restarts")
        trainer.lr_scheduler.load_state_dict(load_state(checkpoint / "scheduler.pt"))

    started = time.perf_counter()
    if done < total:
        trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model(str(work / STAGING))  # then moved in weights-last: a killed save never looks finished

    history = gold_eval.history
    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    metrics = {"reward_model": args.reward_model_path, "policy": str(policy_path), "gold": args.gold,
               "updates": total, "resumed_from_update": done or None, "train_seconds": round(seconds, 2),
               "episodes_per_update": batch, "kl_coef": args.kl_coef, "prompts": counts,
               "processes": trainer.accelerator.num_processes, "zero_stage": zero_stage,
               "before": history[0], "after": history[-1], "gold_curve": history,
               "ppo_log": trainer.state.log_history}
    if trainer.accelerator.is_main_process:
        publish_model(work / STAGING, work)
        write_json(work / "metrics.json", metrics)
        write_json(work / "gold_curve.json", history)
        plot_gold_vs_kl_curve({out.name: history}, work / "gold_vs_kl.png")
        from aplot.cards import write_model_card

        dropped = {"too long": counts["too_long"]} if counts["too_long"] else {}
        prompt_counts = {"rows_read": counts["prompts"], "kept": counts["prompts"] - counts["too_long"],
                         "dropped": dropped}
        write_model_card(work, kind="policy", base_model=str(policy_path), recipe=run_settings(args),
                         data_counts={"prompts": prompt_counts},
                         metrics={k: metrics[k] for k in ("reward_model", "gold", "updates", "train_seconds",
                                                          "before", "after")},
                         trainer="TRL's PPOTrainer")
        plan.publish()
        b, a = history[0], history[-1]
        print(f"{'':<8}{'gold':>8}{'proxy':>8}{'KL':>8}\n{'before':<8}{b['gold']:>8.3f}{b['proxy']:>8.3f}"
              f"{b['kl']:>8.3f}\n{'after':<8}{a['gold']:>8.3f}{a['proxy']:>8.3f}{a['kl']:>8.3f}")
        print(f"{total} PPO updates in {seconds:.0f} s; wrote {out}/ (model.safetensors, metrics.json, "
              "gold_curve.json, gold_vs_kl.png)")
    return metrics


def load_state(path: Path) -> dict:
    """An optimizer or scheduler state of a checkpoint: Trainer's own pickle format, read with torch's
    restricted unpickler (tensors and plain containers only); one that holds anything else is refused."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a state this stage reads (tensors and plain values only): {reason}") from None


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
    run_pipeline(main, resume="--resume true")
