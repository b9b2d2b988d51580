"""Reward-model evaluation on preference pairs: accuracy (overall, per subset, on hard pairs),
separation and calibration of the rewards, RewardBench v1 and 2 scores where the data carries their
subsets or layout (aplot/rewardbench.py), and the plots people look at (written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata, wasserstein_distance

from aplot import rewardbench
from aplot.data.formats import is_response_lists
from aplot.outputs import write_atomic, write_json  # noqa: F401  (the stages import them from here too)

ECE_BINS = 10


def evaluate_pairs(scorer, dataset, desc="eval") -> tuple[dict, dict]:
    """Metrics of one eval set, and the rewards behind them ({"chosen": [...], "rejected": [...]}).

    Hard pairs are those tagged `difficulty: hard`; untagged data takes the quarter of pairs whose
    chosen and rejected hidden states are most similar (cosine), the pairs APLOT's cost calls hard.
    """
    n = len(dataset)
    prompts = list(dataset["prompt"]) if "prompt" in dataset.column_names else [None] * n
    ids = scorer.encode_all(prompts + prompts, list(dataset["chosen"]) + list(dataset["rejected"]))
    truncated = sum(max(len(ids[i]), len(ids[n + i])) > (scorer.max_length or float("inf")) for i in range(n))
    # Chosen and rejected are scored in one call so length-sorting batches them together.
    rewards, hidden = scorer.score_ids(ids, return_hidden=True, progress=True, desc=desc)
    chosen, rejected = rewards[:n], rewards[n:]
    metrics = {**summarize(chosen, rejected), "truncated": truncated}

    if "difficulty" in dataset.column_names:
        metrics["hard_pairs"] = "difficulty tag"
        tags = np.array(dataset["difficulty"])
    else:
        metrics["hard_pairs"] = "top quartile of chosen/rejected hidden-state cosine similarity"
        cosine = torch.nn.functional.cosine_similarity(hidden[:n], hidden[n:], dim=-1).numpy()
        tags = np.where(cosine >= np.quantile(cosine, 0.75), "hard", "other") if n else np.array([])
    for tag in sorted(set(tags)):
        keep = torch.from_numpy(tags == tag)
        metrics[tag] = summarize(chosen[keep], rejected[keep])
    if "subset" in dataset.column_names:
        subsets = np.array(dataset["subset"])
        metrics["subsets"] = {name: summarize(chosen[torch.from_numpy(subsets == name)],
                                              rejected[torch.from_numpy(subsets == name)])
                              for name in sorted(set(subsets))}
        scores = rewardbench.v1_scores(subsets.tolist(), chosen.tolist(), rejected.tolist())
        if scores is not None:
            metrics["rewardbench"] = scores
    return metrics, {"chosen": chosen.tolist(), "rejected": rejected.tolist()}


def evaluate_lists(scorer, dataset, desc="eval") -> tuple[dict, dict]:
    """Metrics of an eval set in the response_lists layout (one prompt, k chosen and m rejected responses):
    the pairwise metrics over every chosen x rejected pair, and RewardBench 2's best-of-k and Ties scores.
    Every response is scored once; the rewards returned are those of the responses."""
    n = len(dataset)
    prompts, responses, sizes = [], [], []
    for row in dataset:
        prompts += [row["prompt"]] * (len(row["chosen"]) + len(row["rejected"]))
        responses += row["chosen"] + row["rejected"]
        sizes.append(len(row["chosen"]))
    ids = scorer.encode_all(prompts, responses)
    rewards = scorer.score_ids(ids, progress=True, desc=desc).tolist()
    chosen, rejected, start = [], [], 0
    for row, k in zip(dataset, sizes):
        end = start + k + len(row["rejected"])
        chosen.append(rewards[start:start + k])
        rejected.append(rewards[start + k:end])
        start = end
    pair_c = torch.tensor([c for cs, rs in zip(chosen, rejected) for c in cs for _ in rs])
    pair_r = torch.tensor([r for cs, rs in zip(chosen, rejected) for _ in cs for r in rs])
    limit = scorer.max_length or float("inf")
    metrics = {**summarize(pair_c, pair_r), "rows": n, "truncated_responses": sum(len(x) > limit for x in ids)}
    subsets = dataset["subset"] if "subset" in dataset.column_names else [None] * n
    row_ids = dataset["id"] if "id" in dataset.column_names else [None] * n
    metrics["rewardbench2"] = rewardbench.v2_scores(subsets, row_ids, chosen, rejected)
    return metrics, {"chosen": [x for cs in chosen for x in cs], "rejected": [x for rs in rejected for x in rs]}


def require_rows(eval_sets: dict) -> None:
    """Refuse an eval set with no usable rows before any work (its evaluation would fail only at the end)."""
    from aplot.errors import UserError

    for name, (dataset, counts) in eval_sets.items():
        if len(dataset) == 0:
            dropped = ", ".join(f"{n} {reason}" for reason, n in counts.get("dropped", {}).items())
            raise UserError(f"eval set {name}: no usable pairs ({counts.get('rows_read', 0)} rows read"
                            + (f", dropped: {dropped})" if dropped else ")"))


def evaluate_reward_models(scorers: dict, eval_sets: dict) -> tuple[dict, dict]:
    """Every scorer on every eval set: ({model: {set: metrics}}, {model: {set: rewards}})."""
    results, rewards = {}, {}
    for model, scorer in scorers.items():
        results[model], rewards[model] = {}, {}
        for name, (dataset, _) in eval_sets.items():
            evaluate = evaluate_lists if is_response_lists(dataset) else evaluate_pairs
            results[model][name], rewards[model][name] = evaluate(scorer, dataset, desc=f"{model} | {name}")
    return results, rewards


def summarize(chosen, rejected) -> dict:
    """Accuracy, mean margin, separation (AUC, 1-D Wasserstein) and calibration (ECE) of a pair set."""
    if len(chosen) == 0:
        return {"n": 0}
    diff = (chosen - rejected).double()
    return {"n": len(diff), "accuracy": (diff > 0).double().mean().item(),
            "mean_reward_margin": diff.mean().item(), "auc": auc(chosen, rejected),
            "wasserstein": float(wasserstein_distance(chosen.numpy(), rejected.numpy())),
            "ece": expected_calibration_error(diff)}


def auc(chosen, rejected) -> float:
    """P(a chosen reward beats a rejected one), over all chosen x rejected pairs (Mann-Whitney U)."""
    ranks = rankdata(np.concatenate([chosen.numpy(), rejected.numpy()]))
    n_c, n_r = len(chosen), len(rejected)
    return float((ranks[:n_c].sum() - n_c * (n_c + 1) / 2) / (n_c * n_r))


def expected_calibration_error(diff) -> float:
    """ECE of the Bradley-Terry probability sigmoid(r+ - r-) that the chosen response wins: bins of
    the confidence in the predicted winner against how often that winner is right."""
    p = torch.sigmoid(diff)
    confidence = torch.maximum(p, 1 - p)
    correct = (diff > 0).double()
    bins = torch.clamp(((confidence - 0.5) * 2 * ECE_BINS).long(), max=ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.double().mean().item() * abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item())
    return ece


COLUMNS = (("pairs", "n", "{:>7}"), ("acc", "accuracy", "{:>7.3f}"), ("hard", None, "{:>7.3f}"),
           ("margin", "mean_reward_margin", "{:>8.3f}"), ("AUC", "auc", "{:>7.3f}"), ("W1", "wasserstein", "{:>7.3f}"),
           ("ECE", "ece", "{:>7.3f}"))


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """A fixed-width table, one row per model and eval set: {model: {eval set: metrics}}."""
    width = max([len(m) for m in results] + [5])
    sets = max([len(s) for r in results.values() for s in r] + [8])
    header = f"{'model':<{width}}  {'eval set':<{sets}}" + "".join(f"{c[0]:>{len(c[2].format(0))}}"
                                                                    for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for model, per_set in results.items():
        for name, m in per_set.items():
            cells = []
            for _, key, fmt in COLUMNS:
                value = m.get("hard", {}).get("accuracy") if key is None else m.get(key)
                cells.append(fmt.format(value) if value is not None else f"{'-':>{len(fmt.format(0))}}")
            lines.append(f"{model:<{width}}  {name:<{sets}}" + "".join(cells))
    tables = rewardbench.format_tables(results)
    return "\n".join(lines) + (f"\n\n{tables}" if tables else "")


def eval_curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Pairwise accuracy at each evaluation during training, by eval set: [(step, accuracy)] under
    "held-out" for a single eval set (`eval_accuracy`), under each set's name for several
    (`eval_<name>_accuracy`; with `curve_train_pairs`, the held-out split and "train")."""
    curves = {}
    for record in log_history:
        for key, value in record.items():
            if key.startswith("eval_") and key.endswith("accuracy"):
                name = key[len("eval_"):-len("accuracy")].rstrip("_") or "held-out"
                curves.setdefault(name, []).append((record["step"], value))
    return curves


