"""The shared reward-model module: build or load a reward model, read the hidden state its score
head reads, and score (prompt, response) pairs in length-sorted batches. Used by every stage."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    dynamic_module_utils,
)
from trl.data_utils import _tokenize

from aplot.errors import UserError

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
# Pickles: loading one can run code (torch's restricted unpickler is all that would stand in the way).
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin", "model.pt", "model.pth")
WEIGHT_FILES = SAFE_WEIGHTS + PICKLE_WEIGHTS
HEAD_NAMES = ("score", "classifier", "v_head")
# Any one of these makes a directory's tokenizer loadable; without them AutoTokenizer would build an
# empty one from config.json and every text would encode to nothing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
# Never wait on stdin: a load that reaches custom code without trust_remote_code said fails instead of
# asking "Do you wish to run the custom code? [y/N]" (every call here says it; this is the backstop).
dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0
_ANNOUNCED: set[str] = set()


def has_weights(path: str) -> bool:
    return any((Path(path) / name).exists() for name in WEIGHT_FILES)


def check_tokenizer_files(path: str) -> None:
    if Path(path).is_dir() and not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
        raise UserError(f"{path}: no tokenizer in this directory (no tokenizer.json or tokenizer_config.json)")


def check_weights(path: str, what: str = "model", trust_remote_code: bool = False, fresh: bool = False) -> None:
    """The one loading policy, asked by every loader (rm, eval, Best-of-N, PPO, resumed checkpoints): a
    model directory loads only from complete safetensors weights (a pickle can run code), and only runs
    code of its own when `trust_remote_code` says so, which is then announced in one line. `fresh`: the
    weights are not read (init_from: scratch), only the config. A hub id is checked as it loads."""
    check_path(path, what)
    root = Path(path)
    if not root.is_dir():
        if root.exists():
            raise UserError(f"{what} path is a file, not a model directory: {path}")
        return
    if not fresh:
        safe = [name for name in SAFE_WEIGHTS if (root / name).exists()]
        if safe:
            for file in _safetensors_files(root, safe[0]):
                check_safetensors_file(file)
        else:
            pickled = next((name for name in PICKLE_WEIGHTS if (root / name).exists()), None)
            if pickled:
                raise UserError(f"{path}: weights only as {pickled}, a pickle, which is not loaded (loading one can "
                                "run code): save them as safetensors")
            hint = "; init_from: scratch builds fresh weights from its config.json" if what == "model" else ""
            raise UserError(f"{path}: no model weights (model.safetensors) in this directory{hint}")
    if what == "checkpoint":
        check_checkpoint_states(root)
    # a PEFT checkpoint holds its adapter and the adapter's config only
    config_file = root / ("adapter_config.json" if (root / "adapter_model.safetensors").exists()
                          and not (root / "config.json").exists() else "config.json")
    configs = [read_json(config_file, f"{path}: no config.json in this directory"),
               read_json(root / "tokenizer_config.json")]
    # `auto_map` names the classes transformers would import from the directory's own .py files
    code = [v for config in configs for value in (config.get("auto_map") or {},)
            for v in (value.values() if isinstance(value, dict) else [value])]
    if code:
        modules = sorted({str(v).split(".")[0] + ".py" for value in code
                          for v in (value if isinstance(value, list) else [value]) if v})
        if not trust_remote_code:
            raise UserError(f"{path}: its config names code of its own ({', '.join(modules)}) that loading would "
                            "run; set trust_remote_code: true to allow it")
        if str(root.resolve()) not in _ANNOUNCED:
            _ANNOUNCED.add(str(root.resolve()))
            print(f"trust_remote_code: code from {path} will run ({', '.join(modules)})")


def check_checkpoint_states(checkpoint: Path) -> None:
    """A training checkpoint's optimizer, scheduler and RNG states are pickles (the Trainer's format): each
    is read as the Trainer will read it, by torch's restricted unpickler (tensors, plain values and numpy's
    arrays), its tensors memory-mapped rather than read, so a file that holds anything else, or is cut
    short, is named now rather than met as a traceback once the model is built."""
    import pickle

    from transformers.trainer_pt_utils import safe_globals

    for file in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        try:
            with safe_globals():
                try:
                    torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise
                    torch.load(file, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
        except pickle.UnpicklingError:
            raise UserError(f"{file}: holds objects other than tensors and plain values, which loading could run "
                            "as code, so it is not loaded: resume from another checkpoint, or resume: false") from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{file}: cannot be read ({reason}): the checkpoint looks damaged") from None


def model_names(paths: list[str], reserved: tuple[str, ...] = ()) -> dict[str, str]:
    """A distinct name for each model path, for tables and caches: its directory's name, or as many of its
    last path components as tell it from the others (`a/rm` and `b/rm`), never one of `reserved`."""
    seen = {}
    for path in paths:
        key = os.path.abspath(path)
        if key in seen:
            raise UserError(f"reward_models: {path} is listed twice" + (f" (as {seen[key]})" if seen[key] != path
                                                                       else ""))
        seen[key] = path
    parts = {path: Path(os.path.abspath(path)).parts[1:] or (path,) for path in paths}
    names = {}
    for path in paths:
        for k in range(1, len(parts[path]) + 1):
            name = "/".join(parts[path][-k:])
            if name not in reserved and all(name != "/".join(parts[o][-k:]) for o in paths if o != path):
                break
        names[name] = path
    return names


def read_json(file: Path, missing: str | None = None) -> dict:
    """A JSON object from a model directory's file, or one line saying why it cannot be read."""
    if not file.is_file():
        if missing:
            raise UserError(missing)
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{file}: cannot be read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{file}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{file}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except RecursionError:
        raise UserError(f"{file}: nested too deeply to be a model's configuration") from None
    if not isinstance(value, dict):
        raise UserError(f"{file}: a JSON object is expected, got a {type(value).__name__}")
    return value


