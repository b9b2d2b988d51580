"""The ppo stage's plan: `make ppo`'s own parser, the rollout and update arithmetic, the start-up checks on
the policy's and the reward model's tokenizers and chat rendering, and the memory of its five models."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from aplot.errors import UserError
from aplot.plan.base import Plan, fits, resolving_for_the_gpu_machine
from aplot.plan.memory import activation_bytes, logits_bytes, model_states_bytes, training_advice, zero_config
from aplot.plan.shapes import describe, model_shape, policy_shape, reward_model_shape
from aplot.plan.tokenizers import compare_tokenizers, tokenizer_facts

# Recipe keys only a ppo recipe has: how `make plan` tells its recipes from the other stages'.
MARKS = {"sft_model_path", "reward_model_path", "total_episodes", "response_length", "kl_coef"}


def plan_ppo(plan: Plan, argv: list[str], opts) -> None:
    from aplot.config import RecipeParser
    from aplot.outputs import check_output_dir
    from aplot.ppo import APLOTPPOConfig

    with resolving_for_the_gpu_machine():
        (args,) = RecipeParser((APLOTPPOConfig,)).parse_recipe(argv)
        # APLOTPPOConfig hands a `deepspeed` config to accelerate through the environment.
        deepspeed = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if os.environ.get(
            "ACCELERATE_USE_DEEPSPEED") == "true" else None
    check_output_dir(Path(args.output_dir))
    zero = zero_config(deepspeed)
    stage3 = int((zero or {}).get("stage", 0)) == 3

    world, pd, ga = plan.processes, args.per_device_train_batch_size, args.gradient_accumulation_steps
    local_batch = pd * ga
    batch = local_batch * world
    if batch % args.num_mini_batches or local_batch % args.num_mini_batches:
        raise UserError(f"{plan.recipe}: per_device_train_batch_size x gradient_accumulation_steps ({local_batch}) "
                        f"must be a multiple of num_mini_batches ({args.num_mini_batches})")
    episodes = args.total_episodes or int(args.num_train_epochs * args.n_prompts)
    updates = math.ceil(episodes / batch)
    epochs_note = ("" if args.total_episodes
                   else f" ({args.num_train_epochs:g} epochs of at most {args.n_prompts} prompts)")
    processes = f"{world} process{'es' * (world > 1)}"
    plan.row("rollout", f"{pd} prompts per device x {ga} accumulation x {processes} = {batch} episodes per "
                        f"update ({args.num_mini_batches} mini-batch{'es' * (args.num_mini_batches > 1)} of "
                        f"{batch // args.num_mini_batches})")
    plan.row("updates", f"{updates} PPO updates for {episodes:,} episodes"
                        f"{epochs_note}, "
                        f"{args.num_ppo_epochs * args.num_mini_batches} optimizer steps each "
                        f"({args.num_ppo_epochs} PPO epochs x {args.num_mini_batches} mini-batch"
                        f"{'es' * (args.num_mini_batches > 1)})")
    prompt_len = args.max_prompt_length
    plan.row("tokens/update", f"{batch * args.response_length:,} generated ({batch} x response_length "
                              f"{args.response_length})" + (f" + at most {batch * prompt_len:,} prompt tokens"
                                                            if prompt_len else ""))
    plan.numbers.update(global_batch=batch, per_device=pd, accumulation=ga, updates=updates, episodes=episodes,
                        tokens_per_step=batch * args.response_length)

    policy, policy_tokenizer = policy_shape(args.sft_model_path, args.lineage_dir, args.dtype,
                                            args.trust_remote_code)
    reward, reward_tokenizer = reward_model_shape("reward model", args.reward_model_path, args.dtype,
                                                  args.trust_remote_code)
    verdict, ids_differ = compare_tokenizers(tokenizer_facts(policy_tokenizer, args.trust_remote_code),
                                             tokenizer_facts(reward_tokenizer, args.trust_remote_code),
                                             "the policy", "the reward model")
    plan.row("tokenizers", f"policy and reward model {verdict}")
    if ids_differ and not args.retokenize_rewards:
        plan.problems.append(f"{plan.recipe}: policy {args.sft_model_path} and reward model {args.reward_model_path} "
                             f"have different tokenizers ({verdict[len('differ: '):]}): make ppo refuses this pair; "
                             "set retokenize_rewards: true, or use a reward model trained with the policy's tokenizer")
    elif not ids_differ and all(hasattr(t, "apply_chat_template") for t in (policy_tokenizer, reward_tokenizer)):
        # The stage's own start-up check: a probe response, as PPO would score it and as the reward model
        # was trained on it (chat layouts differ by the template's closing newline, or other templates).
        from aplot.ppo import rendering_mismatch
        from pipelines.ppo import encode_prompts

        chat = args.prompt_format not in ("explicit", "multiple_choice")
        probe = [{"role": "user", "content": "Write about apple."}] if chat else "Write about apple.\nAnswer:"
        import json

        from aplot.reward_model import CHAT_KEY, RewardScorer

        config = Path(args.reward_model_path) / "config.json"  # a trained model records how it reads texts
        chat_pairs = config.is_file() and bool(json.loads(config.read_text()).get(CHAT_KEY))
        mismatch = rendering_mismatch(policy_tokenizer, RewardScorer(None, reward_tokenizer, chat=chat_pairs), probe,
                                      encode_prompts(policy_tokenizer, [probe], None)[0][0])
        bridged = " (bridged: retokenize_rewards)" if args.retokenize_rewards else ""
        plan.row("rendering", f"policy and reward model {mismatch}{bridged}" if mismatch
                 else "a response reaches the reward model as it was trained on it")
        if mismatch and not args.retokenize_rewards:
            plan.problems.append(f"{plan.recipe}: policy {args.sft_model_path} and reward model "
                                 f"{args.reward_model_path} {mismatch}: make ppo refuses this pair; set "
                                 "retokenize_rewards: true")
    if args.value_model_path:
        value = model_shape("value model", args.value_model_path, "score", args.dtype,
                            trust_remote_code=args.trust_remote_code)
    else:
        # The stage starts the value model from the reward model, or from the policy when the tokenizers
        # differ (it reads the policy's tokens); a policy given a score head is counted as the policy.
        value = dataclasses.replace(policy if ids_differ else reward, role="value model")
    gold = None
    if args.gold != "embedded":
        gold, _ = reward_model_shape("gold", args.gold, args.dtype, args.trust_remote_code)
    for role, m in (("policy", policy), ("reference", policy), ("value model", value), ("reward model", reward),
                    ("gold", gold)):
        if m is not None:
            plan.models[role] = m
            plan.row(role, describe(m) + (" (frozen copy of the policy)" if role == "reference" else "")
                     + (" (starts from it)" if role == "value model" else ""))

    trained = policy.params + value.params
    states, how = model_states_bytes(trained, max(policy.largest_layer, value.largest_layer), zero, opts.nproc,
                                     opts.nnodes, policy.weight_bytes)
    plan.need("policy + value states", states, how + ": one engine trains both")
    shard = world if stage3 else 1  # TRL shards the frozen models only under ZeRO-3
    for role, m in (("reference weights", policy), ("reward weights", reward)):
        plan.need(role, m.params * m.weight_bytes // shard,
                  "frozen" + (", sharded by ZeRO-3" if stage3 else ", whole on every GPU"))
    if gold is not None:
        plan.need("gold weights", gold.params * gold.weight_bytes, "gold evaluation: loaded whole on every rank")
    seq = (prompt_len or 0) + args.response_length
    no_prompt = "response only: no max_prompt_length, "
    plan.need("rollout logits", logits_bytes(policy, local_batch, args.response_length),
              f"{local_batch} rollouts x {args.response_length} tokens x vocabulary {policy.config.vocab_size}, "
              "float32")
    act = activation_bytes(policy, pd, seq, args.gradient_checkpointing) + activation_bytes(
        value, pd, seq, args.gradient_checkpointing) + logits_bytes(policy, pd, args.response_length)
    plan.need("activations", act, f"estimate: policy and value on {pd} x {seq} tokens "
                                  f"({'prompt <= max_prompt_length + ' if prompt_len else no_prompt}"
                                  f"response), with their logits; gradient checkpointing "
                                  f"{'on' if args.gradient_checkpointing else 'off'}")
    plan.numbers.update(model_states=states, params=trained)
    if states > plan.fit_limit or not args.gradient_checkpointing:
        advice = training_advice(zero, args.gradient_checkpointing, pd, states > plan.fit_limit)
    else:
        advice = (f"lower per_device_train_batch_size (now {pd}) or gradient_accumulation_steps (the rollout's "
                  "logits), or response_length")
    fits(plan, advice)
