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
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

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
        "help": "Layout of the rows: explicit, hh, conversational, ratings, multiple_choice, "
                "pairwise_judgment or response_lists (see aplot/data/formats.py)."})
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
    as_chat: bool = field(default=False, metadata={
        "help": "Render string pairs (explicit, multiple_choice, response_lists, the embedded world) as one "
                "user and one assistant turn through the tokenizer's chat template, as chat models and "
                "RewardBench's scorer read them; recorded in the model's config, so every stage scores alike."})
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
    curve_train_pairs: int = field(default=0, metadata={
        "help": "Also score this many training pairs, with the labels trained on, at each eval step "
                "(logged as eval_train_accuracy beside the held-out set's eval_<split>_accuracy): the gap "
                "between the two curves shows over-fitting. 0: the held-out curve alone."})
    # The spoken world (dataset_name: spoken, aplot/data/spoken.py): the world's task asked of a real policy.
    spoken_policy: str = field(default="smollm2-135m-instruct", metadata={
        "help": "Spoken world: the policy whose samples make the pairs (a model preset, directory or hub id)."})
    spoken_backend: str = field(default="vllm", metadata={"help": "Spoken world: 'vllm' or 'transformers'."})
    spoken_samples: int = field(default=8, metadata={"help": "Spoken world: samples per prompt (>= 2)."})
    spoken_temperature: float = field(default=1.0, metadata={"help": "Spoken world: sampling temperature."})
    spoken_top_p: float = field(default=0.95, metadata={"help": "Spoken world: nucleus sampling mass."})
    spoken_max_new_tokens: int = field(default=64, metadata={"help": "Spoken world: longest response in tokens."})
    spoken_seed: int = field(default=0, metadata={"help": "Spoken world: sampling seed (one per prompt from it)."})
    spoken_chunk_prompts: int = field(default=16, metadata={
        "help": "Spoken world: prompts per sampling chunk (what a kill can lose)."})
    spoken_dir: str = field(default="outputs/spoken", metadata={
        "help": "Spoken world: where it is built, one directory per policy and sampling settings."})
    spoken_lineage_dir: str = field(default="outputs/lineage", metadata={
        "help": "Spoken world: where a preset policy is built or imported."})

    def __post_init__(self):
        check_range("n_train", self.n_train, low=1)
        check_range("n_eval", self.n_eval, low=1)
        check_range("curve_eval_pairs", self.curve_eval_pairs, low=1)
        check_range("curve_train_pairs", self.curve_train_pairs, low=0)
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
    ot_embedder: str | None = field(default=None, metadata={
        "help": "A frozen sentence encoder (directory or preset, e.g. minilm-l6) whose mean-pooled, normalised "
                "embeddings of the chosen and rejected responses give the semantic cost instead of the reward "
                "model's own hidden state; unset (the default), the hidden state."})
    ot_scope: str = field(default="global", metadata={
        "help": "'global': one plan over the batch of all ranks; 'local': one plan per rank."})
    resume: bool = field(default=True, metadata={
        "help": "Continue from the newest complete checkpoint in output_dir when there is one; false "
                "starts over and removes the earlier run's checkpoints and results from output_dir."})

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
        # TrainingArguments accepts these at 0 or below and fails mid-run (or trains nothing): say so now
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_range(key, getattr(self, key), low=1)
        if self.max_steps != -1:
            check_range("max_steps", self.max_steps, low=1, hint=" (or -1: num_train_epochs decides)")
        else:
            check_range("num_train_epochs", self.num_train_epochs, low=0, low_open=True)
        for key in ("learning_rate", "warmup_steps", "weight_decay"):
            check_range(key, getattr(self, key), low=0)
        for key in ("logging_steps", "save_steps", "eval_steps", "max_length"):
            if getattr(self, key, None) is not None:
                check_range(key, getattr(self, key), low=0, low_open=True)
        for key, value, choices in (("ot_hidden", self.ot_hidden, ("last_token", "first_token")),
                                    ("ot_scope", self.ot_scope, ("global", "local"))):
            if value not in choices:
                raise UserError(f"{key} {value!r} is not one of {', '.join(choices)}")
        super().__post_init__()
        # wandb stays offline unless the user opts in (WANDB_MODE=online, or `env:` in the recipe).
        if "wandb" in (self.report_to or []):
            os.environ.setdefault("WANDB_MODE", "offline")


@dataclass
class APLOTModelConfig(ModelConfig):
    """TRL's `ModelConfig` plus where a model preset's reward model starts (see `aplot/lineage.py`)."""

    init_from: str = field(default="sft", metadata={
        "help": "For a model preset (recipes/models/<name>/): start from its SFT policy (as from a hub "
                "checkpoint), its base LM, or 'scratch' (fresh weights from its config). A model directory "
                "or hub id starts from its own weights unless this is 'scratch'."})
    lineage_dir: str = field(default="outputs/lineage", metadata={
        "help": "Where a preset's tokenizer, base LM and SFT policy are built once and reused."})

    def __post_init__(self):
        from aplot.lineage import INIT_FROM

        if self.init_from not in INIT_FROM:
            raise UserError(f"init_from {self.init_from!r} is not one of {', '.join(INIT_FROM)}"
                            + did_you_mean(self.init_from, INIT_FROM))
        super().__post_init__()


