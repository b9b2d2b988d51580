"""The benchmark's real-backbone section (`make bench-real`): bt against aplot, with APLOT's semantic cost from
the reward model's own hidden state and from a frozen MiniLM (`ot_embedder`), trained from SmolLM2-135M-Instruct
on the spoken world over seeds at 0 % and 30 % flipped labels; and Best-of-N of the real policy with them as
proxies. Writes benchmarks/real_backbone.json, and the section of RESULTS.md and its plot from it.

Training mode, chosen to fit 2 CPU cores: the top `top_layers` decoder layers, the final norm and a new score
head are trained and the layers below are frozen. The frozen layers run once per distinct text (`Trunk`) and the
trained part (`Head`) runs on what they gave, so a step costs top_layers / 30 of a whole model's forward and
backward. `Head` on the trunk's output scores exactly what the whole sequence-classification model scores
(tests/test_real_backbone.py). The loss is `aplot.objective`'s, called as `APLOTRewardTrainer.compute_loss`
calls it, in a plain PyTorch loop: TRL's trainer takes token ids, not cached hidden states. Texts are encoded
by the project's one encoding (`reward_model.tokenize_pairs`, the checkpoint's own chat template), and the
reward is read where the scorer and the trainer read it (the last non-pad token).

    python -m benchmarks.real_backbone [--form full|quick] [--results benchmarks]

The samples are drawn in a child process (vLLM's engine is gone when it exits) into the spoken world's own
resumable caches under `spoken_dir` (shared by the forms), so an interrupted run resumes its sampling.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Decoder families whose base model, given `inputs_embeds`, starts from them unchanged (Gemma scales its
# embeddings inside forward, so its top layers would see scaled inputs: not supported here).
SPLITTABLE = ("llama", "qwen2", "qwen3", "mistral")
METHODS = {  # name in the report: (loss_type, semantic cost)
    "bt": ("bt", None),
    "aplot": ("aplot", "own"),                # the score head's input, as `make rm` by default
    "aplot_minilm": ("aplot", "embedder"),    # a frozen sentence encoder's embeddings (`ot_embedder`)
}


@dataclass
class RealSettings:
    name: str
    seeds: tuple[int, ...]
    noise_levels: tuple[float, ...]
    n_train: int                      # training pairs (each run: `epochs` passes over them)
    n_eval: int                       # pairs per held-out split (test_id, test_ood)
    bon_prompts: int                  # Best-of-N: test_id prompts, `bon_samples` samples each
    bon_samples: int
    recipe: str = "recipes/rm/spoken-smollm2.yaml"   # the policy, sampling, backbone and objective settings
    spoken_samples: int = 4           # samples per prompt the pairs are chosen from
    pairs_per_prompt: int = 2         # pairs of distinct samples per prompt
    top_layers: int = 1
    # A pilot here (320 pairs, one seed, bt): 2 epochs at 1e-4 left test_id accuracy at 0.53 (loss 0.68), 4 at
    # 3e-4 gave 0.61, 4 at 1e-3 gave 0.66 (loss 0.31): a new head on one layer needs the larger rate.
    epochs: int = 4
    batch_pairs: int = 16
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    methods: tuple[str, ...] = tuple(METHODS)
    embedder: str = "minilm-l6"       # aplot_minilm's encoder: a preset (imported under outputs/lineage) or a folder
    bon_ns: tuple[int, ...] = (1, 4, 16, 64)
    extra: tuple[str, ...] = ()       # more recipe overrides (the tests' tiny policy)
    # The sample caches, shared by the forms: each is keyed by its sampling settings, and a form that asks for
    # fewer prompts reads the first ones of the other's.
    spoken_dir: str = "outputs/bench-real/spoken"

    def to_dict(self) -> dict:
        return asdict(self)


FULL = RealSettings(name="full", seeds=(0, 1, 2), noise_levels=(0.0, 0.3), n_train=600, n_eval=150,
                    bon_prompts=16, bon_samples=64)
# One seed (no verdicts), fewer pairs; its samples are the first of the full form's.
QUICK = RealSettings(name="quick", seeds=(0,), noise_levels=(0.0, 0.3), n_train=200, n_eval=60, bon_prompts=4,
                     bon_samples=64)
FORMS = {"full": FULL, "quick": QUICK}


# ------------------------------------------------------------------------------------------ the split model

class Trunk:
    """A decoder checkpoint cut in two: the frozen bottom layers, run once per distinct text (`features`),
    and a template of the trainable top (`head(seed)`: the top layers, the final norm, a new score head)."""

    def __init__(self, path: str, top_layers: int):
        from transformers import AutoModel

        from aplot.errors import UserError
        from aplot.reward_model import quiet_load_report

        with quiet_load_report():  # the base model of a causal LM leaves its lm_head unread: expected
            model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        config = model.config
        if config.model_type not in SPLITTABLE:
            raise UserError(f"{path}: a {config.model_type} model cannot be split into trunk and head here "
                            f"(supported: {', '.join(SPLITTABLE)})")
        n = config.num_hidden_layers
        if not 1 <= top_layers < n:
            raise UserError(f"top_layers must be between 1 and {n - 1} for {path}, got {top_layers}")
        top = copy.deepcopy(model)
        top.layers = top.layers[n - top_layers:]
        top.config = copy.deepcopy(config)
        top.config.num_hidden_layers = top_layers
        if getattr(config, "layer_types", None):
            top.config.layer_types = list(config.layer_types[n - top_layers:])
        top.embed_tokens = torch.nn.Embedding(1, config.hidden_size)  # never read: the head takes embeddings
        model.layers = model.layers[:n - top_layers]
        model.config.num_hidden_layers = n - top_layers
        if getattr(config, "layer_types", None):
            model.config.layer_types = list(config.layer_types[:n - top_layers])
        for p in model.parameters():
            p.requires_grad_(False)
        # (the bottom's config now says n - top_layers layers: the whole model's count is kept apart)
        self.bottom, self.top, self.config, self.n_layers = model, top, top.config, n
        # What the bottom layers give is what the final norm reads (a pre-hook: one place, any family).
        self._captured = None
        model.norm.register_forward_pre_hook(lambda module, args: setattr(self, "_captured", args[0]))
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.inference_mode()
    def features(self, ids: list[list[int]], pad_id: int, batch_size: int = 32, progress: str | None = None):
        """Compute (once) the bottom layers' output of every distinct sequence of `ids`."""
        from tqdm.auto import tqdm

        todo = sorted({tuple(x) for x in ids if tuple(x) not in self.cache}, key=len)
        for start in tqdm(range(0, len(todo), batch_size), desc=progress, disable=progress is None, leave=False):
            batch = todo[start:start + batch_size]
            input_ids, mask = pad(batch, pad_id)
            self.bottom(input_ids=input_ids, attention_mask=mask, use_cache=False)
            for row, seq in enumerate(batch):
                self.cache[seq] = self._captured[row, :len(seq)].float().clone()

    def head(self, seed: int) -> Head:
        torch.manual_seed(seed)
        return Head(copy.deepcopy(self.top), self.config)


