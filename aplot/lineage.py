"""The model lineage every stage starts from: a preset becomes a tokenizer, a pretrained base LM and an
SFT policy, each built once under `<lineage_dir>/<preset>/` and reused by every stage and the benchmark.

A preset is data, not code: a directory (`recipes/models/<name>/`) with a `config.json` (the
architecture, no weights) and a `preset.yaml` (the tokenizer's settings and how each artefact is
trained). As in every RLHF pipeline, the reward model then starts from the SFT checkpoint through
`AutoModelForSequenceClassification` (a new score head): the same code path as a hub checkpoint such
as `Qwen/Qwen2.5-1.5B-Instruct`.

    tokenizer  byte-level BPE trained on the embedded world's text, with the preset's special tokens,
               pad/eos roles and chat template
    base       causal LM pretrained (TRL SFTTrainer, language modelling) on the world's documents:
               prompts and responses of every quality
    sft        the base LM fine-tuned on prompt -> response (completion-only loss), in the plain or the
               chat layout: the policy Best-of-N samples and PPO optimises

Each artefact's directory is complete once its `lineage.json` (the settings that made it) is written,
last; a killed build resumes from its newest checkpoint. An artefact made with other settings is never
reused silently: the stage stops and names what changed.

A preset whose `preset.yaml` has a `source` instead is a real pretrained checkpoint: `aplot.checkpoints`
imports it once into `<lineage_dir>/<preset>/`, which `sft`, `base` and `scratch` (its config) all name.
A bare preset name (`smollm2-135m-instruct`) stands for `recipes/models/<name>` when no such path exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aplot import checkpoints
from aplot.errors import UserError

LINEAGE_DIR = "outputs/lineage"
EMBEDDED = "recipes/models/tiny-qwen2"  # the preset `embedded` names
PRESETS_DIR = "recipes/models"  # where a bare preset name is looked up
STAGES = ("tokenizer", "base", "sft")
INIT_FROM = ("sft", "base", "scratch")
MARKER = "lineage.json"
PRESET_FILE = "preset.yaml"
# What a preset's stages may set besides TRL SFTConfig keys.
STAGE_KEYS = {"base": ("documents",), "sft": ("examples", "format")}


@dataclass
class Preset:
    path: Path
    seed: int = 0
    tokenizer: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def settings(self, stage: str) -> dict:
        """What the artefact of `stage` depends on: the architecture, the seed and every stage up to it."""
        config = json.loads((self.path / "config.json").read_text())
        upto = STAGES[:STAGES.index(stage) + 1]
        return {"config": config, "seed": self.seed, **{s: getattr(self, s) for s in upto}}


def preset_dir(path) -> str:
    """`path` itself, or for a bare name that is no path here but a preset folder's name, that folder."""
    name = str(path)
    folder = Path(PRESETS_DIR) / name
    if not Path(name).exists() and re.fullmatch(r"[\w.-]+", name) and (folder / PRESET_FILE).is_file():
        return str(folder)
    return name


def is_preset(path) -> bool:
    p = Path(preset_dir(path))
    return (p / PRESET_FILE).is_file() and ((p / "config.json").is_file() or checkpoints.is_imported(p))


