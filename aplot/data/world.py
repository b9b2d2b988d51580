"""The embedded preference world: prompts with word constraints, a gold reward, and preference pairs.

Everything here is offline and deterministic from a seed, so the whole pipeline can run and be
checked on a laptop with no hub access.

A prompt asks for a response that uses some required words and avoids one banned word:

    Write about apple, river and stone. Do not use cloud.
    Answer:

The gold reward of any response text (garbage included) is

    coverage(required) - 0.5 * [banned word used]

Pairs are tagged `hard` (the two responses are one word-edit apart, so the texts are similar and
the gold gap is small) or `easy` (two independent responses with a large gold gap). `chosen` is
the response with the higher gold reward; a `label_noise` fraction of training pairs is flipped.

The vocabulary has two halves ("topics"). Training and `test_id` prompts draw all their required
words from one topic, so a model can score well in distribution by rewarding on-topic words instead
of checking the constraint. The out-of-distribution split (`test_ood`) breaks that shortcut and
shifts the prompts in two documented ways: it asks for 4 required words instead of 3 (longer
prompts, a count never seen in training) and mixes required words from both topics (constraint
combinations never seen in training). OOD accuracy thus measures whether a reward model learned
the constraint itself.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

CONTENT_WORDS = (
    "apple river stone cloud tiger maple candle window garden silver "
    "rocket violin desert harbor lemon forest pepper castle marble falcon "
    "planet copper meadow anchor bottle cactus dragon ember glacier honey "
    "island jungle kettle ladder mirror nectar orchid pillow quartz saddle"
).split()
FILLER_WORDS = "the a and of with near over under bright quiet".split()
HALVES = (CONTENT_WORDS[:20], CONTENT_WORDS[20:])

PROMPT_RE = re.compile(r"Write about ([a-z, ]+?)\. Do not use ([a-z]+)\.")
WORD_RE = re.compile(r"[a-z]+")
SPLITS = ("train", "test_id", "test_ood")


@dataclass(frozen=True)
class Constraints:
    required: tuple[str, ...]
    banned: str


def format_prompt(c: Constraints) -> str:
    words = ", ".join(c.required[:-1]) + " and " + c.required[-1]
    return f"Write about {words}. Do not use {c.banned}.{ANSWER_CUE}"


def parse_prompt(prompt: str) -> Constraints:
    match = PROMPT_RE.search(prompt)
    if match is None:  # the same constraints asked as a chat request (aplot.data.spoken)
        from aplot.data.spoken import parse_request

        return parse_request(prompt)
    required = tuple(w for w in re.split(r", | and ", match.group(1)) if w)
    return Constraints(required, match.group(2))


def gold_reward(prompt, response: str) -> float:
    """The world's ground truth, defined for any response text; `prompt` is the prompt text or, in the
    conversational layout, its messages."""
    c = parse_prompt(prompt if isinstance(prompt, str) else prompt[-1]["content"])
    words = WORD_RE.findall(response.lower())
    present = set(words)
    coverage = sum(w in present for w in c.required) / len(c.required)
    banned = 0.5 if c.banned in present else 0.0
    return coverage - banned


def sample_constraints(rng: random.Random, split: str) -> Constraints:
    if split == "test_ood":  # 4 required words, from both topics
        first = rng.randint(1, 3)
        required = rng.sample(HALVES[0], first) + rng.sample(HALVES[1], 4 - first)
        rng.shuffle(required)
    else:
        required = rng.sample(rng.choice(HALVES), 3)
    banned = rng.choice([w for w in CONTENT_WORDS if w not in required])
    return Constraints(tuple(required), banned)


def sample_response(rng: random.Random, c: Constraints) -> list[str]:
    """A response of mixed quality: each constraint is met or missed at random."""
    length = rng.randint(4, 8)
    others = [w for w in CONTENT_WORDS if w not in c.required and w != c.banned]
    words = [w for w in c.required if rng.random() < 0.6]
    if rng.random() < 0.25:
        words.append(c.banned)
    while len(words) < length:
        words.append(rng.choice(others) if rng.random() < 0.6 else rng.choice(FILLER_WORDS))
    words = words[:length]
    rng.shuffle(words)
    return words


def edit_response(rng: random.Random, words: list[str], c: Constraints) -> list[str]:
    """One small edit: substitute, insert or delete a single word."""
    words = list(words)
    pool = list(CONTENT_WORDS) + FILLER_WORDS + list(c.required) * 3 + [c.banned] * 2
    op = rng.choice(["substitute", "substitute", "insert", "delete"])
    if op == "delete" and len(words) > 1:
        del words[rng.randrange(len(words))]
    elif op == "insert":
        words.insert(rng.randrange(len(words) + 1), rng.choice(pool))
    else:
        words[rng.randrange(len(words))] = rng.choice(pool)
    return words


def make_pair(rng: random.Random, prompt: str, c: Constraints, difficulty: str) -> dict | None:
    a = sample_response(rng, c)
    b = edit_response(rng, a, c) if difficulty == "hard" else sample_response(rng, c)
    ra, rb = gold_reward(prompt, " ".join(a)), gold_reward(prompt, " ".join(b))
    gap = abs(ra - rb)
    if gap < 1e-9 or (difficulty == "hard" and gap > 0.55) or (difficulty == "easy" and gap < 0.6):
        return None
    chosen, rejected = (a, b) if ra > rb else (b, a)
    return {
        "prompt": prompt,
        "chosen": " " + " ".join(chosen),
        "rejected": " " + " ".join(rejected),
        "difficulty": difficulty,
        "gold_gap": round(gap, 6),
    }


def generate_split(split: str, n_pairs: int, seed: int, hard_fraction: float = 0.5,
                   label_noise: float = 0.0) -> list[dict]:
    """`n_pairs` preference pairs of one split; the same arguments always give the same rows."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the embedded world has {', '.join(SPLITS)}")
    rng = random.Random(f"aplot-world/{seed}/{split}")
    rows: list[dict] = []
    flipped: set[int] = set()
    while len(rows) < n_pairs:
        difficulty = "hard" if rng.random() < hard_fraction else "easy"
        pair = None
        while pair is None:  # resample until the drawn difficulty is met, so the mix stays as asked
            c = sample_constraints(rng, split)
            pair = make_pair(rng, format_prompt(c), c, difficulty)
        rows.append(pair)
    if label_noise > 0:
        # Flip an exact, seeded subset so a 20 % noise run flips exactly 20 % of the pairs.
        flipped = set(rng.sample(range(n_pairs), round(label_noise * n_pairs)))
        for i in flipped:
            rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
    for i, row in enumerate(rows):
        row["label_flipped"] = i in flipped
    return rows