class Head(torch.nn.Module):
    """The trainable top of a split reward model: decoder layers, final norm, and a score head initialised
    as transformers initialises a new one (normal, std `initializer_range`, no bias)."""

    def __init__(self, top, config):
        super().__init__()
        self.top = top
        self.score = torch.nn.Linear(config.hidden_size, 1, bias=False)
        torch.nn.init.normal_(self.score.weight, std=config.initializer_range)

    def forward(self, feats: list[torch.Tensor], read: list[int]):
        """Rewards of sequences given their trunk features, and the states the score head read."""
        width = max(f.shape[0] for f in feats)
        x = torch.zeros(len(feats), width, feats[0].shape[-1])
        mask = torch.zeros(len(feats), width, dtype=torch.long)
        for row, f in enumerate(feats):
            x[row, :f.shape[0]], mask[row, :f.shape[0]] = f, 1
        hidden = self.top(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        pooled = hidden[torch.arange(len(feats)), torch.tensor(read)]
        return self.score(pooled).squeeze(-1), pooled


def pad(seqs, pad_id):
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, s in enumerate(seqs):
        input_ids[row, :len(s)], mask[row, :len(s)] = torch.tensor(s), 1
    return input_ids, mask


def read_index(seq, pad_id) -> int:
    """Where the reward is read: the last non-pad token (the rule of `ScoreInputCapture.pooled` and of
    transformers' sequence-classification pooling; SmolLM2's chat turns end `<|im_end|>\\n`, so the last token
    is the newline, never the pad)."""
    return max((i for i, t in enumerate(seq) if t != pad_id), default=0)


# ------------------------------------------------------------------------------------------ data

def recipe_args(s: RealSettings, **overrides) -> list[str]:
    samples = overrides.get("spoken_samples", s.spoken_samples)
    # Large chunks: vLLM's CPU build drew 2.5-2.7 samples a second here at 256 sequences a step, 1.5 at 64. The
    # same chunks wherever the pairs are read, so reading them never asks for a prompt the build did not
    # sample (and so never starts a sampler).
    base = {"n_train": s.n_train, "n_eval": s.n_eval, "spoken_samples": samples,
            "spoken_pairs_per_prompt": s.pairs_per_prompt, "spoken_dir": s.spoken_dir,
            "spoken_chunk_prompts": max(1, 256 // samples), **overrides}
    return ["--config", s.recipe, *[a for k, v in base.items() for a in (f"--{k}", str(v))], *s.extra]


def data_config(s: RealSettings, **overrides):
    from aplot.config import parse_rm_recipe

    return parse_rm_recipe(recipe_args(s, **overrides))


def sample(s: RealSettings) -> dict:
    """Every sample the section reads, drawn in this process (run as a child by `main`): the pairs' prompts
    and the Best-of-N prompts, each into its spoken-world cache."""
    from aplot.data import spoken

    start = time.perf_counter()
    data_cfg, _, _ = data_config(s)
    built = str(spoken.build(data_cfg))
    bon_cfg, _, _ = data_config(s, spoken_samples=s.bon_samples, spoken_pairs_per_prompt=1)
    world = spoken.SpokenWorld(bon_cfg)
    world.sample("test_id", list(range(s.bon_prompts)), spoken.first_requests("test_id", bon_cfg.world_seed,
                                                                             s.bon_prompts))
    return {"pairs_dir": built, "bon_dir": str(world.dir), "seconds": time.perf_counter() - start}


def load_pairs(s: RealSettings, noise: float):
    """The training pairs (labels flipped as `noise` says) and the held-out splits, from the cache."""
    from aplot.data import spoken

    data_cfg, args, model_cfg = data_config(s, label_noise=noise)
    train, counts = spoken.spoken_split(data_cfg, "train", train=True, layout="conversational")
    evals = {split: spoken.spoken_split(data_cfg, split, layout="conversational")[0] for split in ("test_id",
                                                                                                  "test_ood")}
    return train, evals, counts, data_cfg, args, model_cfg


def bon_samples(s: RealSettings):
    """requests, responses [P][N] and their gold rewards, from the Best-of-N cache."""
    from aplot.data import spoken, world

    bon_cfg, _, _ = data_config(s, spoken_samples=s.bon_samples, spoken_pairs_per_prompt=1)
    cache = spoken.SpokenWorld(bon_cfg)
    requests = spoken.first_requests("test_id", bon_cfg.world_seed, s.bon_prompts)
    responses = [cache.responses("test_id", i) for i in range(s.bon_prompts)]
    if any(r is None for r in responses):
        raise RuntimeError(f"{cache.dir}: Best-of-N samples missing (the sampling step did not finish)")
    gold = [[world.gold_reward(q, r) for r in rs] for q, rs in zip(requests, responses)]
    return requests, responses, gold


# ------------------------------------------------------------------------------------------ training

def train_and_evaluate(trunk: Trunk, method: str, seed: int, s: RealSettings, train, evals, args, pad_id,
                       embedder=None, bon=None) -> dict:
    """One reward model: train the head on `train` for `s.epochs`, then score the held-out pairs (and the
    Best-of-N samples). The loss and margin are `aplot.objective`'s, with the recipe's gamma, epsilon, ..."""
    from transformers import get_cosine_schedule_with_warmup

    from aplot import objective
    from aplot.embedder import response_text

    loss_type, cost = METHODS[method]
    head = trunk.head(seed)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    n = len(train["chosen_ids"])
    steps_per_epoch = math.ceil(n / s.batch_pairs)
    total = steps_per_epoch * s.epochs
    schedule = get_cosine_schedule_with_warmup(optimizer, round(s.warmup_fraction * total), total)
    chosen_ids, rejected_ids = train["chosen_ids"], train["rejected_ids"]
    texts = ([response_text(c) for c in train["chosen"]], [response_text(r) for r in train["rejected"]])
    generator = torch.Generator().manual_seed(seed)
    start, margins, losses = time.perf_counter(), [], []
    head.train()
    for _ in range(s.epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for b in range(0, n, s.batch_pairs):
            batch = order[b:b + s.batch_pairs]
            seqs = [chosen_ids[i] for i in batch] + [rejected_ids[i] for i in batch]
            rewards, pooled = head([trunk.cache[tuple(x)] for x in seqs], [read_index(x, pad_id) for x in seqs])
            chosen, rejected = rewards.chunk(2)
            margin = None
            if loss_type == "aplot":
                if cost == "own":
                    hidden_c, hidden_r = pooled.detach().chunk(2)
                else:
                    hidden_c = embedder.embed([texts[0][i] for i in batch])
                    hidden_r = embedder.embed([texts[1][i] for i in batch])
                margin = objective.ot_margin(chosen.detach(), rejected.detach(), hidden_c, hidden_r,
                                             gamma=args.gamma, epsilon=args.epsilon, n_iters=args.sinkhorn_iters,
                                             scale=args.margin_scale)
                margins.append(margin.mean().item())
            loss = objective.preference_loss(chosen, rejected, margin)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    train_seconds = time.perf_counter() - start
    head.eval()
    record = {"method": method, "seed": seed, "steps": total, "train_seconds": round(train_seconds, 1),
              "final_loss": sum(losses[-steps_per_epoch:]) / min(len(losses), steps_per_epoch),
              "margin_mean": sum(margins) / len(margins) if margins else None}
    for split, pairs in evals.items():
        rc, rr = score(head, trunk, pairs["chosen_ids"], pad_id), score(head, trunk, pairs["rejected_ids"], pad_id)
        right = (rc > rr).float()
        hard = torch.tensor([d == "hard" for d in pairs["difficulty"]])
        key = {"test_id": "id", "test_ood": "ood"}[split]
        record[f"{key}_acc"] = right.mean().item()
        record[f"{key}_hard_acc"] = right[hard].mean().item() if hard.any() else None
        record[f"{key}_margin"] = (rc - rr).mean().item()
    if bon is not None:
        record["bon_scores"] = score(head, trunk, bon, pad_id).tolist()
    return record


@torch.no_grad()
def score(head: Head, trunk: Trunk, ids, pad_id, batch_size: int = 64) -> torch.Tensor:
    out = torch.empty(len(ids))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        out[batch] = head([trunk.cache[tuple(ids[i])] for i in batch], [read_index(ids[i], pad_id) for i in batch])[0]
    return out


# ------------------------------------------------------------------------------------------ the section

def best_of_n_table(records, gold, ns) -> dict:
    """Gold at N for each proxy (exact order statistics, `aplot.bon.best_of_n`) and for gold itself."""
    import numpy as np

    from aplot import bon

    gold = np.asarray(gold, dtype=float)
    shape = gold.shape
    table = {"ceiling": {n: g for n, (g, _) in bon.best_of_n(gold, gold, ns).items()}, "proxies": []}
    for r in records:
        proxy = np.asarray(r.pop("bon_scores"), dtype=float).reshape(shape)
        table["proxies"].append({"method": r["method"], "seed": r["seed"],
                                 "gold": {n: g for n, (g, _) in bon.best_of_n(proxy, gold, ns).items()}})
    return table


def run(s: RealSettings, work: Path, log=print) -> dict:
    from aplot import lineage
    from aplot.embedder import SentenceEmbedder
    from aplot.reward_model import RewardScorer, load_tokenizer, tokenize_pairs

    results = {"runs": [], "timing": {}}
    t = time.perf_counter()
    # The samples: in a child process, so vLLM's engine (and its memory) is gone before training starts.
    child = subprocess.run([sys.executable, "-m", "benchmarks.real_backbone", "--sample-only", "--settings",
                            json.dumps(s.to_dict()), "--work", str(work)], check=False)
    if child.returncode:
        raise RuntimeError(f"sampling failed (exit {child.returncode}); its output is above")
    results["sampling"] = json.loads((work / "sampling.json").read_text())
    results["sampling"]["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
    results["timing"]["sampling_s"] = round(time.perf_counter() - t, 1)
    log(f"sampling: {results['timing']['sampling_s']:.0f} s")

    t = time.perf_counter()
    data_cfg, args, model_cfg = data_config(s)
    # the directory `make rm` would start from (an imported preset's weights), and its tokenizer
    backbone = lineage.model_path(model_cfg.model_name_or_path, model_cfg.init_from, model_cfg.lineage_dir)
    tokenizer = load_tokenizer(backbone)
    pad_id = tokenizer.pad_token_id
    trunk = Trunk(backbone, s.top_layers)
    splits = {}
    evals = None
    for noise in s.noise_levels:
        train, held_out, counts, *_ = load_pairs(s, noise)
        train, long_train = tokenize_pairs(train, tokenizer, args.max_length)
        if evals is None:  # the held-out splits are the same at every noise level: tokenised once
            evals = {k: tokenize_pairs(v, tokenizer, args.max_length)[0] for k, v in held_out.items()}
        splits[noise] = (train, evals)
        results.setdefault("pairs", {"train": counts["spoken"], "truncated_train": long_train,
                                     **{k: len(v) for k, v in evals.items()}})
    requests, responses, gold = bon_samples(s)
    scorer = RewardScorer(None, tokenizer, max_length=args.max_length, chat=True)
    bon_ids = scorer.encode_all([q for q, rs in zip(requests, responses) for _ in rs],
                                [r for rs in responses for r in rs])
    all_ids = [x for train, evals in splits.values() for d in (train, *evals.values())
               for col in ("chosen_ids", "rejected_ids") for x in d[col]] + bon_ids
    trunk.features(all_ids, pad_id, progress="frozen layers, once per text")
    results["timing"]["trunk_s"] = round(time.perf_counter() - t, 1)
    results["trunk"] = {"backbone": str(backbone), "layers": trunk.n_layers,
                        "trained_layers": s.top_layers, "texts": len(trunk.cache),
                        "mean_tokens": sum(len(k) for k in trunk.cache) / len(trunk.cache)}
    log(f"frozen layers over {len(trunk.cache)} texts: {results['timing']['trunk_s']:.0f} s")

    embedder = None
    if any(METHODS[m][1] == "embedder" for m in s.methods):
        embedder = SentenceEmbedder(lineage.model_path(s.embedder, "sft"))
    t = time.perf_counter()
    for noise, (train, evals) in splits.items():
        for seed in s.seeds:
            for method in s.methods:
                record = train_and_evaluate(trunk, method, seed, s, train, evals, args, pad_id, embedder,
                                            bon_ids if noise == 0 else None)
                record["noise"] = noise
                results["runs"].append(record)
                log(f"{method} seed {seed} noise {noise:.0%}: test_id {record['id_acc']:.3f} test_ood "
                    f"{record['ood_acc']:.3f} ({record['train_seconds']:.0f} s)")
    results["timing"]["training_s"] = round(time.perf_counter() - t, 1)
    results["bon"] = best_of_n_table([r for r in results["runs"] if "bon_scores" in r], gold, s.bon_ns)
    results["bon"].update(prompts=len(requests), samples=len(responses[0]))
    results["recipe"] = {"gamma": args.gamma, "epsilon": args.epsilon, "sinkhorn_iters": args.sinkhorn_iters,
                         "margin_scale": args.margin_scale, "max_length": args.max_length,
                         "spoken_policy": data_cfg.spoken_policy, "model": str(model_cfg.model_name_or_path)}
    return results


def main(argv=None) -> dict:
    from benchmarks import report
    from benchmarks.run import CONFIDENCE, environment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--form", choices=sorted(FORMS), default="full")
    parser.add_argument("--work", default=None, help="work directory (default outputs/bench-real/<form>)")
    parser.add_argument("--results", default="benchmarks", help="where real_backbone.json, RESULTS.md and plots go")
    parser.add_argument("--settings", default=None, help=argparse.SUPPRESS)  # the child's settings, as json
    parser.add_argument("--sample-only", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.settings:
        raw = json.loads(opts.settings)
        s = RealSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    else:
        s = FORMS[opts.form]
    work = Path(opts.work or f"outputs/bench-real/{s.name}")
    work.mkdir(parents=True, exist_ok=True)
    if opts.sample_only:
        (work / "sampling.json").write_text(json.dumps(sample(s), indent=1))
        return {}
    started, t0 = datetime.datetime.now().astimezone(), time.perf_counter()
    results = {"form": s.name, "settings": s.to_dict(), "confidence": CONFIDENCE,
               "started": started.isoformat(timespec="seconds"), "environment": environment(),
               **run(s, work, lambda m: print(f"{time.perf_counter() - t0:6.0f} s  {m}", flush=True))}
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    results["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    file = report.write_section(opts.results, "real_backbone.json", results)
    print(f"wrote {file}; {results['wall_seconds'] / 60:.1f} min in all")
    return results


if __name__ == "__main__":  # vLLM starts its workers with spawn: the guard keeps them from rerunning this
    main()
