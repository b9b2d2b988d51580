"""`make demo`'s last step: a short summary of what each stage measured on the embedded default, read
from the stages' own metrics.json files, and where their plots are.

    python -m pipelines.summary [--rm dir ...] [--bon dir] [--ppo dir ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aplot.errors import UserError, run_pipeline

DEFAULTS = {"rm": ["outputs/rm/embedded-bt", "outputs/rm/embedded-aplot"], "bon": "outputs/bon/embedded",
            "ppo": ["outputs/ppo/embedded-bt", "outputs/ppo/embedded-aplot"]}


def read_metrics(directory: str) -> dict:
    path = Path(directory) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: run that stage first")
    return json.loads(path.read_text())


def summarize(rm_dirs: list[str], bon_dir: str | None, ppo_dirs: list[str]) -> str:
    lines = ["", "== Reward models (make rm): pairwise accuracy on held-out pairs =="]
    lines.append(f"{'model':<22}{'test_id':>9}{'hard':>9}{'test_ood':>10}{'train s':>9}")
    for d in rm_dirs:
        m = read_metrics(d)
        ev = m["eval"]
        hard = ev["test_id"].get("hard", {}).get("accuracy", float("nan"))
        lines.append(f"{Path(d).name:<22}{ev['test_id']['accuracy']:>9.3f}{hard:>9.3f}"
                     f"{ev['test_ood']['accuracy']:>10.3f}{m['train_seconds']:>9.0f}")
    lines.append(f"plots: {', '.join(f'{d}/training_curve.png' for d in rm_dirs)}, "
                 f"{rm_dirs[-1]}/reward_distributions.png")
    if bon_dir:
        m = read_metrics(bon_dir)
        ns = list(m["oracle_gold_at_n"])
        lines += ["", f"== Best-of-N (make bon): gold reward of the proxy's pick, {m['n_prompts']} prompts =="]
        lines.append(f"{'proxy':<22}" + "".join(f"{'N=' + n:>9}" for n in ns))
        for proxy, by_n in m["gold_at_n"].items():
            lines.append(f"{proxy:<22}" + "".join(f"{by_n[n]:>9.3f}" for n in ns))
        lines.append(f"{'(gold itself)':<22}" + "".join(f"{m['oracle_gold_at_n'][n]:>9.3f}" for n in ns))
        lines.append(f"plot: {bon_dir}/bon.png")
    if ppo_dirs:
        lines += ["", "== PPO (make ppo): held-out gold reward before and after, KL to the reference =="]
        lines.append(f"{'reward model':<22}{'gold before':>12}{'gold after':>12}{'proxy after':>12}{'KL':>8}")
        for d in ppo_dirs:
            m = read_metrics(d)
            lines.append(f"{Path(m['reward_model']).name:<22}{m['before']['gold']:>12.3f}{m['after']['gold']:>12.3f}"
                         f"{m['after']['proxy']:>12.3f}{m['after']['kl']:>8.2f}")
        # One figure with every run's curve: the comparison the demo is for.
        from aplot.ppo import plot_gold_vs_kl_curve

        together = Path(ppo_dirs[0]).parent / "gold_vs_kl.png"
        plot_gold_vs_kl_curve({Path(read_metrics(d)["reward_model"]).name: read_metrics(d)["gold_curve"]
                               for d in ppo_dirs}, together)
        lines.append(f"plots: {together} (all runs), {', '.join(f'{d}/gold_vs_kl.png' for d in ppo_dirs)}")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rm", nargs="+", default=DEFAULTS["rm"])
    parser.add_argument("--bon", default=DEFAULTS["bon"])
    parser.add_argument("--ppo", nargs="*", default=DEFAULTS["ppo"])
    args = parser.parse_args(argv)
    text = summarize(args.rm, args.bon or None, args.ppo)
    print(text)
    return text


if __name__ == "__main__":
    run_pipeline(main)
