"""The models of a planned job, from their config files alone: each built on the meta device for its parameter
count and largest layer, and the models a recipe names resolved as its stage would load them (a preset's
lineage, a trained directory, a hub id, or a reward model not trained yet, from the rm recipe that writes it)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from aplot.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
HUB_CONFIGS = ROOT / "recipes" / "models" / "hub"
RM_RECIPES = ROOT / "recipes" / "rm"
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


@dataclass
class ModelShape:
    """One model of the job, as far as its config file tells: what the recipe names, where the config
    was read, its parameter count and largest layer (DeepSpeed's notion: one module's own parameters)."""

    role: str
    name: str
    source: str
    config: object
    params: int
    largest_layer: int
    dtype: str

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def is_hub_id(name: str) -> bool:
    """A hub id (`owner/name`) rather than a local path, by the rule the stages' `check_path` uses."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith(".") and not Path(name).exists()


def config_dir(name: str) -> tuple[str, str]:
    """A directory holding the model's config.json, and where it came from: the path itself, the hub
    cache, or the copies shipped for planning under recipes/models/hub/."""
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise UserError(f"{name}: no config.json in this directory")
        return name, name
    if not is_hub_id(name):
        raise UserError(f"model path does not exist: {name}")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent), "hub cache"
    shipped = HUB_CONFIGS / name.replace("/", "--")
    if (shipped / "config.json").exists():
        return str(shipped), "recipes/models/hub"
    raise UserError(f"{name}: not in the hub cache and no copy of its config.json under recipes/models/hub/ "
                    f"(add {shipped.relative_to(ROOT)}/config.json to plan with it)")