def _safetensors_files(root: Path, name: str) -> list[Path]:
    if not name.endswith(".index.json"):
        return [root / name]
    weight_map = read_json(root / name).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{root / name}: no weight_map of tensor names to files")
    files = [root / shard for shard in sorted(set(map(str, weight_map.values())))]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise UserError(f"{root / name}: lists {missing.name}, which is not in the directory")
    return files


def check_safetensors_file(file: Path) -> None:
    """A safetensors file is whole: its header parses and every tensor it lists lies inside the file (read
    from the header alone, so a file cut short by a killed copy is named, not met mid-load)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        header = f.read(length) if length is not None and length <= size - 8 else None
    try:
        tensors = json.loads(header) if header is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        tensors = None
    if not isinstance(tensors, dict):
        raise UserError(f"{file}: not a readable safetensors file ({size:,} bytes; its header does not parse): the "
                        "file looks truncated or is another format")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in tensors.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{file}: not a readable safetensors file (a tensor without data_offsets)") from None
    if 8 + length + end > size:
        raise UserError(f"{file}: truncated ({size:,} bytes, its header lists {8 + length + end:,}): copy or save "
                        "it again")


def checkpoint_keys(path: str) -> list[str] | None:
    """The tensor names of a directory's safetensors weights, read from the header only (None when
    the weights are not safetensors)."""
    index, single = Path(path) / "model.safetensors.index.json", Path(path) / "model.safetensors"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return list(f.keys())
    return None


def check_reward_model(path: str, trust_remote_code: bool = False) -> None:
    """What `load_reward_model` refuses, found without loading the weights, for stages that would
    otherwise load a model only after hours of other work (Best-of-N scores after sampling)."""
    check_weights(path, "reward model", trust_remote_code)
    if not Path(path).is_dir():
        return  # a hub id: checked when it is loaded
    check_tokenizer_files(path)
    keys = checkpoint_keys(path)
    if keys is not None and not any(part in HEAD_NAMES for key in keys for part in key.split(".")[:-1]):
        raise UserError(f"{path}: no trained score head in model.safetensors (no {', '.join(HEAD_NAMES)} "
                        "weights): a language model, not a reward model")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    if path == "embedded":
        from aplot.data.world import build_tokenizer

        return build_tokenizer()
    check_path(path, "tokenizer")
    check_tokenizer_files(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: no usable tokenizer there ({str(err).splitlines()[0]})") from None


def check_path(path: str, what: str) -> None:
    """A path that is not a hub id (`owner/name`) or a model preset's name must exist here: name it when it
    does not."""
    from aplot.lineage import preset_dir

    if Path(path).expanduser().exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith("."):
        return
    if preset_dir(path) != path:  # a bare preset name (recipes/models/<name>)
        return
    raise UserError(f"{what} path does not exist: {path}")


def build_reward_model(path: str, tokenizer, dtype: str | None = None, trust_remote_code: bool = False,
                       require_head: bool = False, fresh: bool = False) -> PreTrainedModel:
    """A sequence-classification model with one output: the pretrained weights in `path` (a causal
    LM's get a new score head; a directory without weights is refused), or, when `fresh`, initialised
    from the `config.json` there. Weights are read from safetensors only (a pickle can run code).
    `require_head`: the weights must hold a trained score head (a reward model, not a base language
    model given a fresh head)."""
    check_weights(path, "model", trust_remote_code, fresh=fresh)
    # safetensors only: a pytorch_model.bin is a pickle, and loading one can run code
    kwargs = {"num_labels": 1, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, dtype)
    if fresh:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        config.num_labels = 1
        # A config may have more embedding rows than the tokenizer has tokens (Qwen2.5: 151,936 for
        # 151,665): keep them, as a checkpoint would; only a smaller one grows to fit every token.
        config.vocab_size = max(config.vocab_size or 0, len(tokenizer))
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        model = AutoModelForSequenceClassification.from_config(config, dtype=kwargs.get("dtype"),
                                                               trust_remote_code=trust_remote_code)
    else:
        try:
            with quiet_load_report():
                model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True,
                                                                                 **kwargs)
        except (OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{path}: cannot be loaded as a sequence-classification model with safetensors "
                            f"weights ({reason})") from None
        missing = sorted(k for k in info["missing_keys"] if any(p in HEAD_NAMES for p in k.split(".")[:-1]))
        if require_head and missing:
            raise UserError(f"{path}: no trained score head in the weights ({missing[0]} is missing): a language "
                            "model, not a reward model")
        if report := load_report(path, model, info):
            print(report)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


class quiet_load_report:
    """Silences transformers' per-key load report (a table of UNEXPECTED and MISSING keys that every
    causal LM given a score head prints) while `load_report` says the same in one line."""

    def __enter__(self):
        from transformers.utils import logging

        # A filter, not a level: transformers runs an extra tensor-parallel check (with its own
        # warnings) when this logger's level is WARNING or above.
        self.logger = logging.get_logger("transformers.modeling_utils")
        self.logger.addFilter(self.drop)

    @staticmethod
    def drop(record) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    def __exit__(self, *exc):
        self.logger.removeFilter(self.drop)


def load_report(path: str, model, info: dict) -> str | None:
    """One line on how a checkpoint became this reward model: which head is new, which of the
    checkpoint's weights were not used (a causal LM's `lm_head`), and any other weight left fresh."""
    head = [k for k in info["missing_keys"] if any(p in HEAD_NAMES for p in k.split(".")[:-1])]
    fresh = sorted(set(info["missing_keys"]) - set(head))
    unused = sorted({k.split(".")[0] for k in info["unexpected_keys"]})
    if not head and not fresh and not unused:
        return None  # a reward model loaded whole: nothing to say
    words = [f"new score head on {path} ({type(model).__name__}, {', '.join(sorted(head))} initialised)"
             if head else f"reward model {path} ({type(model).__name__})"]
    if unused:
        words.append(f"not used: {', '.join(unused)}")
    if fresh:
        words.append(f"also initialised: {', '.join(fresh[:3])}{' ...' if len(fresh) > 3 else ''}")
    return "; ".join(words)


def load_reward_model(path: str, device: str | None = None, dtype: str | None = None,
                      trust_remote_code: bool = False):
    """A trained reward model and its tokenizer from a directory (a `make rm` output) or hub name."""
    check_reward_model(path, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    model = build_reward_model(path, tokenizer, dtype, trust_remote_code, require_head=True)
    score_head(model)  # fail now, not at the first batch, when there is no head to read
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, tokenizer


def score_head(model) -> torch.nn.Module:
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise UserError(f"{type(model).__name__} has no score head (looked for {', '.join(HEAD_NAMES)})")


class ScoreInputCapture:
    """Keeps a reference to the tensor the score head reads on each forward, so APLOT gets its
    hidden states from the same forward pass that produced the rewards (no second pass)."""

    def __init__(self, model):
        self.hidden = None
        self.handle = score_head(model).register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        self.hidden = args[0]

    def pooled(self, input_ids, pad_token_id, position="last_token"):
        """The per-sequence state the head scores: the last non-pad token (decoder models, the
        same rule transformers uses to pool the logits) or the first token (encoder models)."""
        hidden = self.hidden
        if hidden.dim() == 2:  # the model pooled before its head (e.g. BERT-style poolers)
            return hidden
        if position == "first_token":
            return hidden[:, 0]
        if pad_token_id is None:
            return hidden[:, -1]
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        last = (positions * (input_ids != pad_token_id)).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]

    def remove(self):
        self.handle.remove()


def truncate(ids: list[int], max_length: int | None, keep_first: int | None = None) -> list[int]:
    """Keep the last `max_length` tokens: a decoder's score head reads the end of the sequence. An
    encoder's sequence keeps its leading `keep_first` token (BERT's [CLS], which its head reads)."""
    if not max_length or len(ids) <= max_length:
        return ids
    if keep_first is not None and ids[0] == keep_first:
        return ids[:1] + ids[len(ids) - max_length + 1:]
    return ids[-max_length:]


def tokenize_pairs(dataset, tokenizer, max_length: int | None, chat: bool = False):
    """`chosen_ids`/`rejected_ids` for TRL's RewardTrainer, encoded exactly as the scorer encodes and
    truncated rather than dropped; returns the dataset and how many pairs were truncated."""
    scorer = RewardScorer(None, tokenizer, max_length=max_length, chat=chat)
    prompts = dataset["prompt"] if "prompt" in dataset.column_names else [None] * len(dataset)
    chosen = scorer.encode_all(prompts, dataset["chosen"])
    rejected = scorer.encode_all(prompts, dataset["rejected"])
    limit = max_length or float("inf")
    long = sum(max(len(c), len(r)) > limit for c, r in zip(chosen, rejected))
    cls = tokenizer.cls_token_id
    dataset = dataset.add_column("chosen_ids", [truncate(x, max_length, cls) for x in chosen])
    return dataset.add_column("rejected_ids", [truncate(x, max_length, cls) for x in rejected]), long


def reward_stats(model) -> dict | None:
    """The reward statistics in a model's config.json: `reward_stats` (what `make rm` writes: mean, std, and
    the eval set and pairs they come from), else the top-level `mean` and `std` an OpenRLHF-trained reward
    model carries (its RewardModelTrainer's evaluation writes them), or None for a directory without either."""
    config = getattr(model, "config", None)
    stats = getattr(config, "reward_stats", None)
    if isinstance(stats, dict) and {"mean", "std"} <= stats.keys():
        return stats
    if hasattr(config, "mean") and hasattr(config, "std"):
        return {"mean": config.mean, "std": config.std}
    return None


def normalization(model) -> tuple[float, float]:
    """(mean, std) for `normalize_rewards: true`; a model without usable stats is a one-line error."""
    stats, path = reward_stats(model), getattr(model.config, "_name_or_path", "the reward model")
    if stats is None:
        raise UserError(f"{path}: normalize_rewards is on but its config.json has no reward_stats (saved before "
                        "they were recorded): retrain it with make rm, or set normalize_rewards: false")
    mean, std = stats["mean"], stats["std"]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mean, std)) or std <= 0:
        raise UserError(f"{path}: reward_stats in config.json need a finite mean and a positive std, got "
                        f"mean {mean!r}, std {std!r}")
    return float(mean), float(std)


