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
from aplot.safe_yaml import read_recipe, yaml_repr


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
    spoken_pairs_per_prompt: int = field(default=1, metadata={
        "help": "Spoken world: pairs drawn from each prompt's samples, no sample in two (pairs only: the samples "
                "and their cache do not depend on it)."})
    spoken_chunk_prompts: int = field(default=16, metadata={
        "help": "Spoken world: prompts per sampling chunk (what a kill can lose)."})
    spoken_dir: str = field(default="outputs/spoken", metadata={
        "help": "Spoken world: where it is built, one directory per policy and sampling settings."})
    spoken_lineage_dir: str = field(default="outputs/lineage", metadata={
        "help": "Spoken world: where a preset policy is built or imported."})

    def __post_init__(self):
        check_range("n_train", self.n_train, low=1, high=MAX_PAIRS)
        check_range("n_eval", self.n_eval, low=1, high=MAX_PAIRS)
        check_range("curve_eval_pairs", self.curve_eval_pairs, low=1, high=MAX_PAIRS)
        check_range("curve_train_pairs", self.curve_train_pairs, low=0, high=MAX_PAIRS)
        check_range("hard_fraction", self.hard_fraction, 0.0, 1.0)
        check_range("label_noise", self.label_noise, 0.0, 1.0)
        check_range("world_seed", self.world_seed, low=0, high=MAX_SEED)
        for key in ("dataset_name", "dataset_train_split"):
            if not getattr(self, key):
                raise UserError(f"{key} is empty")
        if self.max_train_pairs is not None:
            check_range("max_train_pairs", self.max_train_pairs, low=1)
        from aplot.data.formats import FORMATS

        if self.dataset_format not in FORMATS:
            raise UserError(f"dataset_format {self.dataset_format!r} is not one of {', '.join(FORMATS)}"
                            + did_you_mean(self.dataset_format, FORMATS))
        check_eval_sets(self.eval_splits, self.eval_datasets, FORMATS)

    def eval_sources(self) -> dict[str, dict]:
        """Every eval set by name: the dataset's own `eval_splits`, then `eval_datasets`."""
        own = {"path": self.dataset_name, "config": self.dataset_config, "format": self.dataset_format,
               "columns": self.dataset_columns}
        sources = {split: {**own, "split": split} for split in self.eval_splits}
        for spec in self.eval_datasets or []:
            sources[spec["name"]] = {"format": "explicit", "config": None, "split": "train", "columns": None, **spec}
        return sources


# Upper bounds on the keys that size work: far above any real run, low enough that a typo (2**40 samples)
# is refused before work instead of failing to allocate terabytes after hours.
MAX_PAIRS = 10**7  # pairs, prompts, responses
MAX_TOKENS = 1 << 20  # a sequence: the longest context of any current model
MAX_BATCH = 1 << 16  # sequences in one batch; samples per prompt
MAX_ITERS = 100_000  # Sinkhorn iterations, PPO epochs
MAX_STEPS = 10**9  # optimizer steps, episodes
MAX_WORKERS = 256  # data-loading processes
MAX_SEED = 2**32 - 1  # what numpy's seeding accepts
EVAL_SPEC_KEYS = {"name": str, "path": str, "format": str, "config": str, "split": str, "columns": dict}
# Names metrics.json gives its own entries beside the eval sets' (`data.train`: the training counts).
RESERVED_EVAL_NAMES = ("train",)


