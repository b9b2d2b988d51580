"""`make gpu-check`: the Qwen2.5-shaped preset through the three stages' real code paths for a few steps
each, measuring what a first GPU run should show: tokens per second, peak GPU memory, model FLOPs
utilisation and the APLOT/BT training-step time ratio.

On a CUDA machine the preset runs at Qwen2.5-0.5B's depth (24 layers, bf16): the reward model trains
through APLOTRewardTrainer under the ZeRO-2 config (one process), Best-of-N samples with the transformers
sampler (and vLLM when importable) and scores with the shared scorer, PPO runs TRL's trainer through the
ppo stage. On CPU the same code runs at 2 layers, float32, with the embedded tokenizer's vocabulary and no
MFU (the tests run it). Weights are random: throughput needs no trained model.

    python -m pipelines.gpu_check [--layers 24] [--steps 8] [--vllm auto|on|off] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from aplot.errors import run_pipeline

PRESET = "recipes/models/qwen2.5-shaped"
ZERO2 = "recipes/deepspeed/zero2.json"


def parse(argv):
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24 if cuda else 2)
    parser.add_argument("--steps", type=int, default=8 if cuda else 3, help="measured steps per loss (rm)")
    parser.add_argument("--warmup", type=int, default=2 if cuda else 1)
    parser.add_argument("--pairs", type=int, default=8 if cuda else 4, help="rm: pairs per step")
    parser.add_argument("--seq", type=int, default=512 if cuda else 32, help="rm and scoring: tokens per sequence")
    parser.add_argument("--prompts", type=int, default=8 if cuda else 2, help="bon: prompts")
    parser.add_argument("--samples", type=int, default=16 if cuda else 4, help="bon: samples per prompt")
    parser.add_argument("--new_tokens", type=int, default=128 if cuda else 8, help="bon and ppo: response tokens")
    parser.add_argument("--ppo_updates", type=int, default=3 if cuda else 1)
    parser.add_argument("--ppo_batch", type=int, default=16 if cuda else 4, help="ppo: prompts per update")
    parser.add_argument("--vocab", type=int, default=None,
                        help="embedding rows (default: the preset's 151936 on CUDA, the tokenizer's on CPU)")
    parser.add_argument("--vllm", choices=("auto", "on", "off"), default="auto",
                        help="auto: vLLM when importable on CUDA (its CPU build starts slowly)")
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    import tempfile

    import torch

    opts = parse(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    work = Path(opts.out or tempfile.mkdtemp(prefix="aplot-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    from aplot.data.world import build_tokenizer
    from aplot.plan import peak_bf16_flops

    tokenizer = build_tokenizer()  # throughput needs no trained tokenizer: the embedded one encodes anything
    vocab = opts.vocab or (None if cuda else len(tokenizer))
    config = shaped_config(opts.layers, vocab, tokenizer)
    peak = peak_bf16_flops(device) if cuda else None
    results = {"device": device, "layers": opts.layers, "dtype": "bfloat16" if cuda else "float32",
               "vocab": config.vocab_size, "peak_bf16_flops": peak}
    print(f"gpu-check on {device}: {PRESET} at {opts.layers} layers, {results['dtype']}, vocabulary {config.vocab_size}"
          + ("" if peak or not cuda else " (unknown peak: no MFU)"))
    results["rm"], rm_dir = check_rm(opts, config, tokenizer, work, cuda, peak)
    results["bon"], policy_dir = check_bon(opts, config, tokenizer, work, cuda, peak, rm_dir)
    results["ppo"] = check_ppo(opts, tokenizer, work, cuda, peak, policy_dir, rm_dir)
    print(format_results(results))
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))
    return results


def shaped_config(layers: int, vocab: int | None, tokenizer):
    """The preset's architecture at `layers` layers (every layer full attention, as the preset's are)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(PRESET)
    config.num_hidden_layers = layers
    config.layer_types = ["full_attention"] * layers
    config.max_window_layers = layers
    if vocab:
        config.vocab_size = vocab
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    return config


