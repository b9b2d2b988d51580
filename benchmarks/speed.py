"""The bench's speed section: every number a ratio of two things timed side by side in one process,
interleaved so that whatever else the machine does slows both alike, repeated, reported as the
median with its spread.

- APLOT/BT training-step time and the OT solve's share of a step (benchmarks.step_time);
- the Sinkhorn solve: POT's exp-domain solver against the project's `transport_plan`;
- reward-model scoring (`RewardScorer`) against a bare batched forward of the same tokens;
- vLLM against transformers `generate`, samples per second (benchmarks.generation, own process).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.settings import BenchSettings


def spread(values) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": list(values)}


def step_ratio(s: BenchSettings) -> dict:
    """benchmarks.step_time `step_repeats` times at each of `step_threads`: every run's median APLOT/BT
    ratio and solve share. One thread is what the bench's trainings use, and what a busy machine cannot
    distort; torch's default (both cores) is what `make rm` uses."""
    from benchmarks import step_time

    result = {}
    for threads in s.step_threads:
        runs = []
        for _ in range(s.step_repeats):
            runs.append(step_time.main(["--steps", str(s.step_steps), "--warmup", str(min(5, s.step_steps)),
                                        "--threads", str(threads), "--max_seconds", "60"]))
            one_thread = result.get("1", {}).get("bt_step_ms", {}).get("median")
            if runs[-1]["threads"] > 1 and one_thread and runs[-1]["bt_step_ms"] > 2 * one_thread:
                break  # other work holds the cores: more repeats would take minutes and say no more
        result[str(runs[0]["threads"])] = {
            "runs": runs, "threads": runs[0]["threads"],
            "aplot_over_bt": spread([r["aplot_over_bt"] for r in runs]),
            "ot_solve_ms": spread([r["ot_solve_ms"] for r in runs]),
            "ot_solve_share": spread([r["ot_solve_share_of_aplot_step"] for r in runs]),
            "bt_step_ms": spread([r["bt_step_ms"] for r in runs])}
    return result


def sinkhorn(s: BenchSettings, batch_sizes=(16, 64)) -> dict:
    """Milliseconds per plan (50 iterations, epsilon 0.1, the default cost of random inputs): POT's
    `ot.sinkhorn(method="sinkhorn")` on the float64 cost against `aplot.objective.transport_plan`."""
    import numpy as np
    import ot
    import torch

    from aplot.objective import cost_matrix, transport_plan

    result = {}
    for b in batch_sizes:
        gen = torch.Generator().manual_seed(b)
        cost = cost_matrix(torch.randn(b, generator=gen).double(), torch.randn(b, generator=gen).double(),
                           torch.randn(b, 128, generator=gen).double(), torch.randn(b, 128, generator=gen).double())
        marginal = np.full(b, 1.0 / b)
        solvers = {
            "pot": lambda c=cost, m=marginal: ot.sinkhorn(m, m, c.numpy(), 0.1, method="sinkhorn", numItermax=50,
                                                          stopThr=0, warn=False),
            "transport_plan": lambda c=cost: transport_plan(c, 0.1, 50),
        }
        gap = float(np.abs(np.asarray(solvers["pot"]()) - solvers["transport_plan"]().numpy()).max())
        times = {name: [] for name in solvers}
        for rep in range(s.sinkhorn_reps):
            for name in (solvers if rep % 2 == 0 else reversed(list(solvers))):
                start = time.perf_counter()
                solvers[name]()
                times[name].append((time.perf_counter() - start) * 1e3)
        result[str(b)] = {"pot_ms": statistics.median(times["pot"]),
                          "transport_plan_ms": statistics.median(times["transport_plan"]),
                          "pot_over_transport_plan": spread([p / t for p, t in zip(times["pot"],
                                                                                   times["transport_plan"])]),
                          "max_plan_difference": gap}
    return result