def check_eval_sets(eval_splits: list, eval_datasets: list | None, formats) -> None:
    """Every eval set is named once: a name given twice, or an eval_datasets entry named like one of the
    dataset's own eval_splits, would silently replace the other set in every table."""
    seen = {}
    for split in eval_splits:
        if split in seen:
            raise UserError(f"eval_splits: {split!r} is listed twice")
        if split in RESERVED_EVAL_NAMES:
            raise UserError(f"eval_splits: the name {split!r} is taken by the training data's counts in "
                            "metrics.json; evaluate on a held-out split")
        seen[split] = "eval_splits"
    if eval_datasets is not None and not isinstance(eval_datasets, list):
        raise UserError(f"eval_datasets must be a list of {{name, path, ...}} mappings, got {eval_datasets!r}")
    for i, spec in enumerate(eval_datasets or []):
        if not isinstance(spec, dict) or not {"name", "path"} <= spec.keys():
            raise UserError(f"eval_datasets[{i}] needs at least a name and a path, got {spec!r}")
        unknown = set(spec) - set(EVAL_SPEC_KEYS)
        if unknown:
            raise UserError(f"eval_datasets[{i}]: unknown key {sorted(unknown)[0]!r}"
                            + did_you_mean(sorted(unknown)[0], EVAL_SPEC_KEYS))
        for key, kind in EVAL_SPEC_KEYS.items():
            value = spec.get(key)
            if value is not None and not isinstance(value, kind) or key in ("name", "path") and not value:
                what = "a mapping of column names ({prompt: question, ...})" if kind is dict else "a non-empty string"
                raise UserError(f"eval_datasets[{i}]: {key} must be {what}, got {yaml_repr(value)}")
        for column, renamed in (spec.get("columns") or {}).items():
            if not isinstance(column, str) or not isinstance(renamed, str):
                raise UserError(f"eval_datasets[{i}]: columns maps column names to column names, got "
                                f"{yaml_repr(column)}: {yaml_repr(renamed)}")
        if spec.get("format", "explicit") not in formats:
            raise UserError(f"eval_datasets[{i}]: format {spec['format']!r} is not one of {', '.join(formats)}")
        name = spec["name"]
        if name in RESERVED_EVAL_NAMES:
            raise UserError(f"eval_datasets[{i}]: the name {name!r} is taken by the training data's counts in "
                            "metrics.json; choose another")
        if name in seen:
            where = ("one of eval_splits, the dataset's own split it would replace" if seen[name] == "eval_splits"
                     else f"also the name of {seen[name]}")
            raise UserError(f"eval_datasets[{i}]: name {name!r} is {where}; give each eval set its own name")
        seen[name] = f"eval_datasets[{i}]"


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
                "starts over (aside: the earlier run in output_dir is replaced once this one has finished)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_dir that holds files no aplot run made (files of the same names are "
                "replaced, the others kept); off, such a directory is refused."})

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"loss_type {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}"
                            + did_you_mean(self.loss_type, LOSS_TYPES))
        check_range("gamma", self.gamma, 0.0, 1.0)
        check_range("epsilon", self.epsilon, low=0.0, low_open=True)
        check_range("sinkhorn_iters", self.sinkhorn_iters, low=1, high=MAX_ITERS)
        check_range("margin_scale", self.margin_scale)
        check_range("label_smoothing", self.label_smoothing, 0.0, 0.5)
        if self.margin_value is not None:
            check_range("margin_value", self.margin_value)
        # TrainingArguments accepts these at 0 or below and fails mid-run (or trains nothing): say so now
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_range(key, getattr(self, key), low=1, high=MAX_BATCH)
        if self.max_steps != -1:
            check_range("max_steps", self.max_steps, low=1, high=MAX_STEPS, hint=" (or -1: num_train_epochs decides)")
        else:
            check_range("num_train_epochs", self.num_train_epochs, low=0, high=MAX_ITERS, low_open=True)
        for key in ("learning_rate", "warmup_steps", "weight_decay"):
            check_range(key, getattr(self, key), low=0)
        check_range("seed", self.seed, low=0, high=MAX_SEED)
        check_range("dataloader_num_workers", self.dataloader_num_workers, low=0, high=MAX_WORKERS)
        for key in ("logging_steps", "save_steps", "eval_steps"):
            if getattr(self, key, None) is not None:
                check_range(key, getattr(self, key), low=0, low_open=True)
        if self.max_length is not None:
            check_range("max_length", self.max_length, low=0, high=MAX_TOKENS, low_open=True)
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
        check_dtype(self.dtype)
        super().__post_init__()


def check_model_source(path: str | None, what: str, trust_remote_code: bool = False, init_from: str = "sft") -> None:
    """Where a stage's model comes from, checked before any work (make plan asks the same): a model
    preset's own files (its preset.yaml read as strictly as a recipe), or a model directory under the one
    loading policy (`aplot.reward_model.check_weights`; no weights there is refused unless init_from:
    scratch asks for fresh ones)."""
    from aplot import checkpoints, lineage
    from aplot.reward_model import check_path, check_weights, read_json

    if not path:
        raise UserError("model_name_or_path is not set: name a model directory, hub id or config directory")
    path = lineage.EMBEDDED if what == "policy" and path == "embedded" else path
    check_path(path, what)
    path = lineage.preset_dir(path)  # a bare preset name is its folder under recipes/models/
    if checkpoints.is_imported(path):
        checkpoints.load_source(path)  # a real checkpoint's preset: its pinned source, read strictly
    elif lineage.is_preset(path):
        preset = lineage.load_preset(path)
        if read_json(Path(path) / "config.json").get("auto_map"):
            raise UserError(f"{Path(path) / 'config.json'}: names code to import (auto_map); a preset is data: "
                            "an architecture transformers knows")
        # what sizes the lineage's work: its tokenizer, its training sets and batches
        for stage, key, high in (("tokenizer", "vocab_size", MAX_TOKENS), ("base", "documents", MAX_PAIRS),
                                 ("sft", "examples", MAX_PAIRS), ("base", "max_length", MAX_TOKENS),
                                 ("sft", "max_length", MAX_TOKENS), ("base", "per_device_train_batch_size", MAX_BATCH),
                                 ("sft", "per_device_train_batch_size", MAX_BATCH),
                                 ("base", "num_train_epochs", MAX_ITERS), ("sft", "num_train_epochs", MAX_ITERS)):
            if key in getattr(preset, stage):
                try:
                    check_range(key, getattr(preset, stage)[key], low=1, high=high)
                except UserError as err:
                    raise UserError(f"{Path(path) / lineage.PRESET_FILE}: {stage}: {err}") from None
    else:
        check_weights(path, what, trust_remote_code, fresh=init_from == "scratch")


