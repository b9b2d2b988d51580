"""Reward-model evaluation on preference pairs, the training-curve plot, and atomic output files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def evaluate_pairs(scorer, dataset, desc="eval") -> dict:
    """Accuracy (overall and per `difficulty` tag) and mean reward margin r+ - r- on a pair dataset."""
    n = len(dataset)
    prompts = list(dataset["prompt"]) if "prompt" in dataset.column_names else [None] * n
    # Chosen and rejected are scored in one call so length-sorting batches them together.
    rewards = scorer.score(prompts + prompts, list(dataset["chosen"]) + list(dataset["rejected"]),
                           progress=True, desc=desc)
    chosen, rejected = rewards[:n], rewards[n:]
    metrics = summarize(chosen, rejected)
    if "difficulty" in dataset.column_names:
        tags = dataset["difficulty"]
        for tag in sorted(set(tags)):
            keep = torch.tensor([t == tag for t in tags])
            metrics[tag] = summarize(chosen[keep], rejected[keep])
    return metrics


def summarize(chosen, rejected) -> dict:
    diff = chosen - rejected
    return {"n": len(diff), "accuracy": (diff > 0).float().mean().item(),
            "mean_reward_margin": diff.mean().item()}


def format_table(results: dict[str, dict]) -> str:
    """A fixed-width table: one row per eval set, accuracy overall and per difficulty."""
    tags = sorted({k for m in results.values() for k, v in m.items() if isinstance(v, dict)})
    header = f"{'eval set':<12}{'pairs':>7}{'accuracy':>10}" + "".join(f"{t + ' acc':>11}" for t in tags) \
        + f"{'margin':>9}"
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        cells = "".join(f"{m[t]['accuracy']:>11.3f}" if t in m else f"{'-':>11}" for t in tags)
        lines.append(f"{name:<12}{m['n']:>7}{m['accuracy']:>10.3f}{cells}{m['mean_reward_margin']:>9.3f}")
    return "\n".join(lines)


def write_atomic(path, write) -> None:
    """Write through a temporary file in the same directory and rename it into place, so a crash
    never leaves a half-written file where a finished one is expected."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    write_atomic(path, write)


def plot_training_curve(log_history: list[dict], path, title="") -> None:
    """Training loss and accuracy (smoothed per logging step) with held-out accuracy, against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in log_history if "loss" in r and "step" in r]
    evals = [r for r in log_history if "eval_accuracy" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_acc.plot([r["step"] for r in train], [r.get("accuracy", float("nan")) for r in train],
                color="tab:blue", alpha=0.5, label="train batches")
    if evals:
        ax_acc.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-",
                    color="tab:orange", label="held-out")
    ax_acc.set(xlabel="step", ylabel="pairwise accuracy", title="accuracy", ylim=(0.4, 1.0))
    ax_acc.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax_acc.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"))
    plt.close(fig)
