"""The embedded world, spoken: its constraint task asked as a natural chat request and answered by a real
instruct policy, with preference pairs chosen among the policy's own samples by the world's gold reward.

    Write two sentences about a trip that mention apple, river and stone, and never mention cloud.

The labels are synthetic (the gold reward of `aplot.data.world`, applied to the response text); the text
is a real model's. As real preference data is collected, each prompt gets several samples from the policy
(vLLM by default, transformers as the reference) and one pair is chosen among them: `hard` (a gold gap of at
most 0.55 between the most similar texts) or `easy` (a gap of at least 0.6), mixed as `hard_fraction` asks
while the samples allow; `spoken_pairs_per_prompt` (1 by default) pairs of distinct samples per prompt. The
constraints of a split are drawn as the world draws them (`test_ood`: 4 words from both topics); train and
`test_id` constraints fall in disjoint hash buckets, so no two splits share a prompt, and no prompt repeats
within a split.

The samples are built once into `<spoken_dir>/<policy>-<hash of the sampling settings>/samples.jsonl`
(`aplot.bon`'s resumable cache, seeded per prompt, so a killed build resumes to identical rows); other
settings build aside, never into the same cache. Pairs are a pure function of the samples: asking for more
pairs samples more prompts and reuses the rest. `spoken.json` records the settings and what was built.

    python -m aplot.data.spoken --config recipes/rm/spoken-smollm2.yaml     # build (make rm also does)
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from pathlib import Path

from aplot.data import world
from aplot.errors import UserError

# (form, verb): "Write two sentences ... that mention ..."; the gold reward reads only the word lists.
FORMS = (("one sentence", "mentions"), ("two sentences", "mention"), ("three sentences", "mention"),
         ("a short paragraph", "mentions"))
SUBJECTS = ("a trip", "a morning walk", "a friend", "a small town", "a rainy day", "a market", "a holiday",
            "an old house")
REQUEST_RE = re.compile(r"that mentions? ([a-z, ]+?), and never mentions? ([a-z]+)\.")
TEST_ID_BUCKET = 5  # a 3-word constraint whose hash is 0 mod 5 belongs to test_id, any other to train
HARD_GAP, EASY_GAP = 0.55, 0.6  # as the world's pairs: hard at most this gap, easy at least that one
MAX_PROMPTS_PER_PAIR = 20  # give up (one line) when the policy's samples yield fewer pairs than that


def format_request(c: world.Constraints, form: tuple[str, str], subject: str) -> str:
    words = ", ".join(c.required[:-1]) + " and " + c.required[-1]
    noun, verb = form
    return f"Write {noun} about {subject} that {verb} {words}, and never {verb} {c.banned}."


def parse_request(text: str) -> world.Constraints:
    match = REQUEST_RE.search(text)
    if match is None:
        raise ValueError(f"not a prompt of the embedded world, plain or spoken: {text[:80]!r}")
    return world.Constraints(tuple(w for w in re.split(r", | and ", match.group(1)) if w), match.group(2))


def constraint_bucket(c: world.Constraints) -> int:
    key = " ".join(sorted(c.required)) + "/" + c.banned
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % TEST_ID_BUCKET


def requests(split: str, seed: int):
    """The split's requests in order, without end: the i-th is the same however many are taken."""
    rng = random.Random(f"aplot-spoken/{seed}/{split}")
    seen = set()
    while True:
        c = world.sample_constraints(rng, split)
        form, subject = rng.choice(FORMS), rng.choice(SUBJECTS)
        key = (frozenset(c.required), c.banned)
        if key in seen or (split != "test_ood" and (constraint_bucket(c) == 0) != (split == "test_id")):
            continue
        seen.add(key)
        yield format_request(c, form, subject)


def first_requests(split: str, seed: int, n: int) -> list[str]:
    gen = requests(split, seed)
    return [next(gen) for _ in range(n)]


def chat_prompt(request: str) -> list[dict]:
    return [{"role": "user", "content": request}]


# ---------------------------------------------------------------- settings

