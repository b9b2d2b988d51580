"""Benchmark: samples per second of the Best-of-N samplers, vLLM against transformers `generate`, on
the same model, prompts, n and response length, side by side in one process.

Both backends are the project's own (`aplot.bon.VLLMSampler` and `aplot.bon.TransformersSampler`,
built with the settings the Best-of-N stage uses). Every sample is made exactly `max_new_tokens`
long (end-of-sequence ignored) so both do the same work whatever the model emits. The repeats
alternate the backends, so machine noise hits both alike; the vLLM engine's start is timed apart
from its sampling. Runs in its own process (`python -m benchmarks.generation`): vLLM's workers are
spawned and re-import the main module.

    python -m benchmarks.generation --model outputs/lineage/tiny-qwen2/sft [--n_prompts 64 --n 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

# A model larger than the embedded policy, still quick to generate from on CPU: vLLM's CPU build
# needs head_dim 64 (FIELD_NOTES), 8 heads make hidden 512. Random weights: speed does not depend
# on what the weights say once every sample has the same length.
MEDIUM_CONFIG = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
                 "num_key_value_heads": 8, "head_dim": 64}


def build_medium_model(out_dir: str, like: str) -> str:
    """A Qwen2 causal LM of MEDIUM_CONFIG with random weights and the tokenizer of `like`, saved once."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "model.safetensors").exists():
        return out_dir
    import torch

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(like)
    # use_cache: the embedded policy's config has it off (SFT training turns it off); without the KV cache
    # generate() recomputes the whole sequence at every token, 8x slower here.
    config.update({**MEDIUM_CONFIG, "layer_types": ["full_attention"] * MEDIUM_CONFIG["num_hidden_layers"],
                   "architectures": ["Qwen2ForCausalLM"], "use_cache": True})
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.use_cache = True
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(like).save_pretrained(out_dir)
    return out_dir


def measure(model: str, n_prompts: int, n: int, max_new_tokens: int, repeats: int, seed: int = 0) -> dict:
    """Samples per second of both backends on `n_prompts` test_id prompts x `n` samples, `repeats`
    alternating rounds after one warm-up round each."""
    import torch
    from vllm import SamplingParams

    from aplot.bon import TransformersSampler, VLLMSampler, prompt_seed
    from aplot.data import load_prompts

    prompts = load_prompts("embedded", "test_id", n_prompts)
    indices = list(range(len(prompts)))
    params = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": max_new_tokens}

    hf = TransformersSampler(model, device="cpu")
    # generate() takes what the sampler does not pass from the generation config: a fixed length.
    hf.model.generation_config.min_new_tokens = max_new_tokens
    start = time.perf_counter()
    vl = VLLMSampler(model)
    engine_start = time.perf_counter() - start

    def run_vllm():
        # The sampler's own request, plus ignore_eos for the fixed length.
        sampling = [SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=max_new_tokens, ignore_eos=True,
                                   seed=prompt_seed(seed, i * n)) for i in indices]
        outputs = vl.llm.generate(prompts, sampling, use_tqdm=False)
        return sum(len(c.token_ids) for out in outputs for c in out.outputs)

    def run_hf():
        responses = hf.sample(prompts, indices, n, params, seed)
        return sum(len(r) for r in responses) * max_new_tokens

    def run_hf_one_thread():
        # torch's default uses both cores, and its OpenMP threads slow several-fold when anything else
        # keeps a core busy; one thread does not. Reported beside the default, so neither is hidden.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run_hf()
        finally:
            torch.set_num_threads(threads)

    backends = {"vllm": run_vllm, "transformers": run_hf, "transformers_1thread": run_hf_one_thread}
    times = {name: [] for name in backends}
    tokens = {}
    for round_ in range(repeats + 1):
        names = list(backends)
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # rotate who goes first
            start = time.perf_counter()
            tokens[name] = backends[name]()
            if round_ > 0:  # round 0 warms every backend up
                times[name].append(time.perf_counter() - start)
    from benchmarks.speed import spread

    samples = n_prompts * n
    # samples/s of vLLM over transformers in each round: the transformers time over the vLLM time
    return {
        "status": "ok", "model": model, "n_prompts": n_prompts, "n": n, "max_new_tokens": max_new_tokens,
        "repeats": repeats, "tokens_per_round": tokens, "vllm_engine_start_s": engine_start,
        "torch_threads": torch.get_num_threads(),
        "samples_per_s": {name: samples / statistics.median(ts) for name, ts in times.items()},
        "seconds": times,
        "vllm_over_transformers": spread([t / v for v, t in zip(times["vllm"], times["transformers"])]),
        "vllm_over_transformers_1thread": spread([t / v for v, t in zip(times["vllm"],
                                                                       times["transformers_1thread"])]),
        # against whichever transformers setting was faster in that round: the ratio the target is held to
        "vllm_over_faster_transformers": spread([min(t, t1) / v for v, t, t1 in zip(
            times["vllm"], times["transformers"], times["transformers_1thread"])]),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/lineage/tiny-qwen2/sft")
    parser.add_argument("--n_prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--medium", default=None, help="build a MEDIUM_CONFIG model here and measure it instead")
    parser.add_argument("--json", default=None, help="write the result here")
    opts = parser.parse_args(argv)
    model = build_medium_model(opts.medium, opts.model) if opts.medium else opts.model
    result = measure(model, opts.n_prompts, opts.n, opts.max_new_tokens, opts.repeats)
    print(json.dumps(result))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
