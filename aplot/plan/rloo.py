"""The rloo stage's plan: `make rloo`'s own parser, the generation-batch and update arithmetic, the start-up
check of how TRL's RLOO hands a completion to the reward model, and the memory of its models (no value model)."""

from __future__ import annotations

from pathlib import Path

from aplot.plan.base import Plan, fits, resolving_for_the_gpu_machine
from aplot.plan.memory import activation_bytes, logits_bytes, model_states_bytes, training_advice, zero_config
from aplot.plan.shapes import describe, policy_shape, reward_model_shape
from aplot.plan.tokenizers import compare_tokenizers, tokenizer_facts

# Recipe keys only an rloo recipe has (it shares the policy stage's keys with ppo recipes).
MARKS = {"num_generations", "max_completion_length", "beta"}


def plan_rloo(plan: Plan, argv: list[str], opts) -> None:
    """TRL's RLOOTrainer as `make rloo` drives it: one generation batch of num_generations completions per
    prompt an update, a frozen reference when beta > 0, the reward model scoring decoded completions."""
    import json

    from aplot.config import RecipeParser
    from aplot.outputs import check_output_dir
    from aplot.reward_model import CHAT_KEY, RewardScorer
    from aplot.rloo import APLOTRLOOConfig, rendering_mismatch

    world = plan.processes
    with resolving_for_the_gpu_machine():
        (args,) = RecipeParser((APLOTRLOOConfig,)).parse_recipe(argv)
    check_output_dir(Path(args.output_dir))
    deepspeed = args.deepspeed
    zero = zero_config(deepspeed)
    stage3 = int((zero or {}).get("stage", 0)) == 3

    pd, ga, g = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_generations
    batch = pd * ga * world  # completions an update (steps_per_generation = accumulation, RLOO's default)
    processes = f"{world} process{'es' * (world > 1)}"
    plan.row("rollout", f"{pd} completions per device x {ga} accumulation x {processes} = {batch} completions per "
                        f"update ({batch // g} prompts x num_generations {g}, each baselined by the other {g - 1})")
    plan.row("updates", f"{args.max_steps} RLOO updates ({args.max_steps * batch:,} completions), "
                        f"{args.num_iterations} optimizer step{'s' * (args.num_iterations > 1)} each")
    length = args.max_completion_length
    plan.row("tokens/update", f"{batch * length:,} generated at most ({batch} x max_completion_length {length})")
    plan.numbers.update(global_batch=batch, per_device=pd, accumulation=ga, updates=args.max_steps,
                        tokens_per_step=batch * length)

    policy, policy_tokenizer = policy_shape(args.sft_model_path, args.lineage_dir, args.dtype, args.trust_remote_code)
    reward, reward_tokenizer = reward_model_shape("reward model", args.reward_model_path, args.dtype,
                                                  args.trust_remote_code)
    reward_facts = tokenizer_facts(reward_tokenizer, args.trust_remote_code)
    verdict, _ = compare_tokenizers(tokenizer_facts(policy_tokenizer, args.trust_remote_code), reward_facts,
                                    "the policy", "the reward model")
    plan.row("tokenizers", f"policy and reward model {verdict} (RLOO re-tokenises decoded text: either is fine)")
    reward_tokenizer = reward_facts.tokenizer if reward_facts else None
    if reward_tokenizer is not None:
        # The stage's own start-up check: a probe response as TRL's RLOO hands it to the reward model, and as
        # the reward model was trained on it.
        chat = args.prompt_format not in ("explicit", "multiple_choice")
        probe = [{"role": "user", "content": "Write about apple."}] if chat else "Write about apple.\nAnswer:"
        config = Path(args.reward_model_path) / "config.json"  # a trained model records how it reads texts
        chat_pairs = config.is_file() and bool(json.loads(config.read_text()).get(CHAT_KEY))
        mismatch = rendering_mismatch(RewardScorer(None, reward_tokenizer, chat=chat_pairs), probe)
        bridged = " (bridged: retokenize_rewards)" if args.retokenize_rewards else ""
        plan.row("rendering", f"policy and reward model {mismatch}{bridged}" if mismatch
                 else "a response reaches the reward model as it was trained on it")
        if mismatch and not args.retokenize_rewards:
            plan.problems.append(f"{plan.recipe}: policy {args.sft_model_path} and reward model "
                                 f"{args.reward_model_path} {mismatch}: make rloo refuses this pair; set "
                                 "retokenize_rewards: true")
    gold = None
    if args.gold != "embedded":
        gold, _ = reward_model_shape("gold", args.gold, args.dtype, args.trust_remote_code)
    plan.models["policy"] = policy
    plan.row("policy", describe(policy))
    if args.beta > 0:
        plan.models["reference"] = policy
        plan.row("reference", describe(policy) + " (frozen copy of the policy, for the KL penalty)")
    for role, m in (("reward model", reward), ("gold", gold)):
        if m is not None:
            plan.models[role] = m
            plan.row(role, describe(m))

    states, how = model_states_bytes(policy.params, policy.largest_layer, zero, opts.nproc, opts.nnodes,
                                     policy.weight_bytes)
    plan.need("policy states", states, how)
    shard = world if stage3 else 1  # TRL shards the frozen models only under ZeRO-3
    frozen = [("reference weights", policy)] if args.beta > 0 else []
    for role, m in frozen + [("reward weights", reward)]:
        if args.retokenize_rewards and role == "reward weights":
            plan.need(role, m.params * m.weight_bytes, "frozen, whole on every GPU (the bridge's scorer)")
        else:
            plan.need(role, m.params * m.weight_bytes // shard,
                      "frozen" + (", sharded by ZeRO-3" if stage3 else ", whole on every GPU"))
    if gold is not None:
        plan.need("gold weights", gold.params * gold.weight_bytes, "gold evaluation: loaded whole on every rank")
    generated = pd * ga  # one generation batch of a rank, sampled at once
    plan.need("rollout logits", logits_bytes(policy, generated, length),
              f"{generated} rollouts x {length} tokens x vocabulary {policy.config.vocab_size}, float32")
    seq = (args.max_prompt_length or 0) + length
    prompt_note = ("prompt <= max_prompt_length + " if args.max_prompt_length
                   else "response only: no max_prompt_length, ")
    plan.need("activations", activation_bytes(policy, pd, seq, args.gradient_checkpointing)
              + logits_bytes(policy, pd, length),
              f"estimate: policy on {pd} x {seq} tokens ({prompt_note}completion), with its logits; gradient "
              f"checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    plan.numbers.update(model_states=states, params=policy.params)
    if states > plan.fit_limit or not args.gradient_checkpointing:
        advice = training_advice(zero, args.gradient_checkpointing, pd, states > plan.fit_limit)
    else:
        advice = (f"lower per_device_train_batch_size (now {pd}) or gradient_accumulation_steps (the rollout's "
                  "logits), or max_completion_length")
    fits(plan, advice)