def model_shape(role: str, name: str, head: str, dtype: str | None, *, vocab_size: int | None = None,
                trust_remote_code: bool = False, source: str | None = None) -> ModelShape:
    """The model built on the meta device from its config (no weights anywhere): `head` "score" is the
    one-output sequence classifier every reward and value model is, "lm" a causal LM (policies)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from aplot.distributed import zero3_init_disabled

    path, where = config_dir(name)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if head == "score":
        config.num_labels = 1
    if vocab_size:
        config.vocab_size = vocab_size
    cls = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    # A ZeRO-3 recipe parsed earlier in this process would make from_config partition the model.
    with zero3_init_disabled(), torch.device("meta"):
        model = cls.from_config(config, trust_remote_code=trust_remote_code)
    params = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once, as DeepSpeed counts
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelShape(role, name, source or f"config from {where}", config, params, largest,
                      weight_dtype(dtype, config, path))


def weight_dtype(requested: str | None, config, path: str) -> str:
    """The dtype the stage loads the weights in: the recipe's, else what `from_pretrained` picks for a
    checkpoint (the config's own dtype in transformers 5) or float32 for a fresh model from a config."""
    if requested not in (None, "auto"):
        return str(requested)
    from aplot.reward_model import has_weights

    fresh = Path(path).is_dir() and not has_weights(path) and not str(path).startswith(str(HUB_CONFIGS))
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return "float32" if fresh or own is None else str(own).replace("torch.", "")


def _count(n: int | float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def describe(m: ModelShape) -> str:
    return f"{m.name}: {_count(m.params)} parameters, {m.dtype} ({m.config.num_hidden_layers} layers, " \
           f"hidden {m.config.hidden_size}; {m.source})"


# --- models named by recipes: presets, trained directories, hub ids, reward models not trained yet ------------

def rm_recipe_writing(path: str) -> str | None:
    """The rm recipe whose output is `path`: its output_dir, or the same with a suffix (`<dir>-bt`, as
    the README trains the bt variant), or a sibling of the same stem (`outputs/rm/embedded-aplot` for
    `outputs/rm/embedded-bt`)."""
    from aplot.config import read_recipe

    target = os.path.normpath(path)
    outputs = {}
    for recipe in sorted(RM_RECIPES.glob("*.yaml")):
        out = read_recipe(str(recipe)).get("output_dir")
        if isinstance(out, str):
            outputs[str(recipe.relative_to(ROOT))] = os.path.normpath(out)
    for rule in (lambda o: o == target, lambda o: target.startswith(o + "-"),
                 lambda o: "-" in o and target.startswith(o.rsplit("-", 1)[0] + "-")):
        found = [r for r, o in outputs.items() if rule(o)]
        if found:
            return found[0]
    return None


def resolve_model(role: str, name: str, head: str, dtype: str | None, *, init_from: str = "sft",
                  lineage_dir: str | None = None, tokenizer_name: str | None = None,
                  trust_remote_code: bool = False) -> tuple[ModelShape, object]:
    """A model as its stage would load it, without building or loading anything: the shape, and its
    tokenizer (an object, or the name to read one from). A model preset (recipes/models/<name>/) is
    its lineage's `init_from` model when built, else its config sized to the tokenizer its lineage
    trains (trained here in memory, as aplot.lineage trains it, and not saved); a config directory
    is sized to its tokenizer as `build_reward_model` sizes it; anything else is read as it is."""
    from aplot import checkpoints, lineage
    from aplot.reward_model import has_weights, load_tokenizer

    lineage_dir = lineage_dir or lineage.LINEAGE_DIR
    if checkpoints.is_imported(lineage.preset_dir(name)):  # a real checkpoint: its imported directory
        imported = Path(lineage_dir) / Path(lineage.preset_dir(name)).name
        if not (imported / lineage.MARKER).exists():
            raise UserError(f"{name}: not imported yet (make import PRESET={Path(lineage.preset_dir(name)).name}); "
                            "a plan downloads and writes nothing")
        name = str(imported)
    if lineage.is_preset(name):
        preset = lineage.load_preset(name)
        built_tokenizer = Path(lineage_dir) / preset.name / "tokenizer"
        if tokenizer_name:
            tokenizer = load_tokenizer(tokenizer_name, trust_remote_code)
        elif (built_tokenizer / lineage.MARKER).exists():
            tokenizer = load_tokenizer(str(built_tokenizer))
        else:
            from aplot.data.world import build_tokenizer

            tokenizer = build_tokenizer(preset.seed, **preset.tokenizer)
        built = Path(lineage_dir) / preset.name / init_from
        if init_from != "scratch" and (built / lineage.MARKER).exists():
            shape = model_shape(role, str(built), head, dtype, trust_remote_code=trust_remote_code)
        else:
            shape = model_shape(role, name, head, dtype, vocab_size=len(tokenizer), trust_remote_code=trust_remote_code)
            shape.source = f"config from {name}, " + ("fresh weights" if init_from == "scratch"
                                                      else f"its {init_from} model not built yet")
        return shape, tokenizer
    tokenizer = tokenizer_name or name
    vocab = None
    if Path(name).is_dir() and not has_weights(name):
        tokenizer = load_tokenizer(tokenizer, trust_remote_code)
        vocab = len(tokenizer)
    return model_shape(role, name, head, dtype, vocab_size=vocab, trust_remote_code=trust_remote_code), tokenizer


def reward_model_shape(role: str, path: str, dtype: str | None, trust_remote_code: bool) -> tuple[ModelShape, object]:
    """A reward model named by a bon or ppo recipe, and its tokenizer: a trained directory (checked as
    the stage checks it), a hub id, or, not trained yet, what the rm recipe writing it starts from."""
    from aplot.config import read_recipe
    from aplot.reward_model import check_path, check_reward_model

    if Path(path).is_dir():
        check_reward_model(path)
        return resolve_model(role, path, "score", dtype, trust_remote_code=trust_remote_code)
    if is_hub_id(path):
        return resolve_model(role, path, "score", dtype, trust_remote_code=trust_remote_code)
    recipe = rm_recipe_writing(path)
    if recipe is None:
        check_path(path, role)  # the stage's one line: it does not exist
    keys = read_recipe(str(ROOT / recipe))
    base = keys.get("model_name_or_path")
    shape, tokenizer = resolve_model(role, base, "score", dtype or keys.get("dtype"),
                                     init_from=keys.get("init_from", "sft"), lineage_dir=keys.get("lineage_dir"),
                                     tokenizer_name=keys.get("tokenizer_name_or_path"),
                                     trust_remote_code=trust_remote_code)
    shape.name, shape.source = path, f"not trained yet: {recipe} trains it from {base} ({shape.source})"
    return shape, tokenizer


def policy_shape(path: str, lineage_dir: str, dtype: str | None, trust_remote_code: bool) -> tuple[ModelShape, object]:
    """The policy (a causal LM) Best-of-N samples and PPO optimises, and its tokenizer: a preset's SFT
    model ('embedded': the embedded default's), or a model directory or hub id as it is."""
    from aplot import lineage
    from aplot.reward_model import check_path

    resolved = lineage.EMBEDDED if path == "embedded" else path
    check_path(resolved, "policy")
    shape, tokenizer = resolve_model("policy", resolved, "lm", dtype, lineage_dir=lineage_dir,
                                     trust_remote_code=trust_remote_code)
    shape.name = path
    return shape, tokenizer
