"""Stage 2, `make bon`: sample N responses per prompt from a policy, score them with one or more
proxy reward models and a gold reward, and report gold reward against the Best-of-N KL.
Writes samples.jsonl and scores.jsonl (resumable caches), bon_table.csv/json, bon.png and
metrics.json to `output_dir`.

    python -m pipelines.bon --config recipes/bon/embedded.yaml [--key value ...]
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from aplot.bon import as_response, policy_inputs
from aplot.errors import UserError, run_pipeline


@dataclass
class BonConfig:
    """The Best-of-N stage: policy, prompts, sampling, scorers."""

    policy_name_or_path: str = field(default="embedded", metadata={
        "help": "Policy model directory or hub id, or a model preset (recipes/models/<name>/), whose SFT "
                "policy is built once and reused; 'embedded' is the tiny-qwen2 preset."})
    lineage_dir: str = field(default="outputs/lineage", metadata={
        "help": "Where a preset's tokenizer, base LM and SFT policy are built once and reused."})
    reward_models: list[str] = field(default_factory=list, metadata={
        "help": "Proxy reward models (directories of `make rm`), each named by its directory."})
    gold: str = field(default="embedded", metadata={
        "help": "'embedded' (the world's gold function) or a sequence-classification reward model."})
    prompt_dataset: str = field(default="embedded", metadata={
        "help": "Where prompts come from: 'embedded' or a dataset (hub name or local file) as in rm recipes."})
    prompt_config: str | None = field(default=None, metadata={"help": "Hub configuration of prompt_dataset."})
    prompt_split: str = field(default="test_id", metadata={"help": "Split of prompt_dataset."})
    prompt_format: str = field(default="explicit", metadata={"help": "Format of prompt_dataset (rm recipes)."})
    prompt_columns: dict[str, str] | None = field(default=None, metadata={"help": "Column mapping."})
    n_prompts: int = field(default=64, metadata={"help": "Distinct prompts to sample for."})
    world_seed: int = field(default=0, metadata={"help": "Embedded world seed (prompts)."})
    n_samples: int = field(default=64, metadata={"help": "N: samples per prompt (a power of two)."})
    backend: str = field(default="vllm", metadata={"help": "'vllm' or 'transformers' (the reference)."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size."})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM context length."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    max_new_tokens: int = field(default=24, metadata={"help": "Longest response in tokens."})
    seed: int = field(default=0, metadata={"help": "Sampling seed: same recipe, seed and backend, same samples."})
    chunk_prompts: int = field(default=16, metadata={"help": "Prompts per sampling chunk (cache granularity)."})
    score_batch_size: int = field(default=128, metadata={"help": "Sequences per scoring batch."})
    max_length: int | None = field(default=None, metadata={"help": "Scorers keep the last N tokens."})
    dtype: str | None = field(default=None, metadata={"help": "dtype for the policy and scorers."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    normalize_rewards: bool = field(default=False, metadata={
        "help": "Proxy scores as (r - mean) / std, with the reward stats `make rm` wrote into each config.json."})
    output_dir: str = field(default="outputs/bon/embedded", metadata={"help": "Where results go."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_dir that holds files no aplot run made (files of the same names are "
                "replaced, the others kept); off, such a directory is refused."})

    def __post_init__(self):
        from aplot.config import MAX_BATCH, MAX_PAIRS, MAX_SEED, MAX_TOKENS, check_dtype, check_range
        from aplot.reward_model import model_names

        for key, high in (("n_prompts", MAX_PAIRS), ("n_samples", MAX_BATCH), ("chunk_prompts", MAX_PAIRS),
                          ("score_batch_size", MAX_BATCH), ("max_new_tokens", MAX_TOKENS),
                          ("tensor_parallel_size", 1024)):
            check_range(key, getattr(self, key), low=1, high=high)
        for key in ("max_length", "max_model_len"):
            if getattr(self, key) is not None:
                check_range(key, getattr(self, key), low=1, high=MAX_TOKENS)
        if self.n_prompts * self.n_samples > MAX_PAIRS:
            raise UserError(f"n_prompts x n_samples is {self.n_prompts * self.n_samples:,} responses, more than "
                            f"{MAX_PAIRS:,}: sample fewer")
        check_dtype(self.dtype)
        for key in ("seed", "world_seed"):
            check_range(key, getattr(self, key), low=0, high=MAX_SEED)
        if self.n_samples & (self.n_samples - 1):
            raise UserError(f"n_samples must be a power of two (the table reports n = 1, 2, 4, ...), "
                            f"got {self.n_samples}")
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        check_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        if self.backend not in ("vllm", "transformers"):
            raise UserError(f"backend {self.backend!r} is not one of vllm, transformers")
        if not self.reward_models:
            raise UserError("reward_models is empty: name at least one proxy reward model")
        model_names(self.reward_models, reserved=("gold",))  # a model listed twice is refused here


def load_prompts(cfg: BonConfig) -> list:
    from aplot.data import load_prompts as load

    return load(cfg.prompt_dataset, cfg.prompt_split, cfg.n_prompts, cfg.prompt_format, cfg.prompt_config,
                cfg.prompt_columns, cfg.world_seed)


def main(argv=None) -> dict:
    from aplot.config import RecipeParser
    from aplot.distributed import init_distributed
    from aplot.outputs import lock

    # Under a launcher (make bon NPROC=N) rank 0 trains the policy and samples, every rank scores its
    # share of the samples, and rank 0 writes the caches and the results.
    state = init_distributed()
    (cfg,) = RecipeParser((BonConfig,)).parse_recipe(argv)
    with lock(cfg.output_dir):  # one run per output directory
        return best_of_n(cfg, state)


def best_of_n(cfg: BonConfig, state) -> dict:
    import numpy as np
    from tqdm.auto import tqdm

    from aplot import bon
    from aplot.config import check_model_source
    from aplot.distributed import map_sharded
    from aplot.evaluation import write_atomic, write_json
    from aplot.lineage import policy_path
    from aplot.outputs import RunPlan
    from aplot.reward_model import (
        RewardScorer,
        check_reward_model,
        check_reward_stats,
        check_weights,
        load_reward_model,
        model_names,
    )

    check_model_source(cfg.policy_name_or_path, "policy", cfg.trust_remote_code)
    # The scorers are loaded only after sampling: check now what would make them fail then.
    for path in cfg.reward_models + ([cfg.gold] if cfg.gold != "embedded" else []):
        check_reward_model(path, cfg.trust_remote_code)
    for path in cfg.reward_models if cfg.normalize_rewards else []:
        check_reward_stats(path)
    out = Path(cfg.output_dir)
    # The caches are resumed in out itself (rows are only ever added to them); the results are written
    # aside and swapped in at the end.
    prompts = load_prompts(cfg)
    inputs = {"policy_name_or_path": cfg.policy_name_or_path, "reward_models": cfg.reward_models, "gold": cfg.gold}
    plan = RunPlan(out, resume=False, settings=None, results=RESULTS, stage="bon", inputs=inputs,
                   overwrite=cfg.overwrite_output_dir)
    if state.is_main_process:
        plan.prepare()

    with state.main_process_first():  # the other ranks then find the policy and the samples cached
        policy = policy_path(cfg.policy_name_or_path, cfg.lineage_dir)
        check_weights(policy, "policy", cfg.trust_remote_code)

        # 1. Samples, cached per (prompt, sample index); the settings that made them are recorded.
        params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens}
        settings = {"policy": str(policy), "backend": cfg.backend, "n_samples": cfg.n_samples, "seed": cfg.seed,
                    "prompts": bon.settings_hash({"prompts": [repr(p) for p in prompts]}), **params}
        samples = bon.JsonlCache(out / "samples.jsonl", ("prompt_index", "sample_index"), settings)
        todo = [i for i in range(len(prompts)) if any((i, j) not in samples for j in range(cfg.n_samples))]
        if todo:
            sampler = (bon.VLLMSampler(policy, cfg.dtype, cfg.tensor_parallel_size, cfg.max_model_len,
                                       cfg.trust_remote_code) if cfg.backend == "vllm"
                       else bon.TransformersSampler(policy, cfg.dtype, trust_remote_code=cfg.trust_remote_code))
            texts = policy_inputs(policy, prompts, cfg.trust_remote_code)
            for start in tqdm(range(0, len(todo), cfg.chunk_prompts), desc=f"sampling ({cfg.backend})"):
                chunk = todo[start:start + cfg.chunk_prompts]
                responses = sampler.sample([texts[i] for i in chunk], chunk, cfg.n_samples, params, cfg.seed)
                samples.append([{"prompt_index": i, "sample_index": j, "response": r}
                                for i, rs in zip(chunk, responses) for j, r in enumerate(rs)])
            del sampler

    # 2. Scores of every sample by every proxy and the gold, cached per (scorer, prompt, sample).
    # Every rank scores a contiguous share of the missing samples; the results come back in order and
    # only rank 0 appends them.
    with state.main_process_first():
        scores = bon.JsonlCache(out / "scores.jsonl", ("scorer", "prompt_index", "sample_index"),
                                {"samples": bon.settings_hash(settings), "max_length": cfg.max_length,
                                 "reward_models": cfg.reward_models, "gold": cfg.gold,
                                 # only when on, so caches made before the key existed stay valid
                                 **({"normalize_rewards": True} if cfg.normalize_rewards else {})})
    keys = [(i, j) for i in range(len(prompts)) for j in range(cfg.n_samples)]
    scorers = model_names(cfg.reward_models, reserved=("gold",))  # a/rm and b/rm stay two proxies
    scorers["gold"] = cfg.gold
    for name, path in scorers.items():
        missing = [k for k in keys if (name, *k) not in scores]
        if not missing:
            continue
        responses = [samples.rows[k]["response"] for k in missing]
        if path == "embedded":
            from aplot.data.world import gold_reward

            values = map_sharded(lambda items: [gold_reward(prompts[i], r) for (i, _), r in items],
                                 list(zip(missing, responses)))
            if state.is_main_process:
                scores.append([{"scorer": name, "prompt_index": i, "sample_index": j, "score": v}
                               for (i, j), v in zip(missing, values)])
            continue
        model, tokenizer = load_reward_model(path, device=str(state.device), dtype=cfg.dtype,
                                             trust_remote_code=cfg.trust_remote_code)
        # the gold reward is never normalised: it is the yardstick, not a proxy
        scorer = RewardScorer(model, tokenizer, cfg.score_batch_size, cfg.max_length,
                              normalize=cfg.normalize_rewards and name != "gold")
        for start in tqdm(range(0, len(missing), 1024), desc=f"scoring with {name}"):
            part = missing[start:start + 1024]
            rs = responses[start:start + 1024]
            values = map_sharded(partial(score_samples, scorer, prompts), list(zip(part, rs)))
            if state.is_main_process:
                scores.append([{"scorer": name, "prompt_index": i, "sample_index": j, "score": float(v)}
                               for (i, j), v in zip(part, values)])
    if not state.is_main_process:
        return {}

    # 3. The exact Best-of-N estimate for n = 1, 2, 4, ... N.
    def matrix(name):
        return np.array([[scores.rows[(name, i, j)]["score"] for j in range(cfg.n_samples)]
                         for i in range(len(prompts))])

    gold = matrix("gold")
    ns = bon.powers_of_two(cfg.n_samples)
    table = []
    for name in scorers:
        if name == "gold":
            continue
        estimate = bon.best_of_n(matrix(name), gold, ns)
        g1, p1 = estimate[1]
        table += [{"proxy": name, "n": n, "kl": bon.kl_best_of_n(n), "gold": g, "proxy_score": p,
                   "gold_normalized": g - g1, "proxy_normalized": p - p1} for n, (g, p) in estimate.items()]
    oracle = bon.best_of_n(gold, gold, ns)  # the ceiling: picking by the gold reward itself

    work = plan.work
    write_json(work / "bon_table.json", table)
    write_atomic(work / "bon_table.csv", lambda tmp: Path(tmp).write_text(to_csv(table)))
    bon.plot_gold_vs_kl(table, work / "bon.png")
    report_ns = [n for n in (1, 4, 16, 64, 256, 1024) if n <= cfg.n_samples]
    metrics = {"n_prompts": len(prompts), "n_samples": cfg.n_samples, "backend": cfg.backend, "policy": str(policy),
               "processes": state.num_processes,
               "gold_at_n": {r["proxy"]: {} for r in table}, "oracle_gold_at_n": {n: oracle[n][0] for n in report_ns}}
    for r in table:
        if r["n"] in report_ns:
            metrics["gold_at_n"][r["proxy"]][r["n"]] = r["gold"]
    write_json(work / "metrics.json", metrics)
    plan.publish(keep=CACHES)
    print(f"{'proxy':<20}" + "".join(f"{'gold@' + str(n):>10}" for n in report_ns))
    for name, by_n in metrics["gold_at_n"].items():
        print(f"{name:<20}" + "".join(f"{by_n[n]:>10.3f}" for n in report_ns))
    print(f"{'(gold itself)':<20}" + "".join(f"{metrics['oracle_gold_at_n'][n]:>10.3f}" for n in report_ns))
    print(f"wrote {out}/ (bon_table.csv, bon_table.json, bon.png, metrics.json)")
    return metrics


RESULTS = ("bon_table.json", "bon_table.csv", "bon.png", "metrics.json")
CACHES = ("samples.jsonl", "samples.settings.json", "scores.jsonl", "scores.settings.json")


def score_samples(scorer, prompts, items) -> list[float]:
    """Rewards of `((prompt_index, sample_index), response)` items, as a list the ranks can gather."""
    return scorer.score([prompts[i] for (i, _), _ in items],
                        [as_response(prompts[i], r) for (i, _), r in items]).tolist()


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


if __name__ == "__main__":
    run_pipeline(main, resume="")