def check_range(key, value, low=None, high=None, low_open=False, hint=""):
    """Fail with one line when a numeric recipe value is of the wrong type or out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise UserError(f"{key} must be {'>' if low_open else '>='} {low}{hint}, got {value!r}")
    if high is not None and value > high:
        raise UserError(f"{key} must be <= {high}, got {value!r}")


DTYPES = ("auto", "bfloat16", "float16", "float32")


def check_dtype(value, key: str = "dtype") -> None:
    """The dtypes a model is loaded in (TRL's ModelConfig offers the same)."""
    if value is not None and value not in DTYPES:
        raise UserError(f"{key} must be one of {', '.join(DTYPES)}, got {yaml_repr(value)}"
                        + (did_you_mean(value, DTYPES) if isinstance(value, str) else ""))


def did_you_mean(word, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.0)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


class RecipeParser(TrlParser):
    """TrlParser whose mistakes come back as one-line `UserError`s naming the recipe and the key."""

    def error(self, message):  # argparse would print usage and exit; say one line instead
        raise UserError(message)

    def parse_recipe(self, argv=None):
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv.count("--config") > 1:
            raise UserError("command line: --config is given twice (one recipe a run)")
        if "--config" in argv and (argv.index("--config") == len(argv) - 1
                                   or argv[argv.index("--config") + 1].startswith("--")):
            raise UserError("command line: --config needs a recipe file after it")
        recipe = argv[argv.index("--config") + 1] if "--config" in argv else None
        self.where = where = f"{recipe}: " if recipe else ""
        config = read_recipe(recipe) if recipe else {}
        if recipe:
            self.check_types(recipe, config)
        deepspeed = argv[argv.index("--deepspeed") + 1] if "--deepspeed" in argv[:-1] else config.get("deepspeed")
        if isinstance(deepspeed, str) and deepspeed.strip() and not deepspeed.lstrip().startswith("{"):
            # TrainingArguments reads it while the recipe is parsed, and names neither the key nor the fault
            from aplot.reward_model import read_json

            read_json(Path(deepspeed), f"deepspeed config does not exist: {deepspeed}")
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
                if f.name not in config:
                    continue
                value, tp = config[f.name], hints.get(f.name)
                if isinstance(value, bool) and not _admits(tp, bool):
                    # unquoted no/off/yes/on are YAML booleans: `eval_strategy: no` reads as false
                    raise UserError(f"{recipe}: {f.name} must be {_describe(tp)}, got {yaml_repr(value)} (YAML reads "
                                    "unquoted yes, no, on and off as true or false: quote the word)")
                if _matches(value, tp) is False:
                    raise UserError(f"{recipe}: {f.name} must be {_describe(tp)}, got {yaml_repr(value)}")
                choices = f.metadata.get("choices") or _enum_values(tp)
                if choices and isinstance(value, str) and value not in choices:
                    raise UserError(f"{recipe}: {f.name} must be one of {', '.join(map(str, choices))}, got "
                                    f"{value!r}" + did_you_mean(value, choices))


def _union_args(tp) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _admits(tp, kind) -> bool:
    """Whether a field of type `tp` may hold a value of `kind` (a field of unknown type may)."""
    return tp is None or any(a is typing.Any or a is kind for a in _union_args(tp))


def _enum_values(tp) -> list[str] | None:
    """The values of an Enum among a field's types (TrainingArguments' strategies, schedulers, ...)."""
    import enum

    for a in _union_args(tp):
        if isinstance(a, type) and issubclass(a, enum.Enum):
            return [m.value for m in a]
    return None


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
    if _enum_values(tp):
        return f"one of {', '.join(map(str, _enum_values(tp)))}"
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
            **({"spoken_pairs_per_prompt": data_cfg.spoken_pairs_per_prompt}
               if data_cfg.dataset_name == "spoken" and data_cfg.spoken_pairs_per_prompt != 1 else {}),
            **({"ot_embedder": args.ot_embedder} if getattr(args, "ot_embedder", None) else {}),
            "processes": args.world_size}


def parse_rm_recipe(argv=None) -> tuple[DataConfig, APLOTConfig, APLOTModelConfig]:
    parser = RecipeParser((DataConfig, APLOTConfig, APLOTModelConfig))
    data_cfg, args, model_cfg = parser.parse_recipe(argv)
    if args.eval_strategy != "no" and not data_cfg.eval_sources():
        # TrainingArguments accepts it; the Trainer would refuse it with a traceback once the model is built
        raise UserError(f"{parser.where}eval_strategy is {str(args.eval_strategy.value)!r} but there is no eval set "
                        "(eval_splits is empty, no eval_datasets): name one, or set eval_strategy: 'no'")
    return data_cfg, args, model_cfg
