"""Tokenizer facts for planning: what decides whether two tokenizers read the same token ids and format chats
alike, read from a tokenizer's files, the hub cache, or the tokenizer_config.json shipped for planning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aplot.plan.shapes import HUB_CONFIGS, is_hub_id


@dataclass
class TokenizerFacts:
    """What decides whether two tokenizers read the same token ids and format chats alike."""

    name: str
    chat_template: str | None
    special: dict  # id -> token
    eos: str | None
    pad: str | None
    tokenizer: object = None  # the tokenizer itself when its files are here (vocabularies compared)


def tokenizer_facts(name, trust_remote_code: bool = False) -> TokenizerFacts | None:
    """A tokenizer's facts (`name`: a tokenizer already at hand, or where to read one): from its files
    (the stage's own loader), the hub cache, or the copy of its tokenizer_config.json shipped for
    planning; None when none of them has it."""
    import json

    from aplot.reward_model import TOKENIZER_FILES, load_tokenizer

    if not isinstance(name, str):
        return TokenizerFacts(getattr(name, "name_or_path", "tokenizer"), name.chat_template,
                              {i: str(t) for i, t in name.added_tokens_decoder.items()}, name.eos_token,
                              name.pad_token, name)
    local = name == "embedded" or Path(name).is_dir() and any((Path(name) / f).exists() for f in TOKENIZER_FILES)
    if not local and is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        local = isinstance(try_to_load_from_cache(name, "tokenizer.json"), str)
    if local:
        tok = load_tokenizer(name, trust_remote_code) if not is_hub_id(name) else _hub_tokenizer(name)
        return TokenizerFacts(name, tok.chat_template, {i: str(t) for i, t in tok.added_tokens_decoder.items()},
                              tok.eos_token, tok.pad_token, tok)
    shipped = HUB_CONFIGS / name.replace("/", "--") / "tokenizer_config.json"
    if not shipped.exists():
        return None
    cfg = json.loads(shipped.read_text())
    return TokenizerFacts(name, cfg.get("chat_template"),
                          {int(i): t["content"] for i, t in cfg.get("added_tokens_decoder", {}).items()},
                          cfg.get("eos_token"), cfg.get("pad_token"))


def _hub_tokenizer(name):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)  # offline: from the hub cache, where it was found


def compare_tokenizers(a: TokenizerFacts | None, b: TokenizerFacts | None, a_name: str,
                       b_name: str) -> tuple[str, bool]:
    """(what agrees or differs, whether the token ids would be read differently)."""
    missing = [n for f, n in ((a, a_name), (b, b_name)) if f is None]
    if missing:
        return f"not compared: no tokenizer files for {missing[0]} here", False
    differs = []
    if a.tokenizer is not None and b.tokenizer is not None:
        from aplot.ppo import same_tokenizer  # the check make ppo runs at start-up

        mismatch = same_tokenizer(a.tokenizer, b.tokenizer)
        if mismatch:
            differs.append(f"vocabulary ({mismatch})")
    if a.special != b.special:
        ids = sorted(set(a.special) ^ set(b.special)) or sorted(i for i in a.special if a.special[i] != b.special[i])
        differs.append(f"special tokens (id {ids[0]}: {a.special.get(ids[0])!r} against {b.special.get(ids[0])!r})")
    for what, x, y in (("eos", a.eos, b.eos), ("pad", a.pad, b.pad)):
        if x != y:
            differs.append(f"{what} {x!r} against {y!r}")
    ids_differ = bool(differs)
    if a.chat_template != b.chat_template:
        differs.append("chat template")
    if not differs:
        vocab = "vocabulary, " if a.tokenizer is not None and b.tokenizer is not None else ""
        note = "" if vocab else " (vocabularies not compared: no tokenizer.json for both here)"
        return f"agree: {vocab}special tokens and chat template{note}", False
    return "differ: " + "; ".join(differs), ids_differ
