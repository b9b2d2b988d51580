"""Adapters that map the common public preference-dataset formats to one (prompt, chosen, rejected) schema.

Each format is named after a layout; the public dataset it was written against (tests/fixtures/ mimics each):

    explicit           prompt, chosen, rejected strings                allenai/reward-bench
    hh                 chosen, rejected Human/Assistant transcripts    Anthropic/hh-rlhf
    conversational     chosen, rejected message lists                  HuggingFaceH4/ultrafeedback_binarized,
                       [score_chosen, score_rejected]                  Skywork/Skywork-Reward-Preference-80K-v0.2
    ratings            conv_A, conv_B, conv_A_rating, conv_B_rating    llm-blender/Unified-Feedback
    multiple_choice    input, targets {choices, labels}                HuggingFaceH4/hhh_alignment
    pairwise_judgment  conversation_a, conversation_b, winner, turn    lmsys/mt_bench_human_judgments
    response_lists     prompt, chosen [...], rejected [...] (+ id)     allenai/reward-bench-2

explicit and multiple_choice give strings (TRL's standard format). The others give TRL's conversational
format: `prompt` is the leading messages chosen and rejected share, `chosen`/`rejected` the messages after
them, which start and end with an assistant message. That is usually the final answer alone; conversations
that differ from an earlier answer on (an MT-Bench turn-2 judgment) keep everything from that answer on, so
the context the judge saw is not lost.

response_lists keeps its rows as they are, one prompt with lists of chosen and rejected strings, since the
best-of-k scoring (aplot/rewardbench.py) needs every response of a prompt together; `as_pairs` expands them
into every chosen x rejected pair where pairs are needed (training). Its counts' `pairs` is that number.

Rows that cannot become a pair are dropped and counted by reason, or with `strict=True` the first one raises.
Ties carry no preference: they are counted under "tie" and never raise.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from datasets import Dataset

from aplot.errors import UserError

FORMATS = ("explicit", "hh", "conversational", "ratings", "multiple_choice", "pairwise_judgment", "response_lists")
_REQUIRED = {
    "explicit": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "ratings": ("conv_A", "conv_B", "conv_A_rating", "conv_B_rating"),
    "multiple_choice": ("input", "targets"),
    "pairwise_judgment": ("winner", "conversation_a", "conversation_b"),
    "response_lists": ("prompt", "chosen", "rejected"),
}
_EXTRAS = ("subset", "margin", "difficulty")
_ROLES = ("system", "user", "assistant")
# HH transcripts are "\n\nHuman: ...\n\nAssistant: ..." with the answer after the last "\n\nAssistant:"
_HH_SPEAKER = re.compile(r"\n\n(Human|Assistant):")


class _BadRow(Exception):
    """A row that cannot become a pair: the column at fault and the reason it is counted under."""

    def __init__(self, column: str, reason: str):
        super().__init__(f"column {column!r}: {reason}")
        self.column, self.reason = column, reason


def to_preference(dataset: Dataset, fmt: str, *, source: str, columns: dict[str, str] | None = None,
                  strict: bool = False) -> tuple[Dataset, dict]:
    """Map `dataset` (rows of format `fmt`) to rows with `prompt`, `chosen`, `rejected` and, where the
    format has them, `subset`, `margin`, `difficulty`. Returns (dataset, counts).

    `columns` maps the names the format expects to the dataset's own (`{"chosen": "response_good"}`).
    counts is {"rows_read", "kept", "dropped": {reason: n}, "pairs"}; kept + sum(dropped) == rows_read,
    and pairs == kept except for multiple_choice, where a row gives one pair per wrong choice.
    """
    if fmt not in FORMATS:
        raise UserError(f"{source}: unknown format {fmt!r}; formats are {', '.join(FORMATS)}")
    columns = columns or {}
    for name in dict.fromkeys([columns.get(name, name) for name in _REQUIRED[fmt]] + list(columns.values())):
        if name not in dataset.column_names:
            raise UserError(f"{source}: missing column {name!r}; columns are {', '.join(dataset.column_names)}")
    renames = {own: name for name, own in columns.items() if own != name}
    # the mapped column replaces a same-named one: the caller picked it
    replaced = [name for name in renames.values() if name in dataset.column_names and name not in renames]
    dataset = dataset.remove_columns(replaced).rename_columns(renames)

    convert = _CONVERTERS[fmt]
    pairs, dropped, kept = [], Counter(), 0
    for index, row in enumerate(dataset):
        try:
            row_pairs = [_with_extras(pair, row) for pair in convert(row)]
        except _BadRow as bad:
            if strict and bad.reason != "tie":
                column = columns.get(bad.column, bad.column)
                raise UserError(f"{source}: row {index}, column {column!r}: {bad.reason}") from None
            dropped[bad.reason] += 1
            continue
        pairs.extend(row_pairs)
        kept += 1
    n_pairs = (sum(len(row["chosen"]) * len(row["rejected"]) for row in pairs) if fmt == "response_lists"
               else len(pairs))
    counts = {"rows_read": len(dataset), "kept": kept, "dropped": dict(dropped), "pairs": n_pairs}
    if not pairs:
        return Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}), counts
    return Dataset.from_list(pairs), counts


def _with_extras(pair: dict, row: dict) -> dict:
    for name in _EXTRAS:
        if name in row and name not in pair:
            pair[name] = _number(row, name) if name == "margin" else _text(row[name], name)
    return pair


def _explicit(row: dict) -> list[dict]:
    prompt = _text(row["prompt"], "prompt") if "prompt" in row else ""
    chosen, rejected = _text(row["chosen"], "chosen"), _text(row["rejected"], "rejected")
    if chosen == rejected:
        raise _BadRow("rejected", "identical")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]


def _hh(row: dict) -> list[dict]:
    chosen, rejected = _hh_messages(row["chosen"], "chosen"), _hh_messages(row["rejected"], "rejected")
    pair = _chat_pair(chosen, rejected, "rejected")
    # HH pairs share every turn but the last answer; an earlier difference means the prompts differ
    if len(pair["chosen"]) != 1 or len(pair["rejected"]) != 1:
        raise _BadRow("rejected", "unparseable transcript")
    return [pair]


def _conversational(row: dict) -> list[dict]:
    # UltraFeedback's string `prompt` repeats the first user turn of chosen; a message-list prompt (TRL's own
    # datasets) holds the leading turns that chosen and rejected then leave out
    lead = _messages(row["prompt"], "prompt") if isinstance(row.get("prompt"), list) else []
    chosen, rejected = lead + _messages(row["chosen"], "chosen"), lead + _messages(row["rejected"], "rejected")
    pair = _chat_pair(chosen, rejected, "rejected")
    if "score_chosen" in row and "score_rejected" in row:
        pair["margin"] = _number(row, "score_chosen") - _number(row, "score_rejected")
    return [pair]


def _ratings(row: dict) -> list[dict]:
    rating_a = _number(row, "conv_A_rating")
    rating_b = _number(row, "conv_B_rating")
    if rating_a == rating_b:
        raise _BadRow("conv_B_rating", "tie")
    conv_a, conv_b = _messages(row["conv_A"], "conv_A"), _messages(row["conv_B"], "conv_B")
    if rating_a > rating_b:
        pair = _chat_pair(conv_a, conv_b, "conv_B")
    else:
        pair = _chat_pair(conv_b, conv_a, "conv_A")
    return [{**pair, "margin": abs(rating_a - rating_b)}]


def _multiple_choice(row: dict) -> list[dict]:
    prompt = _text(row["input"], "input")
    targets = row["targets"] if isinstance(row["targets"], dict) else {}
    choices, labels = targets.get("choices"), targets.get("labels")
    if (not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != len(labels)
            or len(choices) < 2 or labels.count(1) != 1):
        raise _BadRow("targets", "bad labels")
    choices = [_text(choice, "targets") for choice in choices]
    chosen = choices[labels.index(1)]
    wrong = [choice for choice, label in zip(choices, labels) if label != 1]
    if chosen in wrong:
        raise _BadRow("targets", "identical")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected} for rejected in wrong]


def _response_lists(row: dict) -> list[dict]:
    prompt = _text(row["prompt"], "prompt")
    lists = {}
    for column in ("chosen", "rejected"):
        value = row[column]
        if not isinstance(value, list):
            raise _BadRow(column, "not a list")
        if not value:
            raise _BadRow(column, "empty list")
        lists[column] = [_text(response, column) for response in value]
    # the official scorer splits one score list at num_correct: a count that disagrees with the lists
    # means the row would be scored against the wrong responses
    for column, side in (("num_correct", "chosen"), ("num_incorrect", "rejected")):
        if row.get(column) is not None and row[column] != len(lists[side]):
            raise _BadRow(column, "count mismatch")
    if set(lists["chosen"]) & set(lists["rejected"]):
        raise _BadRow("rejected", "identical")
    out = {"prompt": prompt, **lists}
    if row.get("id") is not None:
        out["id"] = str(row["id"])
    return [out]


def is_response_lists(dataset: Dataset) -> bool:
    """Whether `dataset` is in the response_lists layout (chosen is a list of strings, not one response)."""
    feature = dataset.features.get("chosen") if "chosen" in dataset.column_names else None
    inner = getattr(feature, "feature", None)
    return getattr(inner, "dtype", None) in ("string", "large_string")


def as_pairs(dataset: Dataset) -> Dataset:
    """Every chosen x rejected pair of response_lists rows (other layouts are returned as they are)."""
    if not is_response_lists(dataset):
        return dataset
    extras = [name for name in _EXTRAS if name in dataset.column_names]
    pairs = [{"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, **{n: row[n] for n in extras}}
             for row in dataset for chosen in row["chosen"] for rejected in row["rejected"]]
    return Dataset.from_list(pairs) if pairs else Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})


def _pairwise_judgment(row: dict) -> list[dict]:
    winner = row["winner"]
    # "tie" in MT-Bench; Chatbot Arena exports add "tie (bothbad)"
    if isinstance(winner, str) and winner.startswith("tie"):
        raise _BadRow("winner", "tie")
    if winner not in ("model_a", "model_b"):
        raise _BadRow("winner", "unknown winner")
    conv_a, conv_b = _judged(row, "conversation_a"), _judged(row, "conversation_b")
    if winner == "model_a":
        return [_chat_pair(conv_a, conv_b, "conversation_b")]
    return [_chat_pair(conv_b, conv_a, "conversation_a")]


def _judged(row: dict, column: str) -> list[dict]:
    conversation = row[column]
    # each conversation holds both MT-Bench turns, but a turn-1 judgment compared the first answers only
    if row.get("turn") == 1 and isinstance(conversation, list):
        roles = [message.get("role") if isinstance(message, dict) else None for message in conversation]
        if "assistant" in roles:
            conversation = conversation[:roles.index("assistant") + 1]
    return _messages(conversation, column)


def _chat_pair(chosen: list[dict], rejected: list[dict], column: str) -> dict:
    """Split two transcripts into the leading messages they share and the assistant-led rest of each."""
    if chosen == rejected:
        raise _BadRow(column, "identical")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    answers_ok = all(rest and rest[0]["role"] == rest[-1]["role"] == "assistant" for rest in (chosen, rejected))
    if not prompt or not answers_ok:
        raise _BadRow(column, "unparseable transcript")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _hh_messages(transcript, column: str) -> list[dict]:
    _text(transcript, column)
    parts = _HH_SPEAKER.split(transcript)  # [text before the first speaker, speaker, text, speaker, text, ...]
    if len(parts) < 3 or parts[0].strip():
        raise _BadRow(column, "unparseable transcript")
    # a speaker tag is followed by a space, and some transcripts pad turns with trailing whitespace
    turns = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
             for speaker, content in zip(parts[1::2], parts[2::2])]
    if not all(turn["content"] for turn in turns):
        raise _BadRow(column, "empty text")
    return turns


def _messages(value, column: str) -> list[dict]:
    if not isinstance(value, list):
        raise _BadRow(column, "non-text")
    result = []
    for message in value:
        if (not isinstance(message, dict) or message.get("role") not in _ROLES
                or not isinstance(message.get("content"), str)):
            raise _BadRow(column, "unparseable transcript")
        _text(message["content"], column)
        # other keys (num_tokens, ...) are dropped: TRL's conversational format is role and content
        result.append({"role": message["role"], "content": message["content"]})
    if not result:
        raise _BadRow(column, "unparseable transcript")
    return result


def _text(value, column: str) -> str:
    if not isinstance(value, str):
        raise _BadRow(column, "non-text")
    if not value.strip():
        raise _BadRow(column, "empty text")
    return value


def _number(row: dict, column: str) -> float:
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _BadRow(column, "non-numeric")
    return float(value)


_CONVERTERS = {"explicit": _explicit, "hh": _hh, "conversational": _conversational, "ratings": _ratings,
               "multiple_choice": _multiple_choice, "pairwise_judgment": _pairwise_judgment,
               "response_lists": _response_lists}
