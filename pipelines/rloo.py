"""Stage `make rloo`: optimise a policy with TRL's RLOOTrainer against a trained reward model, measuring gold
reward, proxy reward and KL to the reference as it goes (the same evaluation as `make ppo`). Writes the
policy (safetensors + tokenizer), metrics.json, gold_curve.json and gold_vs_kl.png to `output_dir`.

    python -m pipelines.rloo --config recipes/rloo/embedded.yaml [--key value ...]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from aplot.errors import UserError, run_pipeline
from aplot.policy import GOLD_HISTORY
from aplot.policy import RUN_KEYS as POLICY_RUN_KEYS

# What a checkpoint's run must share with the rerun that resumes it: the policy stage's keys and RLOO's own.
RUN_KEYS = POLICY_RUN_KEYS + ("max_steps", "num_generations", "max_completion_length", "beta", "num_iterations",
                              "epsilon", "epsilon_high", "steps_per_generation", "top_p", "top_k", "min_p",
                              "repetition_penalty", "normalize_advantages", "mask_truncated_completions",
                              "shuffle_dataset")


def main(argv=None) -> dict:
    from aplot.config import RecipeParser
    from aplot.distributed import init_distributed
    from aplot.outputs import lock
    from aplot.rloo import APLOTRLOOConfig

    init_distributed()  # before the recipe builds TrainingArguments: one process group for every rank
    (args,) = RecipeParser((APLOTRLOOConfig,)).parse_recipe(argv)
    with lock(args.output_dir):  # one run per output directory, held until its results are published
        return run(args)


def run(args) -> dict:
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed

    from aplot import lineage
    from aplot.outputs import STAGING, publish_model
    from aplot.policy import (
        GoldEvaluation,
        check_model_paths,
        encode_prompts,
        load_policy_tokenizer,
        load_scorers,
        load_stage_prompts,
        refuse_mismatch,
        run_plan,
        run_settings,
        write_results,
    )
    from aplot.rloo import ProxyReward, load_trainer_class, rendering_mismatch

    check_model_paths(args)
    prompts, eval_prompts = load_stage_prompts(args)
    # Resume: the newest complete checkpoint (Trainer's own: policy, optimizer, scheduler, RNG, plus the gold
    # history, written last) is continued; one made with other settings is refused before any work, and so
    # is an output_dir that is not this stage's or is or holds an input model.
    settings = run_settings(args, RUN_KEYS)
    plan = run_plan(args, "rloo", settings)
    work = plan.work  # the run writes everything here (checkpoints too); publish() swaps it into out

    # Every model and tokenizer is loaded, and the pair checked, before the first update.
    policy_path = lineage.policy_path(args.sft_model_path, args.lineage_dir)
    tokenizer = load_policy_tokenizer(policy_path, "RLOO", args.trust_remote_code)
    reward_model, reward_tokenizer, proxy, gold = load_scorers(args)
    # RLOO's trainer encodes plain prompts with the tokenizer's special tokens, PPO's datasets without.
    query_ids, counts = encode_prompts(tokenizer, prompts, args.max_prompt_length, add_special_tokens=True)
    eval_ids, _ = encode_prompts(tokenizer, eval_prompts, None, add_special_tokens=True)
    # TRL's RLOO decodes each completion and re-tokenises it for the reward model its own way: checked before
    # the first update that the reward model then reads the ids it was trained on.
    mismatch = rendering_mismatch(proxy, eval_prompts[0])
    refuse_mismatch(args, policy_path, mismatch, "RLOO")
    bridged = bool(args.retokenize_rewards)
    if not bridged and (args.normalize_rewards or args.reward_clip is not None):
        raise UserError("normalize_rewards and reward_clip are applied by aplot's scorer, which RLOO scores "
                        "through with retokenize_rewards: true; set it, or leave both unset")
    train = Dataset.from_dict({"prompt": [p for p, q in zip(prompts, query_ids) if q is not None]})
    per_generation = args.generation_batch_size // args.num_generations
    if len(train) < per_generation:
        raise UserError(f"only {len(train)} training prompts (after max_prompt_length), fewer than one RLOO "
                        f"generation batch ({per_generation} prompts x num_generations {args.num_generations})")

    checkpoint, history = plan.checkpoint, []
    if checkpoint is not None:
        history = json.loads((checkpoint / GOLD_HISTORY).read_text())
    if PartialState().is_main_process:
        plan.prepare()
    PartialState().wait_for_everyone()
    args.output_dir = str(work)
    set_seed(args.seed)
    load = {"trust_remote_code": args.trust_remote_code}
    if args.dtype not in (None, "auto"):
        load["dtype"] = getattr(torch, args.dtype)
    # The policy starts from the SFT policy; a resumed run's weights come from the checkpoint through Trainer.
    policy = AutoModelForCausalLM.from_pretrained(policy_path, **load)
    if bridged:
        reward_model.to(PartialState().device)
        reward = {"reward_funcs": [ProxyReward(proxy, Path(args.reward_model_path).name, args.reward_clip)]}
    else:  # TRL's own path: the model object and its tokenizer, prepared by TRL (DeepSpeed included)
        reward = {"reward_funcs": [reward_model], "reward_processing_classes": [reward_tokenizer]}

    # Evaluated on as many sequences at once as one generation batch of a rank.
    gold_eval = GoldEvaluation(args, eval_prompts, tokenizer, proxy, gold, max_new_tokens=args.max_completion_length,
                               batch_size=args.per_device_train_batch_size * args.steps_per_generation,
                               history=history)
    trainer_class = load_trainer_class(args.use_vllm)
    trainer = trainer_class(model=policy, args=args, train_dataset=train, processing_class=tokenizer,
                            callbacks=[gold_eval], **reward)
    trainer.gold = gold_eval
    # beta 0: TRL loads no reference, but the KL of the gold evaluation is still measured against the start.
    reference = None if trainer.ref_model is not None else AutoModelForCausalLM.from_pretrained(
        policy_path, **load).to(trainer.accelerator.device).eval()
    gold_eval.set_trainer(trainer, eval_ids, reference=reference)

    done = trainer_state_step(checkpoint)
    started = time.perf_counter()
    if done < args.max_steps:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    else:
        print(f"{checkpoint} already holds all {args.max_steps} updates")
    seconds = time.perf_counter() - started
    trainer.save_model(str(work / STAGING))  # then moved in weights-last: a killed save never looks finished

    history = gold_eval.history
    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    world = trainer.accelerator.num_processes
    metrics = {"reward_model": args.reward_model_path, "policy": str(policy_path), "gold": args.gold,
               "updates": args.max_steps, "resumed_from_update": done or None, "train_seconds": round(seconds, 2),
               "episodes_per_update": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
               "num_generations": args.num_generations, "beta": args.beta, "reward_bridged": bridged,
               "prompts": counts, "processes": world, "zero_stage": zero_stage,
               "before": history[0], "after": history[-1], "gold_curve": history,
               "rloo_log": trainer.state.log_history}
    if trainer.accelerator.is_main_process:
        publish_model(work / STAGING, work)
        write_results(plan, metrics, history, counts, settings, policy_path, "RLOOTrainer", "RLOO updates")
    return metrics


def trainer_state_step(checkpoint) -> int:
    """The update a checkpoint was saved at (0 for a fresh start)."""
    if checkpoint is None:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


if __name__ == "__main__":
    run_pipeline(main, resume="--resume true")