def check_reward_stats(path: str) -> None:
    """What `normalization` refuses, read from a directory's config.json without loading the model."""
    from types import SimpleNamespace

    config = Path(path) / "config.json"
    if config.is_file():
        values = read_json(config)
        normalization(SimpleNamespace(config=SimpleNamespace(_name_or_path=path, **{
            k: v for k, v in values.items() if k in ("reward_stats", "mean", "std")})))


def engine_config(model, stats: dict | None) -> dict:
    """The config.json fields other engines read from a reward-model directory, for `make rm` to save.

    OpenRLHF (openrlhf/models/model.py: `get_llm_for_sequence_regression`, `_get_reward_model`) puts a
    bias-free `nn.Linear(hidden_size, 1)` named by the config's `value_head_prefix` on the base model, loads
    its weight from `<prefix>.weight`, reads the last attended token and, asked to normalise, returns
    `(r - mean) / std` from the config's `mean` and `std`; its train_rm saves those and `normalize_reward`
    (which the loader then sets from its flag). verl's reward-model worker (verl/workers/fsdp_workers.py:
    `RewardModelWorker._build_model`) loads the directory as `AutoModelForTokenClassification` with one
    label, a head transformers builds with a bias unless `token_classification_bias` is false. Only a head
    both read as trained (one output, no bias: a decoder's `score`) gets the fields; an encoder's
    classifier (a bias, a pooler) would be read wrongly by both, so it gets none."""
    name = next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)), None)
    head = getattr(model, name) if name else None
    if not (isinstance(head, torch.nn.Linear) and head.out_features == 1 and head.bias is None):
        return {}
    fields = {"value_head_prefix": name, "normalize_reward": False, "token_classification_bias": False}
    if stats and stats["std"] > 0:  # what `normalization` accepts: OpenRLHF would divide by it unchecked
        fields.update(mean=stats["mean"], std=stats["std"])
    return fields


