"""`make eval`: evaluate one or more trained reward models on a recipe's eval sets, side by side.
Writes metrics.json and reward_distributions.png to `output_dir` and prints a table (and the RewardBench
scores of eval sets that carry RewardBench subsets or the RewardBench 2 layout).

    python -m pipelines.eval --config recipes/eval/embedded.yaml [--reward_models a b ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aplot.errors import UserError, run_pipeline


@dataclass
class EvalConfig:
    """Which reward models to evaluate, and how."""

    reward_models: list[str] = field(default_factory=list, metadata={
        "help": "Reward-model directories (outputs of `make rm`) or hub ids."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where metrics and plots go."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_dir that holds files no aplot run made (files of the same names are "
                "replaced, the others kept); off, such a directory is refused."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per scoring batch."})
    max_length: int | None = field(default=None, metadata={"help": "Keep the last N tokens of longer texts."})
    dtype: str | None = field(default=None, metadata={"help": "Load the models in this dtype (bfloat16, ...)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    normalize_rewards: bool = field(default=False, metadata={
        "help": "Score (r - mean) / std with the reward stats `make rm` wrote into each model's config.json."})

    def __post_init__(self):  # here, not in main(): the message then names the recipe
        from aplot.config import MAX_BATCH, MAX_TOKENS, check_dtype, check_range
        from aplot.reward_model import model_names

        check_range("batch_size", self.batch_size, low=1, high=MAX_BATCH)
        if self.max_length is not None:
            check_range("max_length", self.max_length, low=1, high=MAX_TOKENS)
        check_dtype(self.dtype)
        model_names(self.reward_models)  # a model listed twice is refused here


def main(argv=None) -> dict:
    from aplot.config import DataConfig, RecipeParser
    from aplot.outputs import lock

    data_cfg, cfg = RecipeParser((DataConfig, EvalConfig)).parse_recipe(argv)
    with lock(cfg.output_dir):  # one run per output directory
        return evaluate(data_cfg, cfg)


def evaluate(data_cfg, cfg) -> dict:
    from aplot.data import load_eval_sets
    from aplot.evaluation import (
        evaluate_reward_models,
        format_table,
        plot_reward_distributions,
        require_rows,
        write_json,
    )
    from aplot.outputs import RunPlan
    from aplot.reward_model import (
        RewardScorer,
        check_reward_model,
        check_reward_stats,
        load_reward_model,
        model_names,
    )

    if not cfg.reward_models:
        raise UserError("reward_models is empty: name at least one reward-model directory")
    # Every input is checked before the first model is scored; the output directory too: it is this
    # stage's own (never a reward model's, whose metrics.json it would overwrite).
    for path in cfg.reward_models:
        check_reward_model(path, cfg.trust_remote_code)
        if cfg.normalize_rewards:
            check_reward_stats(path)
    eval_sets = load_eval_sets(data_cfg)
    require_rows(eval_sets)
    out = Path(cfg.output_dir)
    plan = RunPlan(out, resume=False, settings=None, results=RESULTS, stage="eval",
                   inputs={"reward_models": cfg.reward_models}, overwrite=cfg.overwrite_output_dir)

    scorers = {}
    for name, path in model_names(cfg.reward_models).items():  # a/rm and b/rm stay two rows
        model, tokenizer = load_reward_model(path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        # as_chat renders string pairs as chat turns for every model (a hub reward model records nothing);
        # unset, each model reads texts as it was trained to (its config's record).
        scorers[name] = RewardScorer(model, tokenizer, cfg.batch_size, cfg.max_length,
                                     normalize=cfg.normalize_rewards, chat=True if data_cfg.as_chat else None)
    results, rewards = evaluate_reward_models(scorers, eval_sets)

    work = plan.prepare()  # written aside, then swapped in: out never holds half of two evaluations
    metrics = {"models": results, "reward_models": cfg.reward_models, "normalize_rewards": cfg.normalize_rewards,
               "data": {name: counts for name, (_, counts) in eval_sets.items()}}
    write_json(work / "metrics.json", metrics)
    plot_reward_distributions(rewards, work / "reward_distributions.png")
    plan.publish()
    print(format_table(results))
    print(f"wrote {out}/metrics.json and {out}/reward_distributions.png")
    return metrics


RESULTS = ("metrics.json", "reward_distributions.png")


if __name__ == "__main__":
    run_pipeline(main)
