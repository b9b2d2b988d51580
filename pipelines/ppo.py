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
from aplot.policy import GOLD_HISTORY, RESULTS, encode_prompts  # noqa: F401  (importable from here, as before)
from aplot.policy import RUN_KEYS as POLICY_RUN_KEYS
from aplot.policy import run_settings as policy_run_settings


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
    from aplot.outputs import STAGING, publish_model
    from aplot.policy import (
        GoldEvaluation,
        check_model_paths,
        load_policy_tokenizer,
        load_scorers,
        load_stage_prompts,
        refuse_mismatch,
        run_plan,
        same_tokenizer,
        write_results,
    )
    from aplot.ppo import RetokenizedReward, distinct_pad, load_trainer_class, rendering_mismatch
    from aplot.reward_model import load_report, quiet_load_report

    check_model_paths(args)
    prompts, eval_prompts = load_stage_prompts(args)
    # Resume: the newest complete checkpoint holds the policy, the value model, the optimizer and
    # scheduler state and the gold history; one made with other settings is refused before any work,
    # and so is an output_dir that is not this stage's or is or holds an input model.
    plan = run_plan(args, "ppo", run_settings(args), checkpoint_models=(".", "value_model"))
    work = plan.work  # the run writes everything here (checkpoints too); publish() swaps it into out

    # Every model and tokenizer is loaded, and the pair checked, before the first update.
    policy_path = lineage.policy_path(args.sft_model_path, args.lineage_dir)
    # PPO pads a policy whose pad is its eos with another token of its own (below, aplot.ppo.distinct_pad).
    tokenizer = load_policy_tokenizer(policy_path, "PPO", args.trust_remote_code, allow_eos_pad=True)
    reward_model, reward_tokenizer, proxy, gold = load_scorers(args)

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
    refuse_mismatch(args, policy_path, mismatch, "PPO")
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
    # Every model is loaded: only now does the run start working (aside, out stays as it is till the end).
    if PartialState().is_main_process:
        plan.prepare()
    PartialState().wait_for_everyone()
    args.output_dir = str(work)
    scorer_for_ppo = (RetokenizedReward(proxy, tokenizer, prompts, [q for q in query_ids if q is not None])
                      if mismatch else reward_model)

    gold_eval = GoldEvaluation(args, eval_prompts, tokenizer, proxy, gold, max_new_tokens=args.response_length,
                               batch_size=args.local_rollout_forward_batch_size, step_offset=done, history=history)
    trainer_class = load_trainer_class()
    trainer_class.schedule_steps = total
    trainer = trainer_class(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                            reward_model=scaled_reward(scorer_for_ppo, proxy, args), train_dataset=train,
                            value_model=value_model, eval_dataset=Dataset.from_dict({"input_ids": eval_ids}),
                            callbacks=[gold_eval])
    trainer.gold = gold_eval
    gold_eval.set_trainer(trainer, eval_ids, policy=lambda unwrapped: unwrapped.policy)
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
        write_results(plan, metrics, history, counts, run_settings(args), policy_path, "PPOTrainer", "PPO updates")
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


# PPO's checkpoint marker, results and run settings: the policy stage's (aplot.policy), plus PPO's own keys.
RUN_KEYS = POLICY_RUN_KEYS + ("value_model_path", "total_episodes", "num_mini_batches", "num_ppo_epochs",
                              "response_length", "stop_token", "missing_eos_penalty", "kl_coef", "kl_estimator",
                              "cliprange", "vf_coef", "cliprange_value", "gamma", "lam", "whiten_rewards")


def scaled_reward(reward_model, proxy, args):
    """The reward model PPO optimises: normalised with the proxy scorer's stats and clipped when asked."""
    from aplot.ppo import ScaledReward

    if proxy.normalization is None and args.reward_clip is None:
        return reward_model
    mean, std = proxy.normalization or (0.0, 1.0)
    return ScaledReward(reward_model, mean, std, args.reward_clip)


def run_settings(args) -> dict:
    return policy_run_settings(args, RUN_KEYS)


if __name__ == "__main__":
    run_pipeline(main, resume="--resume true")