# The config.json key recording that a reward model was trained on string pairs rendered as chat turns.
CHAT_KEY = "aplot_as_chat"


class RewardScorer:
    """Scores (prompt, response) texts with a reward model, in length-sorted batches.

    Texts are encoded exactly as the trainer encodes them (TRL's tokenize step: `prompt + response
    + eos`, or the chat template for conversational data), truncated to the last `max_length`
    tokens, and sorted by length so each batch pads little. `normalize=True` returns
    `(r - mean) / std` with the stats `make rm` recorded in the model's config.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, max_length: int | None = None,
                 normalize: bool = False, chat: bool | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        # String pairs as one user and one assistant turn, through the chat template: how a model trained
        # with `as_chat` (recorded in its config) reads every text, in every stage.
        self.chat = chat if chat is not None else bool(getattr(getattr(model, "config", None), CHAT_KEY, False))
        self.normalization = normalization(model) if normalize else None

    def encode(self, prompt, response) -> list[int]:
        return self.encode_all([prompt], [response])[0]

    def encode_all(self, prompts, responses) -> list[list[int]]:
        if self.chat and all(isinstance(r, str) for r in responses):
            prompts = [[{"role": "user", "content": p}] if p else [] for p in prompts]
            responses = [[{"role": "assistant", "content": r}] for r in responses]
        if all(isinstance(r, str) for r in responses):
            # Standard data: `prompt + response + eos` in one batched call (the fast tokenizer
            # runs it in Rust), the same ids TRL's per-row tokenize step gives.
            eos = self.tokenizer.eos_token or ""
            texts = [(p or "") + r for p, r in zip(prompts, responses)]
            return self.tokenizer([t if t.endswith(eos) else t + eos for t in texts])["input_ids"] if texts else []
        # Conversational: lists of messages through the tokenizer's chat template.
        return [_tokenize(self.tokenizer, list(p or []) + r)["input_ids"] for p, r in zip(prompts, responses)]

    def score(self, prompts, responses, return_hidden=False, progress=False, desc="scoring"):
        return self.score_ids(self.encode_all(prompts, responses), return_hidden, progress, desc)

    @torch.no_grad()
    def score_ids(self, ids, return_hidden=False, progress=False, desc="scoring"):
        """Rewards of encoded sequences (and the hidden states the score head read, if asked)."""
        ids = [truncate(x, self.max_length, self.tokenizer.cls_token_id) for x in ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        device = next(self.model.parameters()).device
        rewards = torch.empty(len(ids))
        hidden = None
        capture = ScoreInputCapture(self.model) if return_hidden else None
        pad = self.tokenizer.pad_token_id
        try:
            starts = range(0, len(order), self.batch_size)
            for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
                batch = order[start:start + self.batch_size]
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros_like(input_ids)
                for row, i in enumerate(batch):
                    input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                    mask[row, :len(ids[i])] = 1
                input_ids, mask = input_ids.to(device), mask.to(device)
                out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
                rewards[batch] = out.logits[:, 0].float().cpu()
                if capture is not None:
                    h = capture.pooled(input_ids, self.model.config.pad_token_id).float().cpu()
                    if hidden is None:
                        hidden = torch.empty(len(ids), h.shape[-1])
                    hidden[batch] = h
        finally:
            if capture is not None:
                capture.remove()
        if self.normalization is not None:
            mean, std = self.normalization
            rewards = (rewards - mean) / std
        return (rewards, hidden) if return_hidden else rewards