def one_process_group(cuda: bool) -> None:
    """DeepSpeed needs a process group even for one process: a one-rank group on a free local port
    (NCCL on a GPU, set up by DeepSpeed itself; gloo on CPU, as aplot.distributed does for CPU ranks)."""
    import os
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    if not cuda:
        dist.init_process_group("gloo")


class StepTimer:
    """Wall time of each optimizer step (the GPU synchronised at both ends)."""

    def __init__(self, cuda):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                timer.sync()
                timer.start = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                timer.sync()
                timer.times.append(time.perf_counter() - timer.start)

        self.cuda, self.times, self.start, self.callback = cuda, [], 0.0, Callback()

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def peak_memory(cuda) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def reset_peak(cuda) -> None:
    import torch

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def check_rm(opts, config, tokenizer, work: Path, cuda: bool, peak):
    """BT and APLOT reward models from the same initial weights, trained in turn through
    APLOTRewardTrainer under the ZeRO-2 config on the same random batches; median step times."""
    import copy

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from aplot.config import parse_rm_recipe
    from aplot.plan import training_flops_per_token
    from aplot.trainer import APLOTRewardTrainer

    one_process_group(cuda)
    steps = opts.warmup + opts.steps
    generator = torch.Generator().manual_seed(0)
    # Token ids clear of the special tokens (the pad id would end a sequence early for the score head).
    ids = torch.randint(0, min(config.vocab_size, len(tokenizer)) - len(tokenizer.all_special_ids) - 1,
                        (2, opts.pairs * steps, opts.seq), generator=generator)
    train = Dataset.from_dict({"chosen_ids": ids[0].tolist(), "rejected_ids": ids[1].tolist()})
    scored = copy.deepcopy(config)
    scored.num_labels = 1
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    base = AutoModelForSequenceClassification.from_config(scored, dtype=dtype)
    out, times = {}, {}
    for loss in ("bt", "aplot"):
        reset_peak(cuda)
        _, args, _ = parse_rm_recipe([
            "--model_name_or_path", PRESET, "--output_dir", str(work / f"rm-{loss}"), "--loss_type", loss,
            "--per_device_train_batch_size", str(opts.pairs), "--max_steps", str(steps), "--learning_rate", "1e-5",
            "--max_length", str(opts.seq), "--deepspeed", ZERO2, "--bf16", str(cuda).lower(),
            "--gradient_checkpointing", "false", "--save_strategy", "no", "--eval_strategy", "no",
            "--logging_steps", "1000", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
            "--dataloader_num_workers", "0", "--resume", "false"])
        timer = StepTimer(cuda)
        trainer = APLOTRewardTrainer(copy.deepcopy(base), args, train_dataset=train, processing_class=tokenizer,
                                     callbacks=[timer.callback])
        trainer.train()
        times[loss] = timer.times[opts.warmup:]
        plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
        out["zero_stage"] = plugin.zero_stage if plugin else None
        out[f"{loss}_peak_gib"] = peak_memory(cuda)
        if loss == "bt":
            model = trainer.accelerator.unwrap_model(trainer.model)
            rm_dir = work / "rm-bt" / "model"
            model.save_pretrained(str(rm_dir))
            tokenizer.save_pretrained(str(rm_dir))
            flops_per_token = training_flops_per_token(model, opts.seq)
        del trainer
    tokens = 2 * opts.pairs * opts.seq
    for loss in times:
        step = statistics.median(times[loss])
        out[f"{loss}_step_s"] = step
        out[f"{loss}_tokens_per_s"] = tokens / step
        out[f"{loss}_mfu"] = tokens * flops_per_token / step / peak if peak else None
    out["aplot_over_bt"] = out["aplot_step_s"] / out["bt_step_s"]
    out.update(steps=len(times["bt"]), tokens_per_step=tokens)
    return out, str(rm_dir)