# Recipe keys (aplot.config.DataConfig) of the build, by the name `spoken.json` records them under.
KEYS = {"policy": "spoken_policy", "backend": "spoken_backend", "samples_per_prompt": "spoken_samples",
        "temperature": "spoken_temperature", "top_p": "spoken_top_p", "max_new_tokens": "spoken_max_new_tokens",
        "seed": "spoken_seed"}


def sampling_settings(data_cfg) -> dict:
    """What the samples depend on, checked before any work: a wrong value fails in one line."""
    from aplot.config import check_range

    s = {name: getattr(data_cfg, key) for name, key in KEYS.items()}
    if s["backend"] not in ("vllm", "transformers"):
        raise UserError(f"spoken_backend {s['backend']!r} is not one of vllm, transformers")
    check_range("spoken_samples", s["samples_per_prompt"], low=2)
    check_range("spoken_temperature", s["temperature"], low=0.0, low_open=True)
    check_range("spoken_top_p", s["top_p"], low=0.0, high=1.0, low_open=True)
    check_range("spoken_max_new_tokens", s["max_new_tokens"], low=1)
    check_range("spoken_chunk_prompts", data_cfg.spoken_chunk_prompts, low=1)
    # not a sampling setting (pairs are drawn from the samples afterwards), but bounded by them
    check_range("spoken_pairs_per_prompt", data_cfg.spoken_pairs_per_prompt, low=1,
                high=s["samples_per_prompt"] // 2)
    return {**s, "world_seed": data_cfg.world_seed, "requests": REQUEST_VERSION}


# The request templates are part of the settings: changing their text builds aside.
REQUEST_VERSION = hashlib.sha256(repr((FORMS, SUBJECTS)).encode()).hexdigest()[:8]


class SpokenWorld:
    """The spoken world of one recipe: its directory, its sample cache and the pairs drawn from it."""

    def __init__(self, data_cfg):
        from aplot import lineage
        from aplot.bon import JsonlCache, settings_hash
        from aplot.reward_model import check_path

        self.cfg = data_cfg
        self.settings = sampling_settings(data_cfg)
        check_path(self.settings["policy"], "spoken_policy")
        name = Path(lineage.preset_dir(self.settings["policy"])).name or "policy"
        self.dir = Path(data_cfg.spoken_dir) / f"{name}-{settings_hash(self.settings)}"
        self.samples = JsonlCache(self.dir / "samples.jsonl", ("split", "prompt_index", "sample_index"),
                                  self.settings)
        self.sampler = None
        self.sample_seconds = 0.0

    def policy(self) -> str:
        from aplot import lineage

        return lineage.policy_path(self.settings["policy"], self.cfg.spoken_lineage_dir)

    def responses(self, split: str, index: int) -> list[str] | None:
        k = self.settings["samples_per_prompt"]
        rows = [self.samples.rows.get((split, index, j)) for j in range(k)]
        return None if any(r is None for r in rows) else [r["response"] for r in rows]

    def sample(self, split: str, indices: list[int], texts: list[str]) -> None:
        """Sample every missing prompt of `indices`, a chunk at a time, each chunk appended (fsynced) at once."""
        from aplot import bon

        todo = [i for i in indices if self.responses(split, i) is None]
        if not todo:
            return
        s = self.settings
        if self.sampler is None:
            policy = self.policy()
            self.sampler = (bon.VLLMSampler(policy) if s["backend"] == "vllm" else bon.TransformersSampler(policy))
            self.render = lambda requests: bon.policy_inputs(policy, [chat_prompt(r) for r in requests])
        params = {"temperature": s["temperature"], "top_p": s["top_p"], "max_new_tokens": s["max_new_tokens"]}
        # Seeds per (split, prompt): the splits' prompt indices are offset so no two prompts share a seed.
        offset = {"train": 0, "test_id": 1 << 24, "test_ood": 2 << 24}[split]
        chunk = self.cfg.spoken_chunk_prompts
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            begin = time.perf_counter()
            out = self.sampler.sample(self.render([texts[i] for i in part]), [offset + i for i in part],
                                      s["samples_per_prompt"], params, s["seed"])
            self.sample_seconds += time.perf_counter() - begin
            self.samples.append([{"split": split, "prompt_index": i, "sample_index": j, "response": r}
                                 for i, rs in zip(part, out) for j, r in enumerate(rs)])
            print(f"spoken world: {split}: sampled prompts up to {part[-1] + 1} ({self.dir})", flush=True)

    def pairs(self, split: str, n_pairs: int) -> tuple[list[dict], dict]:
        """The first `n_pairs` pairs of `split` (sampling the prompts they need) and what it took."""
        requests_ = []
        gen = requests(split, self.cfg.world_seed)
        rows, counts = [], {"prompts": 0, "hard": 0, "easy": 0, "no_pair": 0}
        next_index = 0
        while len(rows) < n_pairs:
            if next_index >= MAX_PROMPTS_PER_PAIR * n_pairs:
                raise UserError(f"spoken world: {split}: the policy's samples gave only {len(rows)} pairs from "
                                f"{next_index} prompts ({n_pairs} asked for); raise spoken_samples or "
                                "spoken_temperature, or ask for fewer pairs")
            # Sample what the remaining pairs need (about one prompt per pairs_per_prompt), a chunk at least.
            per_prompt = self.cfg.spoken_pairs_per_prompt
            want = max(-(-(n_pairs - len(rows)) // per_prompt), self.cfg.spoken_chunk_prompts)
            batch = list(range(next_index, next_index + want))
            while len(requests_) < batch[-1] + 1:
                requests_.append(next(gen))
            self.sample(split, batch, requests_)
            for i in batch:
                if len(rows) == n_pairs:
                    break
                counts["prompts"] += 1
                found = choose_pairs(requests_[i], self.responses(split, i), counts["hard"], len(rows),
                                     self.cfg.hard_fraction, min(per_prompt, n_pairs - len(rows)))
                counts["no_pair"] += not found
                for pair in found:
                    counts[pair["difficulty"]] += 1
                    rows.append({**pair, "prompt_index": i})
            next_index = batch[-1] + 1
        return rows, counts

    def record(self, built: dict) -> None:
        """`spoken.json`: the settings, the policy they resolved to and what each split took."""
        import json

        from aplot.outputs import write_json

        path = self.dir / "spoken.json"
        recorded = json.loads(path.read_text()) if path.exists() else {}
        splits = {**recorded.get("splits", {}), **built}
        write_json(path, {"settings": self.settings, "policy_path": str(self.policy()), "splits": splits,
                          "samples": len(self.samples.rows),
                          "labels": "synthetic: the embedded world's gold reward of each response text"})


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the two texts' word sets (1 for two empty texts)."""
    x, y = set(world.WORD_RE.findall(a.lower())), set(world.WORD_RE.findall(b.lower()))
    return len(x & y) / len(x | y) if x | y else 1.0


def choose_pair(request: str, responses: list[str], hard_so_far: int, pairs_so_far: int,
                hard_fraction: float, used=frozenset()) -> dict | None:
    """One pair among a prompt's samples (those not in `used`): hard when the mix so far is short of
    `hard_fraction` (and the samples have one), else easy, else whichever they have; None when no two samples
    differ enough."""
    golds = [world.gold_reward(request, r) for r in responses]
    candidates = {"hard": [], "easy": []}
    free = [a for a in range(len(responses)) if a not in used]
    for x, a in enumerate(free):
        for b in free[x + 1:]:
            gap = abs(golds[a] - golds[b])
            if gap < 1e-9:
                continue
            sim = similarity(responses[a], responses[b])
            if gap <= HARD_GAP:
                candidates["hard"].append((-sim, gap, a, b))  # the most similar texts, then the smallest gap
            elif gap >= EASY_GAP:
                candidates["easy"].append((-gap, sim, a, b))  # the largest gap, then the least similar texts
    order = ("hard", "easy") if hard_so_far < hard_fraction * (pairs_so_far + 1) else ("easy", "hard")
    found = [kind for kind in order if candidates[kind]]
    if not found:
        return None
    kind = found[0]
    *_, a, b = min(candidates[kind])
    if golds[a] < golds[b]:
        a, b = b, a
    return {"prompt": request, "chosen": responses[a].strip(), "rejected": responses[b].strip(), "difficulty": kind,
            "gold_gap": round(abs(golds[a] - golds[b]), 6), "chosen_gold": golds[a], "rejected_gold": golds[b],
            "chosen_sample": a, "rejected_sample": b}


def choose_pairs(request: str, responses: list[str], hard_so_far: int, pairs_so_far: int,
                 hard_fraction: float, k: int = 1) -> list[dict]:
    """Up to `k` pairs among a prompt's samples, each chosen as `choose_pair` chooses among the samples no
    earlier pair took: no response is in two pairs, as in preference data that compares each response once."""
    found, used = [], set()
    while len(found) < k:
        pair = choose_pair(request, responses, hard_so_far + sum(p["difficulty"] == "hard" for p in found),
                           pairs_so_far + len(found), hard_fraction, frozenset(used))
        if pair is None:
            break
        found.append(pair)
        used |= {pair["chosen_sample"], pair["rejected_sample"]}
    return found


def flip_labels(rows: list[dict], label_noise: float, seed: int) -> list[dict]:
    """Flip an exact, seeded subset of the pairs (`label_noise` of them), as the embedded world does."""
    flipped = set(random.Random(f"aplot-spoken/{seed}/label-noise").sample(range(len(rows)),
                                                                          round(label_noise * len(rows))))
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if i in flipped:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        row["label_flipped"] = i in flipped
        out.append(row)
    return out


def as_chat(row: dict) -> dict:
    """A pair in TRL's conversational layout: the request as one user turn, each response as one assistant turn."""
    return {**row, "prompt": chat_prompt(row["prompt"]),
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def spoken_split(data_cfg, split: str, train: bool = False, layout: str = "explicit"):
    """A split of the spoken world as preference pairs (built, or read from its cache) and its counts."""
    from datasets import Dataset

    if split not in world.SPLITS:
        raise UserError(f"the spoken world has no split {split!r}; it has {', '.join(world.SPLITS)}")
    if layout not in ("explicit", "conversational"):
        raise UserError(f"the spoken world comes as explicit or conversational pairs, not {layout!r}")
    spoken = SpokenWorld(data_cfg)
    n = data_cfg.n_train if train else data_cfg.n_eval
    rows, counts = spoken.pairs(split, n)
    spoken.record({split: {"pairs": len(rows), **counts}})
    rows = flip_labels(rows, data_cfg.label_noise if train else 0.0, data_cfg.world_seed)
    pairs = Dataset.from_list([as_chat(r) for r in rows] if layout == "conversational" else rows)
    return pairs, {"rows_read": len(rows), "kept": len(rows), "dropped": {}, "pairs": len(rows),
                   "spoken": {"dir": str(spoken.dir), **counts}}


def build(data_cfg) -> Path:
    """Build (or finish) every split a recipe reads: its training split and its eval splits."""
    start = time.perf_counter()
    spoken = SpokenWorld(data_cfg)
    sizes = {data_cfg.dataset_train_split: data_cfg.n_train,
             **{s: data_cfg.n_eval for s in data_cfg.eval_splits if s != data_cfg.dataset_train_split}}
    built = {}
    for split, n in sizes.items():
        if split not in world.SPLITS:
            raise UserError(f"the spoken world has no split {split!r}; it has {', '.join(world.SPLITS)}")
        rows, counts = spoken.pairs(split, n)
        built[split] = {"pairs": len(rows), **counts}
        print(f"spoken world: {split}: {len(rows)} pairs ({counts['hard']} hard, {counts['easy']} easy) from "
              f"{counts['prompts']} prompts, {counts['no_pair']} of them without a pair")
    spoken.record(built)
    print(f"spoken world: {spoken.dir} ({len(spoken.samples.rows)} samples; sampling took "
          f"{spoken.sample_seconds:.0f} s of {time.perf_counter() - start:.0f} s)")
    return spoken.dir


def main(argv=None) -> Path:
    from aplot.config import parse_rm_recipe

    data_cfg, _, _ = parse_rm_recipe(argv)
    if data_cfg.dataset_name != "spoken":
        raise UserError(f"dataset_name is {data_cfg.dataset_name!r}: this builds the spoken world (dataset_name: "
                        "spoken)")
    return build(data_cfg)


if __name__ == "__main__":  # vLLM starts its workers with spawn: the guard keeps them from rerunning this
    from aplot.errors import run_pipeline

    run_pipeline(main)