def check_range(key, value, low=None, high=None, low_open=False, hint=""):
    """Fail with one line when a numeric recipe value is of the wrong type or out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise UserError(f"{key} must be {'>' if low_open else '>='} {low}{hint}, got {value!r}")
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
        if recipe:
            self.check_types(recipe, read_recipe(recipe))
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
        if any(getattr(obj, "hub_token", None) for obj in parsed):
            # Trainer pickles its arguments into every checkpoint's training_args.bin, token included.
            raise UserError(f"{where}hub_token would be saved in training_args.bin of every checkpoint; "
                            "set the HF_TOKEN environment variable instead")
        return parsed

    def check_types(self, recipe: str, config: dict) -> None:
        """YAML values land in the dataclasses as they are (argparse converts strings only): a list
        where a number belongs, or a string where a list does, would fail far from the recipe."""
        for cls in self.dataclass_types:
            hints = typing.get_type_hints(cls)
            for f in fields(cls):
                if f.name in config and _matches(config[f.name], hints.get(f.name)) is False:
                    raise UserError(f"{recipe}: {f.name} must be {_describe(hints[f.name])}, "
                                    f"got {config[f.name]!r}")


def read_recipe(path: str) -> dict:
    """The recipe's YAML mapping, read with the safe loader; every way it can be unreadable is one line."""
    if not os.path.isfile(path):
        raise UserError(f"recipe file does not exist: {path}")
    import yaml

    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8 (byte 0x{data[err.start]:02x})") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        if "constructor for the tag" in problem:  # !!python/object and friends: never executed
            tag = problem.split("tag ")[-1]
            raise UserError(f"{path}: {at}the tag {tag} is not allowed (recipes are plain YAML, read with "
                            "a safe loader)") from None
        raise UserError(f"{path}: not valid YAML ({at}{problem})") from None
    if config is None:
        raise UserError(f"{path}: the recipe is empty")
    if not isinstance(config, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys to values, not a {type(config).__name__}")
    return config


def _matches(value, tp) -> bool | None:
    """Whether a YAML value fits a field's type: True, False, or None when that cannot be told here
    (a string for a number: argparse converts it, or names it in its own message)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is None or tp is typing.Any:
        return None
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, a) for a in args]
        return True if True in results else None if None in results else False
    if tp is type(None):
        return value is None
    if isinstance(value, str) and tp in (int, float, bool):
        return None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list or tp is list:
        if not isinstance(value, list):
            return False
        return False if args and any(_matches(v, args[0]) is False for v in value) else True
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return False
        return False if args and any(_matches(v, args[1]) is False for v in value.values()) else True
    return None


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if origin is list or tp is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s" if args and args[0] in (int, float, str) \
            else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


# What a training run's result depends on: resuming a checkpoint made with other values is refused
# (eval sets, logging and the like may change between a run and its resumption).
RUN_DATA_KEYS = ("dataset_name", "dataset_config", "dataset_format", "dataset_columns", "dataset_train_split",
                 "max_train_pairs", "strict", "as_chat", "tokenizer_name_or_path", "world_seed", "n_train",
                 "hard_fraction",
                 "label_noise")
RUN_TRAINING_KEYS = ("loss_type", "gamma", "epsilon", "sinkhorn_iters", "margin_scale", "margin_value",
                     "label_smoothing", "ot_hidden", "ot_scope", "learning_rate", "lr_scheduler_type",
                     "warmup_steps", "weight_decay", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "num_train_epochs", "max_steps", "seed", "max_length", "center_rewards_coefficient")


SPOKEN_KEYS = ("spoken_policy", "spoken_backend", "spoken_samples", "spoken_temperature", "spoken_top_p",
               "spoken_max_new_tokens", "spoken_seed")


def run_settings(data_cfg, args, model_cfg) -> dict:
    return {**{k: getattr(data_cfg, k) for k in RUN_DATA_KEYS},
            **{k: getattr(args, k, None) for k in RUN_TRAINING_KEYS},
            "model_name_or_path": model_cfg.model_name_or_path, "init_from": model_cfg.init_from,
            "use_peft": model_cfg.use_peft,
            # only when in use, so the settings of runs made before these keys existed stay valid
            **({k: getattr(data_cfg, k) for k in SPOKEN_KEYS} if data_cfg.dataset_name == "spoken" else {}),
            **({"ot_embedder": args.ot_embedder} if getattr(args, "ot_embedder", None) else {}),
            "processes": args.world_size}


def parse_rm_recipe(argv=None) -> tuple[DataConfig, APLOTConfig, APLOTModelConfig]:
    return tuple(RecipeParser((DataConfig, APLOTConfig, APLOTModelConfig)).parse_recipe(argv))