def plot_training_curve(log_history: list[dict], path, title="") -> None:
    """Training loss and accuracy (smoothed per logging step) with held-out accuracy, against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in log_history if "loss" in r and "step" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_acc.plot([r["step"] for r in train], [r.get("accuracy", float("nan")) for r in train],
                color="tab:blue", alpha=0.5, label="train batches")
    for name, curve in eval_curves(log_history).items():
        ax_acc.plot(*zip(*curve), "o-", color="tab:red" if name == "train" else "tab:orange",
                    label="training pairs (scored)" if name == "train" else f"held-out ({name})")
    ax_acc.set(xlabel="step", ylabel="pairwise accuracy", title="accuracy", ylim=(0.4, 1.0))
    ax_acc.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax_acc.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"))
    plt.close(fig)


def plot_reward_distributions(rewards: dict[str, dict[str, dict]], path) -> None:
    """The paper's Figure 1: chosen and rejected reward histograms, one panel per eval set (rows)
    and reward model (columns), so models can be compared side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(rewards)
    sets = list(dict.fromkeys(name for per_set in rewards.values() for name in per_set))
    fig, axes = plt.subplots(len(sets), len(models), figsize=(4 * len(models), 2.8 * len(sets)), squeeze=False)
    for col, model in enumerate(models):
        for row, name in enumerate(sets):
            ax = axes[row][col]
            r = rewards[model].get(name)
            if r is None:
                ax.set_visible(False)
                continue
            values = np.concatenate([r["chosen"], r["rejected"]])
            bins = np.linspace(values.min(), values.max(), 40) if len(values) and values.min() < values.max() else 10
            ax.hist(r["chosen"], bins=bins, alpha=0.6, color="tab:green", label="chosen")
            ax.hist(r["rejected"], bins=bins, alpha=0.6, color="tab:red", label="rejected")
            ax.set_title(f"{model} | {name}", fontsize=9)
            ax.set_xlabel("reward")
            if col == 0 and row == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=Path(path).suffix[1:] or "png"))
    plt.close(fig)