def load_preset(path) -> Preset:
    from aplot.config import read_recipe

    file = Path(path) / PRESET_FILE
    data = read_recipe(str(file))
    known = {"seed", "tokenizer", "base", "sft"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{file}: unknown key {unknown[0]!r} (a preset has {', '.join(sorted(known))})")
    for key in ("tokenizer", "base", "sft"):
        if not isinstance(data.get(key, {}), dict):
            raise UserError(f"{file}: {key} must be a mapping")
    return Preset(Path(path), **data)


def model_path(path: str, init_from: str = "sft", lineage_dir: str = LINEAGE_DIR) -> str:
    """The directory a stage loads for `path`: a preset's base or SFT model (built if missing), or, for
    anything else (a model directory, a hub id) `path` itself. `scratch` keeps the preset's config
    directory: the model is then built from its config with fresh weights."""
    if init_from not in INIT_FROM:
        raise UserError(f"init_from {init_from!r} is not one of {', '.join(INIT_FROM)}")
    path = preset_dir(path)
    if checkpoints.is_imported(path):  # its weights for sft and base; scratch builds from its config.json
        return checkpoints.ensure(path, lineage_dir)
    if not is_preset(path) or init_from == "scratch":
        return path
    return ensure(load_preset(path), init_from, lineage_dir)


def policy_path(path: str, lineage_dir: str = LINEAGE_DIR) -> str:
    """The policy Best-of-N samples and PPO optimises: a preset's SFT model ('embedded': the embedded
    default's), or a model directory or hub id as it is."""
    from aplot.reward_model import check_path

    path = EMBEDDED if path == "embedded" else preset_dir(path)
    check_path(path, "policy")
    return model_path(path, "sft", lineage_dir)


def tokenizer_path(path: str, lineage_dir: str = LINEAGE_DIR) -> str:
    """Where the tokenizer of `path` is: a preset's trained (or imported) tokenizer, else `path` itself."""
    path = preset_dir(path)
    if checkpoints.is_imported(path):
        return checkpoints.ensure(path, lineage_dir)
    return ensure(load_preset(path), "tokenizer", lineage_dir) if is_preset(path) else path


def ensure(preset: Preset, stage: str, lineage_dir: str = LINEAGE_DIR) -> str:
    """The directory of `preset`'s artefact `stage`, built (with what it starts from) unless a complete
    one made with the same settings is there."""
    out = Path(lineage_dir) / preset.name / stage
    settings = json.loads(json.dumps(preset.settings(stage)))
    if not (out / MARKER).exists():
        from aplot.distributed import launched_world_size

        if launched_world_size() > 1:
            _build_on_main_process(preset, stage, lineage_dir)
        else:
            if stage != "tokenizer":
                ensure(preset, STAGES[STAGES.index(stage) - 1], lineage_dir)
            print(f"lineage: building {out} (once; every stage reuses it)")
            BUILDERS[stage](preset, out)
            from aplot.outputs import write_json

            write_json(out / MARKER, settings)  # last: its presence marks a complete artefact
    recorded = json.loads((out / MARKER).read_text())
    if recorded != settings:
        changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
        raise UserError(f"{out}: built from other preset settings ({', '.join(changed)} changed in "
                        f"{preset.path}); remove {out.parent} to rebuild it, or set another lineage_dir")
    return str(out)


def _build_on_main_process(preset: Preset, stage: str, lineage_dir: str) -> None:
    """Under a data-parallel launch the main process builds the artefact in a plain child process (a
    one-process training run, outside the ranks' process group) while the other ranks wait."""
    from accelerate import PartialState

    with PartialState().main_process_first():
        if PartialState().is_main_process and not (Path(lineage_dir) / preset.name / stage / MARKER).exists():
            launch = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_DEEPSPEED"}
            env = {k: v for k, v in os.environ.items() if k not in launch}
            subprocess.run([sys.executable, "-m", "aplot.lineage", str(preset.path), stage, lineage_dir],
                           env=env, check=True)


def _build_tokenizer(preset: Preset, out: Path) -> None:
    from aplot.data.world import build_tokenizer

    try:
        tokenizer = build_tokenizer(preset.seed, **preset.tokenizer)
    except (TypeError, ValueError) as err:
        raise UserError(f"{preset.path / PRESET_FILE}: tokenizer: {err}") from None
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)