def as_chat(row: dict) -> dict:
    """A pair in TRL's conversational layout: the prompt as one user message (without the plain-text
    `Answer:` cue, which a chat template replaces), each response as one assistant message."""
    content = row["prompt"].removesuffix(ANSWER_CUE)
    return {**row, "prompt": [{"role": "user", "content": content}],
            "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"].strip()}]}


def corpus(seed: int, n: int = 2000) -> list[str]:
    """Text of every kind the world produces, prompts of all splits included: the tokenizer's
    training text (the world's vocabulary is fixed, so the OOD shift is in structure, not words)."""
    texts = []
    for split in SPLITS:
        for row in generate_split(split, n // len(SPLITS), seed):
            texts += [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
    return texts


def documents(seed: int, n: int, split: str = "train") -> list[dict]:
    """`n` (prompt, response) documents of `split`'s prompt distribution, responses of every quality:
    the text a base model is pretrained on and an SFT policy fine-tuned on. Seeded apart from the
    preference pairs, so its prompts are not those of the pairs (the space is small, some recur)."""
    rng = random.Random(f"aplot-documents/{seed}/{split}")
    rows = []
    for _ in range(n):
        c = sample_constraints(rng, split)
        rows.append({"prompt": format_prompt(c), "response": " " + " ".join(sample_response(rng, c))})
    return rows


SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")


def build_tokenizer(seed: int = 0, vocab_size: int = 512, special_tokens=SPECIAL_TOKENS,
                    eos_token: str = "<|endoftext|>", pad_token: str = "<|pad|>", chat_template: str | None = None,
                    model_max_length: int = 512):
    """A Qwen2 tokenizer (Qwen2's byte-level BPE pipeline) with merges learned from the world's text.

    Byte-level, so it encodes any text a policy may emit; being a genuine `Qwen2Tokenizer`, it saves
    and reloads through `AutoTokenizer` unchanged. Trained offline in about a second. The special
    tokens follow the BPE vocabulary in the order given (a model preset names Qwen2.5's, with its
    pad and eos roles); `chat_template` defaults to the ChatML below.
    """
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    special = list(special_tokens)
    missing = [t for t in (eos_token, pad_token) if t not in special]
    if missing:
        raise ValueError(f"eos and pad must be among the special tokens; {missing[0]!r} is not")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = corpus(seed)
    if chat_template:  # the template's own text (a default system message) is text the tokenizer sees too
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template)
        for row in generate_split("train", 200, seed):
            rendered = template.render(messages=as_chat(row)["prompt"] + as_chat(row)["chosen"])
            text.append(re.sub("|".join(map(re.escape, special)), " ", rendered))
    tok.train_from_iterator(text, trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    # The trainer puts the special tokens first; a real checkpoint has them after the vocabulary.
    regular = [t for t in sorted(bpe["vocab"], key=bpe["vocab"].get) if t not in special]
    vocab = {t: i for i, t in enumerate(regular + special)}
    extra = [t for t in special if t not in (eos_token, pad_token)]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=eos_token, pad_token=pad_token,
                               unk_token=None, model_max_length=model_max_length, extra_special_tokens=extra)
    tokenizer.chat_template = chat_template or CHAT_TEMPLATE
    return tokenizer


ANSWER_CUE = "\nAnswer:"


# ChatML, as Qwen2.5 uses, so conversational data and chat policies work with the world's tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
