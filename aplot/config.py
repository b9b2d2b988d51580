"""Recipe configuration: TRL's dataclasses extended with APLOT's keys, parsed from YAML by TrlParser.

A recipe is a YAML file whose keys are the fields of `DataConfig`, `APLOTConfig` (TRL's
`RewardConfig`, so every `transformers.TrainingArguments` key too) and TRL's `ModelConfig`;
command-line flags override it: `python -m pipelines.rm --config recipe.yaml --gamma 0.3`.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, RewardConfig, TrlParser

from aplot.errors import UserError
from aplot.objective import LOSS_TYPES


@dataclass
class DataConfig:
    """Which preference data to train and evaluate on."""

    dataset_name: str = field(default="embedded", metadata={
        "help": "'embedded' (the built-in synthetic world), a hub dataset name, or a local "
                "json/jsonl/parquet/csv file or directory."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_format: str = field(default="explicit", metadata={
        "help": "Layout of the rows: explicit, hh, conversational, ratings, multiple_choice or "
                "pairwise_judgment (see aplot/data/formats.py)."})
    dataset_columns: dict[str, str] | None = field(default=None, metadata={
        "help": "Rename columns to the names the format expects, e.g. {prompt: question}."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_train_pairs: int | None = field(default=None, metadata={
        "help": "Train on the first N pairs only (a subset of a large dataset)."})
    eval_splits: list[str] = field(default_factory=lambda: ["test_id", "test_ood"], metadata={
        "help": "Splits of the dataset to evaluate on (the first one is also evaluated during training)."})
    eval_datasets: list[dict] | None = field(default=None, metadata={
        "help": "Further eval sets from other sources: a list of {name, path, format[, config, split, "
                "columns]}, e.g. HHH-Alignment and MT-Bench judgments."})
    strict: bool = field(default=False, metadata={
        "help": "Fail on the first bad row instead of dropping and counting it."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer to use; defaults to the model's. 'embedded' trains the world's own tokenizer."})
    world_seed: int = field(default=0, metadata={"help": "Embedded world: seed of every split."})
    n_train: int = field(default=40000, metadata={"help": "Embedded world: training pairs."})
    n_eval: int = field(default=1000, metadata={"help": "Embedded world: pairs per evaluation split."})
    hard_fraction: float = field(default=0.5, metadata={"help": "Embedded world: share of hard pairs."})
    label_noise: float = field(default=0.0, metadata={
        "help": "Share of training pairs whose labels are flipped (embedded world)."})
    curve_eval_pairs: int = field(default=500, metadata={
        "help": "Pairs of the first eval split scored at each eval step for the training curve."})

    def __post_init__(self):
        check_range("n_train", self.n_train, low=1)
        check_range("n_eval", self.n_eval, low=1)
        check_range("curve_eval_pairs", self.curve_eval_pairs, low=1)
        check_range("hard_fraction", self.hard_fraction, 0.0, 1.0)
        check_range("label_noise", self.label_noise, 0.0, 1.0)
        if self.max_train_pairs is not None:
            check_range("max_train_pairs", self.max_train_pairs, low=1)
        from aplot.data.formats import FORMATS

        if self.dataset_format not in FORMATS:
            raise UserError(f"dataset_format {self.dataset_format!r} is not one of {', '.join(FORMATS)}"
                            + did_you_mean(self.dataset_format, FORMATS))
        for i, spec in enumerate(self.eval_datasets or []):
            if not isinstance(spec, dict) or not {"name", "path"} <= spec.keys():
                raise UserError(f"eval_datasets[{i}] needs at least a name and a path, got {spec!r}")
            unknown = set(spec) - {"name", "path", "format", "config", "split", "columns"}
            if unknown:
                raise UserError(f"eval_datasets[{i}]: unknown key {sorted(unknown)[0]!r}")
            if spec.get("format", "explicit") not in FORMATS:
                raise UserError(f"eval_datasets[{i}]: format {spec['format']!r} is not one of {', '.join(FORMATS)}")

    def eval_sources(self) -> dict[str, dict]:
        """Every eval set by name: the dataset's own `eval_splits`, then `eval_datasets`."""
        own = {"path": self.dataset_name, "config": self.dataset_config, "format": self.dataset_format,
               "columns": self.dataset_columns}
        sources = {split: {**own, "split": split} for split in self.eval_splits}
        for spec in self.eval_datasets or []:
            sources[spec["name"]] = {"format": "explicit", "config": None, "split": "train", "columns": None, **spec}
        return sources