def check_bon(opts, config, tokenizer, work: Path, cuda: bool, peak, rm_dir: str):
    """Sampling with the Best-of-N samplers (transformers, and vLLM when asked or importable on CUDA),
    then scoring with the shared RewardScorer."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    from aplot.bon import TransformersSampler, VLLMSampler
    from aplot.data import load_prompts
    from aplot.plan import matmul_params
    from aplot.reward_model import RewardScorer, load_reward_model

    dtype = "bfloat16" if cuda else "float32"
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    policy.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    policy_dir = work / "policy"
    policy.save_pretrained(str(policy_dir))
    tokenizer.save_pretrained(str(policy_dir))
    n_linear = matmul_params(policy)
    del policy
    prompts = load_prompts("embedded", "test_id", opts.prompts)
    params = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": opts.new_tokens}
    # Random weights seldom sample eos: nearly every response runs to max_new_tokens, an upper bound here.
    generated = opts.prompts * opts.samples * opts.new_tokens
    out = {"samples": opts.prompts * opts.samples, "max_new_tokens": opts.new_tokens}
    use_vllm = opts.vllm == "on" or (opts.vllm == "auto" and cuda and importlib.util.find_spec("vllm") is not None)
    backends = [("transformers", lambda: TransformersSampler(str(policy_dir), dtype))]
    if use_vllm:
        backends.append(("vllm", lambda: VLLMSampler(str(policy_dir), dtype)))
    for name, make in backends:
        reset_peak(cuda)
        sampler = make()
        sampler.sample(prompts[:1], [0], 2, {**params, "max_new_tokens": 4}, seed=1)  # warm-up
        start = time.perf_counter()
        sampler.sample(prompts, list(range(len(prompts))), opts.samples, params, seed=0)
        seconds = time.perf_counter() - start
        out[f"{name}_tokens_per_s"] = generated / seconds
        out[f"{name}_peak_gib"] = peak_memory(cuda) if name == "transformers" else None  # vLLM: its own process
        out[f"{name}_mfu"] = 2 * n_linear * generated / seconds / peak if peak else None
        del sampler
    if not use_vllm:
        out["vllm"] = "not run (" + ("--vllm off" if opts.vllm == "off" else "not importable" if cuda
                                     else "CPU: --vllm on to include") + ")"
    reset_peak(cuda)
    model, rm_tokenizer = load_reward_model(rm_dir, dtype=dtype)
    scorer = RewardScorer(model, rm_tokenizer, batch_size=opts.samples, max_length=opts.seq)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(rm_tokenizer) - len(rm_tokenizer.all_special_ids) - 1,
                        (opts.prompts * opts.samples, opts.seq), generator=generator).tolist()
    scorer.score_ids(ids[:opts.samples])  # warm-up
    start = time.perf_counter()
    scorer.score_ids(ids)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out["score_tokens_per_s"] = len(ids) * opts.seq / seconds
    out["score_peak_gib"] = peak_memory(cuda)
    out["score_mfu"] = 2 * matmul_params(model) * len(ids) * opts.seq / seconds / peak if peak else None
    return out, str(policy_dir)


def check_ppo(opts, tokenizer, work: Path, cuda: bool, peak, policy_dir: str, rm_dir: str):
    """A few PPO updates through the ppo stage (TRL's PPOTrainer via the project's trainer class): the
    policy above against the bt reward model, on embedded prompts."""
    from aplot.config import RecipeParser
    from aplot.ppo import APLOTPPOConfig
    from pipelines import ppo

    reset_peak(cuda)
    batch = opts.ppo_batch
    (args,) = RecipeParser((APLOTPPOConfig,)).parse_recipe([
        "--sft_model_path", policy_dir, "--reward_model_path", rm_dir, "--gold", "embedded",
        "--prompt_dataset", "embedded", "--n_prompts", str(batch * opts.ppo_updates), "--n_eval_prompts", "2",
        "--eval_samples_per_prompt", "1", "--gold_eval_steps", "0", "--total_episodes", str(batch * opts.ppo_updates),
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1", "--num_mini_batches", "1",
        "--num_ppo_epochs", "1", "--local_rollout_forward_batch_size", str(batch),
        "--response_length", str(opts.new_tokens), "--output_dir", str(work / "ppo"), "--bf16", str(cuda).lower(),
        "--dtype", "bfloat16" if cuda else "float32", "--num_sample_generations", "0", "--save_strategy", "no",
        "--logging_steps", "1000", "--report_to", "none", "--resume", "false", "--seed", "0"])
    metrics = ppo.run(args)
    seconds = metrics["train_seconds"]
    generated = metrics["updates"] * metrics["episodes_per_update"] * opts.new_tokens
    out = {"updates": metrics["updates"], "episodes_per_update": metrics["episodes_per_update"],
           "train_seconds": seconds, "generated_tokens_per_s": generated / seconds, "peak_gib": peak_memory(cuda)}
    if peak:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        from aplot.plan import matmul_params

        with torch.device("meta"):
            n_policy = matmul_params(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy_dir)))
            n_reward = matmul_params(AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(rm_dir)))
        # Per token of each episode: generation and the reference's forward (2N each for the policy), the
        # reward and value forwards (2N each), one PPO epoch of forward and backward for policy and value (6N).
        per_token = 2 * n_policy * 2 + 2 * n_reward * 2 + 6 * (n_policy + n_reward)
        tokens = metrics["updates"] * metrics["episodes_per_update"] * opts.new_tokens
        out["mfu"] = per_token * tokens / seconds / peak
    else:
        out["mfu"] = None
    out["note"] = "train_seconds include the gold evaluations before the first and after the last update"
    return out


def format_results(r: dict) -> str:
    def mfu(x):
        return f"{100 * x:.1f} %" if x is not None else "-"

    def gib(x):
        return f"{x:.2f}" if x is not None else "-"

    rm, bon, ppo = r["rm"], r["bon"], r["ppo"]
    lines = [f"{'stage':<26}{'tokens/s':>12}{'peak GiB':>10}{'MFU':>9}",
             f"{'rm bt (ZeRO-2)':<26}{rm['bt_tokens_per_s']:>12,.0f}{gib(rm['bt_peak_gib']):>10}{mfu(rm['bt_mfu']):>9}",
             f"{'rm aplot (ZeRO-2)':<26}{rm['aplot_tokens_per_s']:>12,.0f}{gib(rm['aplot_peak_gib']):>10}"
             f"{mfu(rm['aplot_mfu']):>9}"]
    for name in ("transformers", "vllm"):
        if f"{name}_tokens_per_s" in bon:
            lines.append(f"{'bon sampling (' + name + ')':<26}{bon[name + '_tokens_per_s']:>12,.0f}"
                         f"{gib(bon[name + '_peak_gib']):>10}{mfu(bon[name + '_mfu']):>9}")
    lines.append(f"{'bon scoring':<26}{bon['score_tokens_per_s']:>12,.0f}{gib(bon['score_peak_gib']):>10}"
                 f"{mfu(bon['score_mfu']):>9}")
    lines.append(f"{'ppo (generated tokens)':<26}{ppo['generated_tokens_per_s']:>12,.0f}{gib(ppo['peak_gib']):>10}"
                 f"{mfu(ppo['mfu']):>9}")
    lines.append(f"APLOT/BT step-time ratio: {rm['aplot_over_bt']:.3f} (median of {rm['steps']} steps each, "
                 f"{rm['tokens_per_step']} tokens a step)")
    if "vllm" in bon:
        lines.append(f"vLLM: {bon['vllm']}")
    if r["peak_bf16_flops"] is None:
        lines.append("MFU: not reported (" + ("CPU" if r["device"] == "cpu" else "unknown device peak") + ")")
    return "\n".join(lines)


if __name__ == "__main__":
    run_pipeline(main)
