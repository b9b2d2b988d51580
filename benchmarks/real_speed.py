"""The pipeline's speed ratios on a real checkpoint (`make bench-speed-real`): the APLOT/BT training-step time
of its reward model, the scorer against a bare batched forward, and vLLM against transformers `generate` in
samples per second on it as a policy; each ratio from two things timed side by side in one run. Adds the
preset's entry to benchmarks/real_speed.json and regenerates RESULTS.md's table of it.

    python -m benchmarks.real_speed [--preset smollm2-135m-instruct] [--recipe recipes/rm/<preset>.yaml]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from aplot.config import MAX_BATCH, check_range
from aplot.errors import run_pipeline


def measure(preset: str, recipe: str, step_steps: int, score_sequences: int, gen_prompts: int, gen_n: int,
            gen_tokens: int, repeats: int, work: Path, lineage_dir: str | None = None, step_batch: int = 0,
            log=print) -> dict:
    import torch

    from aplot.config import parse_rm_recipe
    from aplot.data.world import generate_split
    from aplot.lineage import model_path
    from aplot.reward_model import build_reward_model, load_tokenizer
    from benchmarks import speed, step_time

    data_cfg, args, model_cfg = parse_rm_recipe(["--config", recipe])
    path = model_path(preset, "sft", lineage_dir or model_cfg.lineage_dir)
    result = {"preset": preset, "path": path, "recipe": recipe, "torch_threads": torch.get_num_threads()}

    t = time.perf_counter()
    # the recipe's own model (the preset's weights) and, unless told, its batch size
    result["step"] = step_time.main(["--recipe", recipe, "--steps", str(step_steps), "--warmup", "2",
                                     "--batch", str(step_batch or args.per_device_train_batch_size)])
    result["step"]["seconds"] = round(time.perf_counter() - t, 1)
    log(f"{preset}: APLOT/BT step {result['step']['aplot_over_bt']:.3f}")

    t = time.perf_counter()
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model = build_reward_model(path, tokenizer).eval()
    rows = generate_split("test_id", score_sequences // 2, 0)
    result["scoring"] = speed.scoring_on(model, tokenizer, [r["prompt"] for r in rows] * 2,
                                         [r["chosen"] for r in rows] + [r["rejected"] for r in rows],
                                         batch_size=args.per_device_eval_batch_size, repeats=repeats,
                                         max_length=args.max_length, chat=True)
    result["scoring"]["seconds"] = round(time.perf_counter() - t, 1)
    del model
    log(f"{preset}: scorer/bare {result['scoring']['scorer_ids_over_bare']['median']:.3f}")

    if not gen_prompts:
        result["generation"] = {"status": "not measured", "error": "not asked for (--gen_prompts 0)"}
        return result
    t = time.perf_counter()
    out = work / f"generation_{Path(preset).name}.json"
    work.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "benchmarks.generation", "--model", path, "--n_prompts",
                           str(gen_prompts), "--n", str(gen_n), "--max_new_tokens", str(gen_tokens), "--repeats",
                           str(repeats), "--json", str(out)])
    result["generation"] = json.loads(out.read_text()) if done.returncode == 0 and out.exists() else {
        "status": "failed", "error": f"benchmarks.generation exited {done.returncode}"}
    result["generation"]["seconds"] = round(time.perf_counter() - t, 1)
    if "vllm_over_transformers" in result["generation"]:
        log(f"{preset}: vLLM/transformers {result['generation']['vllm_over_faster_transformers']['median']:.2f}")
    return result


def main(argv=None) -> dict:
    from benchmarks import report
    from benchmarks.run import TARGETS, environment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m-instruct")
    parser.add_argument("--recipe", default=None, help="default: recipes/rm/<preset>.yaml")
    parser.add_argument("--step_steps", type=int, default=6, help="measured training steps per loss")
    parser.add_argument("--step_batch", type=int, default=0,
                        help="pairs per training step (0: the recipe's); smaller where two trainers do not fit")
    parser.add_argument("--score_sequences", type=int, default=256)
    parser.add_argument("--gen_prompts", type=int, default=8, help="0: no vLLM/transformers measurement")
    parser.add_argument("--gen_n", type=int, default=16)
    parser.add_argument("--gen_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", default="benchmarks")
    parser.add_argument("--work", default="outputs/bench-speed-real")
    parser.add_argument("--lineage_dir", default=None, help="where the preset is imported (default: the recipe's)")
    opts = parser.parse_args(argv)
    check_range("--step_batch", opts.step_batch, low=0, high=MAX_BATCH, hint=" (0: the recipe's batch)")
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    result = measure(opts.preset, opts.recipe or f"recipes/rm/{opts.preset}.yaml", opts.step_steps,
                     opts.score_sequences, opts.gen_prompts, opts.gen_n, opts.gen_tokens, opts.repeats,
                     Path(opts.work), opts.lineage_dir, opts.step_batch)
    result.update(started=started, wall_seconds=round(time.perf_counter() - t0, 1), targets=TARGETS,
                  environment=environment(),
                  peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    file = Path(opts.results) / "real_speed.json"
    entries = json.loads(file.read_text()) if file.exists() else {}
    report.write_section(opts.results, file.name, {**entries, Path(opts.preset).name: result})
    print(f"wrote {file}; {result['wall_seconds'] / 60:.1f} min")
    return result


if __name__ == "__main__":  # vLLM starts its workers with spawn: the guard keeps them from rerunning this
    run_pipeline(main)  # a bad flag or recipe: one line, exit 2