@dataclass
class APLOTConfig(RewardConfig):
    """TRL's `RewardConfig` plus the margin of each loss type (see `aplot/objective.py`)."""

    loss_type: str = field(default="aplot", metadata={
        "help": f"Margin of the Bradley-Terry loss: one of {', '.join(LOSS_TYPES)}."})
    gamma: float = field(default=0.1, metadata={
        "help": "Weight of the semantic cost; 1 - gamma weighs the reward cost."})
    epsilon: float = field(default=0.1, metadata={"help": "Entropic regularisation of the Sinkhorn plan."})
    sinkhorn_iters: int = field(default=50, metadata={"help": "Log-domain Sinkhorn iterations."})
    margin_scale: float = field(default=1.0, metadata={
        "help": "Multiplies the aplot and point margins."})
    margin_value: float | None = field(default=None, metadata={
        "help": "loss_type=margin: a constant margin; unset, the dataset's own `margin` column."})
    label_smoothing: float = field(default=0.1, metadata={
        "help": "loss_type=label_smoothing: probability a that a label is wrong."})
    ot_hidden: str = field(default="last_token", metadata={
        "help": "Hidden state for the semantic cost: 'last_token' (what a decoder's score head "
                "reads) or 'first_token' (encoder models)."})
    ot_scope: str = field(default="global", metadata={
        "help": "'global': one plan over the batch of all ranks; 'local': one plan per rank."})

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"loss_type {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}"
                            + did_you_mean(self.loss_type, LOSS_TYPES))
        check_range("gamma", self.gamma, 0.0, 1.0)
        check_range("epsilon", self.epsilon, low=0.0, low_open=True)
        check_range("sinkhorn_iters", self.sinkhorn_iters, low=1)
        check_range("margin_scale", self.margin_scale)
        check_range("label_smoothing", self.label_smoothing, 0.0, 0.5)
        if self.margin_value is not None:
            check_range("margin_value", self.margin_value)
        for key, value, choices in (("ot_hidden", self.ot_hidden, ("last_token", "first_token")),
                                    ("ot_scope", self.ot_scope, ("global", "local"))):
            if value not in choices:
                raise UserError(f"{key} {value!r} is not one of {', '.join(choices)}")
        super().__post_init__()
        # wandb stays offline unless the user opts in (WANDB_MODE=online, or `env:` in the recipe).
        if "wandb" in (self.report_to or []):
            os.environ.setdefault("WANDB_MODE", "offline")


def check_range(key, value, low=None, high=None, low_open=False):
    """Fail with one line when a numeric recipe value is of the wrong type or out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise UserError(f"{key} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise UserError(f"{key} must be <= {high}, got {value!r}")


def did_you_mean(word, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.0)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


class RecipeParser(TrlParser):
    """TrlParser whose mistakes come back as one-line `UserError`s naming the recipe and the key."""

    def error(self, message):  # argparse would print usage and exit; say one line instead
        raise UserError(message)

    def parse_recipe(self, argv=None):
        argv = list(sys.argv[1:] if argv is None else argv)
        recipe = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
        where = f"{recipe}: " if recipe else ""
        if recipe and not os.path.isfile(recipe):
            raise UserError(f"recipe file does not exist: {recipe}")
        try:
            *parsed, from_yaml, from_cli = self.parse_args_and_config(
                argv, return_remaining_strings=True, separate_remaining_strings=True)
        except ValueError as err:  # ours, argparse's and TrainingArguments' validation alike
            raise UserError(f"{where}{str(err).strip().splitlines()[0]}") from None
        known = sorted({action.dest for action in self._actions} - {"help", "config"})
        for source, leftovers in ((where, from_yaml), ("command line: ", from_cli)):
            unknown = [s[2:].split("=")[0] for s in leftovers if s.startswith("--")]
            if unknown:
                raise UserError(f"{source}unknown key {unknown[0]!r}" + did_you_mean(unknown[0], known))
            if leftovers:
                raise UserError(f"{source}unexpected argument {leftovers[0]!r}")
        return parsed


def parse_rm_recipe(argv=None) -> tuple[DataConfig, APLOTConfig, ModelConfig]:
    return tuple(RecipeParser((DataConfig, APLOTConfig, ModelConfig)).parse_recipe(argv))
