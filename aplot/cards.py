"""Model cards: the README.md written into every trained reward-model and policy directory, TRL's own card
(its template and metadata, rendered offline) followed by what made the model: base model, recipe keys,
data counts, metrics, command line and package versions."""

from __future__ import annotations

import json
import re
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from aplot.outputs import write_atomic

PACKAGES = ("aplot", "torch", "transformers", "trl", "datasets", "deepspeed", "accelerate")
# kind -> (TRL template, trainer named in the card)
KINDS = {"reward_model": ("rm_model_card.md", "APLOTRewardTrainer (TRL's RewardTrainer with APLOT margins)"),
         "policy": ("lm_model_card.md", "TRL")}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_model_card(model_dir, *, kind: str, base_model: str | None, recipe: dict,
                     data_counts: dict | None = None, metrics: dict | None = None,
                     trainer: str | None = None) -> Path:
    """Write `model_dir/README.md` (atomically) and return its path.

    kind: "reward_model" or "policy" (picks TRL's template). base_model: the hub id or directory the
    weights started from (a config directory for models trained from scratch). recipe: the recipe keys
    and values the run used. data_counts: {data set: {rows_read, kept, dropped: {reason: n}, pairs, ...}}.
    metrics: what the run measured, any JSON-able mapping. trainer: the trainer named in the card.
    """
    from trl.trainer.utils import generate_model_card

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    template, default_trainer = KINDS[kind]
    model_dir = Path(model_dir)
    # TRL links base_model and hub_model_id to huggingface.co: only a hub id may go there
    on_hub = base_model if base_model and HUB_ID.fullmatch(base_model) and not Path(base_model).exists() else None
    card = generate_model_card(base_model=on_hub, model_name=model_dir.name, hub_model_id=str(model_dir),
                               dataset_name=None, tags=["aplot", kind.replace("_", "-")], wandb_url=None,
                               trackio_url=None, trainer_name=trainer or default_trainer, template_file=template)
    text = str(card)
    if on_hub is None:
        text = re.sub(r"^This model is a fine-tuned version of \[None\]\([^)]*\)\.?",
                      f"This model was trained from `{base_model}`.", text, count=1, flags=re.MULTILINE)
    text = text.rstrip() + "\n\n" + _provenance(kind, base_model, recipe, data_counts, metrics)
    path = model_dir / "README.md"
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def _provenance(kind, base_model, recipe, data_counts, metrics) -> str:
    lines = ["## How this model was made (aplot)", "",
             f"- kind: {kind.replace('_', ' ')}", f"- base model: `{base_model}`",
             f"- command line: `{shlex.join(sys.argv)}`", "", "### Recipe keys", "",
             "| key | value |", "| --- | --- |"]
    lines += [f"| `{key}` | `{_value(value)}` |" for key, value in recipe.items()]
    lines += ["", "### Data", ""]
    if data_counts:
        lines += ["| data set | rows read | kept | dropped | pairs |", "| --- | ---: | ---: | --- | ---: |"]
        for name, counts in data_counts.items():
            dropped = ", ".join(f"{reason}: {n}" for reason, n in (counts.get("dropped") or {}).items()) or "0"
            lines.append(f"| {name} | {counts.get('rows_read', '-')} | {counts.get('kept', '-')} | {dropped} "
                         f"| {counts.get('pairs', '-')} |")
    else:
        lines.append("No data counts recorded.")
    lines += ["", "### Metrics", ""]
    lines += ["```json", json.dumps(metrics, indent=2, default=str), "```"] if metrics else ["No metrics recorded."]
    lines += ["", "### Package versions", "", "| package | version |", "| --- | --- |"]
    lines += [f"| {name} | {v} |" for name, v in package_versions().items()]
    return "\n".join(lines) + "\n"


def _value(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("`", "'")