def scoring(s: BenchSettings) -> dict:
    """Sequences per second of `RewardScorer` (the stages' scorer: length-sorted batches built from
    token ids, and from texts, tokenization included) against a bare forward of the very same padded
    batches, prepared in advance. A reward model of the embedded shape; its weights do not matter here."""
    import torch

    from aplot.data.world import build_tokenizer, generate_split
    from aplot.reward_model import build_reward_model

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_reward_model("recipes/models/tiny-qwen2", tokenizer, fresh=True).eval()
    rows = generate_split("test_id", s.score_sequences // 2, 0)
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    # the Best-of-N recipe's score_batch_size
    return scoring_on(model, tokenizer, prompts, responses, batch_size=256, repeats=s.score_repeats)


def scoring_on(model, tokenizer, prompts, responses, batch_size: int, repeats: int, max_length: int = 128,
               chat: bool | None = None) -> dict:
    """`scoring`'s measurement on any reward model and texts (benchmarks.real_speed: a real checkpoint)."""
    import torch

    from aplot.reward_model import RewardScorer, truncate

    scorer = RewardScorer(model, tokenizer, batch_size=batch_size, max_length=max_length, chat=chat)
    ids = scorer.encode_all(prompts, responses)

    # The scorer's own batches (sorted by length, padded to the longest), built before the clock starts.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        part = [truncate(ids[i], max_length) for i in order[start:start + batch_size]]
        width = max(map(len, part))
        input_ids = torch.full((len(part), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, x in enumerate(part):
            input_ids[row, :len(x)] = torch.tensor(x)
            mask[row, :len(x)] = 1
        batches.append((input_ids, mask))

    @torch.no_grad()
    def bare():
        for input_ids, mask in batches:
            model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, 0].float()

    variants = {"bare_forward": bare, "scorer_ids": lambda: scorer.score_ids(ids),
                "scorer_texts": lambda: scorer.score(prompts, responses)}
    times = {name: [] for name in variants}
    for rep in range(repeats + 1):
        names = list(variants)
        names = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
        for name in names:
            start = time.perf_counter()
            variants[name]()
            if rep > 0:  # rep 0 warms up
                times[name].append(time.perf_counter() - start)
    n = len(ids)
    return {"sequences": n, "batch_size": batch_size, "mean_tokens": sum(map(len, ids)) / n, "threads": _threads(),
            "sequences_per_s": {name: n / statistics.median(ts) for name, ts in times.items()},
            "scorer_ids_over_bare": spread([b / t for b, t in zip(times["bare_forward"], times["scorer_ids"])]),
            "scorer_texts_over_bare": spread([b / t for b, t in zip(times["bare_forward"], times["scorer_texts"])])}


def generation(s: BenchSettings, out_dir: Path, policy: str, log=print) -> dict:
    """benchmarks.generation in its own process, on the embedded policy and on a larger Qwen2 built
    from a config (where the engine's batching has more to win); a failure is recorded, not raised."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    cases = {"embedded_policy": ["--model", policy, "--n_prompts", str(s.gen_prompts)]}
    if s.gen_medium_prompts:
        cases["medium_qwen2"] = ["--model", policy, "--medium", str(out_dir.parent / "models" / "qwen2-medium"),
                                 "--n_prompts", str(s.gen_medium_prompts)]
    for name, args in cases.items():
        path = out_dir / f"generation_{name}.json"
        cmd = [sys.executable, "-m", "benchmarks.generation", *args, "--n", str(s.gen_samples),
               "--repeats", str(s.gen_repeats), "--json", str(path)]
        with open(out_dir / f"generation_{name}.log", "w") as logfile:
            done = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=dict(os.environ))
        if done.returncode == 0 and path.exists():
            result[name] = json.loads(path.read_text())
        else:
            result[name] = {"status": "failed", "error": f"exit {done.returncode}, see {logfile.name}"}
        log(f"generation {name}: " + (f"vLLM/transformers {result[name]['vllm_over_transformers']['median']:.2f}"
                                      if "vllm_over_transformers" in result[name] else result[name]["error"]))
    return result


def _threads() -> int:
    import torch

    return torch.get_num_threads()
