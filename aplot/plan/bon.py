"""The bon stage's plan: `make bon`'s own parser, sampling and scoring arithmetic, vLLM's share of the GPU
against the scorers (one at a time, after sampling), and the proxies' tokenizers against the policy's."""

from __future__ import annotations

import math
from pathlib import Path

from aplot.plan.base import Plan, resolving_for_the_gpu_machine
from aplot.plan.memory import GIB, inference_bytes
from aplot.plan.shapes import describe, policy_shape, reward_model_shape
from aplot.plan.tokenizers import compare_tokenizers, tokenizer_facts

# Recipe keys only a bon recipe has: how `make plan` tells its recipes from the other stages'.
MARKS = {"policy_name_or_path", "reward_models", "n_samples", "backend"}
# vLLM's default share of GPU memory (its `gpu_memory_utilization`); VLLMSampler does not change it.
VLLM_GPU_MEMORY_UTILIZATION = 0.9


def plan_bon(plan: Plan, argv: list[str], opts) -> None:
    from aplot.config import RecipeParser
    from aplot.outputs import check_output_dir
    from pipelines.bon import BonConfig

    with resolving_for_the_gpu_machine():
        (cfg,) = RecipeParser((BonConfig,)).parse_recipe(argv)
    scorers = {}
    tokenizers = {}
    for path in cfg.reward_models:
        scorers[Path(path).name], tokenizers[Path(path).name] = reward_model_shape(
            f"proxy {Path(path).name}", path, cfg.dtype, cfg.trust_remote_code)
    if cfg.gold != "embedded":
        scorers["gold"], _ = reward_model_shape("gold", cfg.gold, cfg.dtype, cfg.trust_remote_code)
    check_output_dir(Path(cfg.output_dir))
    policy, policy_tokenizer = policy_shape(cfg.policy_name_or_path, cfg.lineage_dir, cfg.dtype,
                                            cfg.trust_remote_code)

    world = plan.processes
    samples = cfg.n_prompts * cfg.n_samples
    chunks = math.ceil(cfg.n_prompts / cfg.chunk_prompts)
    plan.row("sampling", f"{cfg.n_prompts} prompts x {cfg.n_samples} samples = {samples:,} responses, in {chunks} "
                         f"chunks of {cfg.chunk_prompts} prompts ({cfg.backend}, on rank 0)")
    plan.row("tokens", f"at most {samples * cfg.max_new_tokens:,} generated ({cfg.max_new_tokens} new tokens each)")
    per_rank = math.ceil(samples / world)
    plan.row("scoring", f"{len(scorers) + (cfg.gold == 'embedded')} scorers x {samples:,} responses; each rank "
                        f"scores {per_rank:,} per scorer in {math.ceil(per_rank / cfg.score_batch_size)} batches of "
                        f"{cfg.score_batch_size}")
    plan.numbers.update(samples=samples, chunks=chunks, scored_per_rank=per_rank)
    plan.models["policy"] = policy
    plan.row("policy", describe(policy))
    for name, m in scorers.items():
        plan.models[name] = m
        plan.row(name if name == "gold" else f"proxy {name}", describe(m))
    if cfg.gold == "embedded":
        plan.row("gold", "the embedded world's gold function (no model)")

    gpu = plan.fit_limit
    if cfg.backend == "vllm":
        share = int(VLLM_GPU_MEMORY_UTILIZATION * gpu)
        tp = cfg.tensor_parallel_size
        weights = policy.params * policy.weight_bytes // tp
        c = policy.config
        kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * policy.head_dim * policy.weight_bytes // tp
        max_len = cfg.max_model_len or c.max_position_embeddings
        kv_cache = share - weights
        plan.need("vLLM policy weights", weights, f"{policy.name}, tensor_parallel_size {tp}")
        plan.need("vLLM KV cache", max(kv_cache, 0),
                  f"the rest of gpu_memory_utilization {VLLM_GPU_MEMORY_UTILIZATION} x GPU (vLLM's default): "
                  f"~{max(kv_cache, 0) // kv_per_token:,} tokens = {max(kv_cache, 0) // kv_per_token // max_len} "
                  f"sequences of max_model_len {max_len}; less vLLM's own activations and graphs")
        plan.numbers.update(vllm_share=share, vllm_weights=weights, kv_tokens=max(kv_cache, 0) // kv_per_token)
        if weights > share:
            plan.problems.append(f"{plan.recipe}: the policy's weights ({weights / GIB:.1f} GiB per GPU) exceed vLLM's "
                                 f"share ({share / GIB:.1f} GiB); raise tensor_parallel_size (now {tp})")
        elif kv_cache < max_len * kv_per_token:
            plan.problems.append(f"{plan.recipe}: vLLM's KV cache ({kv_cache / GIB:.2f} GiB) cannot hold one "
                                 "sequence of "
                                 f"max_model_len {max_len}; lower max_model_len or raise tensor_parallel_size")
    else:
        plan.need("policy weights", policy.params * policy.weight_bytes, f"{policy.name} (transformers generate)")
        plan.need("generation", cfg.n_samples * (cfg.max_new_tokens + 512) * 2 * policy.config.num_hidden_layers
                  * policy.config.num_key_value_heads * policy.head_dim * policy.weight_bytes,
                  f"estimate: KV cache of {cfg.n_samples} samples x (prompt <= 512 + {cfg.max_new_tokens}) tokens")
    # The scorers come after sampling (the sampler is deleted first, and its memory with vLLM's engine
    # process); one at a time.
    # Scorers keep the last max_length tokens; unset, a sequence is its prompt (512 tokens assumed) and response.
    length = cfg.max_length or 512 + cfg.max_new_tokens
    worst = max(scorers.values(), key=lambda m: m.params * m.weight_bytes, default=None)
    if worst is not None:
        need = worst.params * worst.weight_bytes + inference_bytes(worst, cfg.score_batch_size, length)
        plan.row("scorers", f"after sampling, one at a time: the largest, {worst.name}, needs {need / GIB:.2f} GiB "
                            f"(weights + estimate of a batch of {cfg.score_batch_size} x {length} tokens); "
                            f"{(gpu - int(VLLM_GPU_MEMORY_UTILIZATION * gpu)) / GIB:.1f} GiB would be left were "
                            "vLLM's share still held")
        plan.numbers["largest_scorer"] = need
        if need > gpu:
            plan.problems.append(f"{plan.recipe}: the scorer {worst.name} needs {need / GIB:.1f} GiB > "
                                 "--gpu_memory_gib "
                                 f"{plan.gpu_memory_gib:g}; lower score_batch_size (now {cfg.score_batch_size}) or "
                                 "max_length, or set dtype: bfloat16")
    for name, tok in tokenizers.items():
        verdict, _ = compare_tokenizers(tokenizer_facts(policy_tokenizer, cfg.trust_remote_code),
                                        tokenizer_facts(tok, cfg.trust_remote_code), "the policy", name)
        plan.row(f"tokenizer {name}", f"policy and proxy {verdict} (scorers re-encode the text: not required)")