def _build_base(preset: Preset, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

    from aplot.data import world

    tokenizer = AutoTokenizer.from_pretrained(out.parent / "tokenizer")
    config = AutoConfig.from_pretrained(preset.path)
    if config.vocab_size < len(tokenizer):
        raise UserError(f"{preset.path}/config.json: vocab_size {config.vocab_size} is smaller than the "
                        f"tokenizer's {len(tokenizer)} tokens")
    # The embedding keeps the config's rows, more than the tokenizer has (as Qwen2.5's 151,936 rows
    # for 151,665 tokens): never resized to the tokenizer.
    config.update({"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "bos_token_id": None, "architectures": ["Qwen2ForCausalLM"] if config.model_type == "qwen2"
                   else None})
    settings = dict(preset.base)
    n = settings.pop("documents", 20000)
    rows = [{"text": d["prompt"] + d["response"]} for d in world.documents(preset.seed, n)]
    set_seed(preset.seed)  # the Trainer seeds only after the weights below exist
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _train(preset, "base", model, tokenizer, rows, settings, out)


def _build_sft(preset: Preset, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aplot.data import world

    base = out.parent / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    settings = dict(preset.sft)
    n, layout = settings.pop("examples", 20000), settings.pop("format", "explicit")
    if layout not in ("explicit", "conversational"):
        raise UserError(f"{preset.path / PRESET_FILE}: sft: format must be explicit or conversational, got {layout!r}")
    docs = world.documents(preset.seed + 1, n)
    if layout == "conversational":
        rows = [{"prompt": [{"role": "user", "content": d["prompt"].removesuffix(world.ANSWER_CUE)}],
                 "completion": [{"role": "assistant", "content": d["response"].strip()}]} for d in docs]
    else:
        rows = [{"prompt": d["prompt"], "completion": d["response"]} for d in docs]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    _train(preset, "sft", model, tokenizer, rows, settings, out)


def _train(preset: Preset, stage: str, model, tokenizer, rows: list[dict], settings: dict, out: Path) -> None:
    """One TRL SFTTrainer run into `out`, resumable from its checkpoints, published weights-last."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from aplot.outputs import STAGING, RunPlan, publish_model

    defaults = {"num_train_epochs": 1, "per_device_train_batch_size": 32, "learning_rate": 1e-3,
                "lr_scheduler_type": "cosine", "warmup_steps": 20, "max_length": 64, "logging_steps": 50,
                "save_strategy": "steps", "save_steps": 200, "save_total_limit": 1}
    fixed = {"output_dir": str(out), "seed": preset.seed, "report_to": "none", "bf16": False}
    try:
        args = SFTConfig(**{**defaults, **settings, **fixed})
    except TypeError as err:
        raise UserError(f"{preset.path / PRESET_FILE}: {stage}: {err}") from None
    plan = RunPlan(out, True, {"stage": stage, **preset.settings(stage)})
    plan.prepare()
    trainer = SFTTrainer(model, args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
    # Samples as the Best-of-N and PPO stages draw them: plain ancestral sampling, stopping at eos.
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=None, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    trainer.save_model(str(out / STAGING))
    publish_model(out / STAGING, out)
    from aplot.cards import write_model_card

    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    write_model_card(out, kind="policy", base_model=str(preset.path if stage == "base" else out.parent / "base"),
                     recipe={"preset": str(preset.path), "stage": stage, "seed": preset.seed, **settings},
                     data_counts={"documents": {"rows_read": len(rows), "kept": len(rows), "dropped": {}}},
                     metrics={"steps": trainer.state.global_step, "final_train_loss": losses[-1] if losses else None},
                     trainer=f"TRL SFTTrainer ({'language modelling' if stage == 'base' else 'prompt -> completion'})")
    for path in out.glob("checkpoint-*"):  # the artefact is complete: its checkpoints are not needed
        shutil.rmtree(path)


BUILDERS = {"tokenizer": _build_tokenizer, "base": _build_base, "sft": _build_sft}


if __name__ == "__main__":  # python -m aplot.lineage PRESET STAGE [LINEAGE_DIR]
    from aplot.errors import run_pipeline

    run_pipeline(lambda: print(ensure(load_preset(sys.argv[1]), sys.argv[2], *sys.argv[3:4])))
