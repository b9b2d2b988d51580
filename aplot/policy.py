"""The policy stage that PPO and RLOO share: their common recipe keys, the policy/reward-model tokenizer
and template check, the gold-reward evaluation against KL during training, resume bookkeeping and the
stage's outputs. `aplot.ppo` and `aplot.rloo` add only what their TRL trainer needs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from aplot.errors import UserError


@dataclass
class PolicyStageConfig:
    """Where the policy, the prompts, the reward model and the gold reward come from, and how the policy is
    evaluated: the keys PPO and RLOO share. Listed first among a stage config's bases, so these defaults
    win over a TRL config's fields of the same name."""

    sft_model_path: str = field(default="embedded", metadata={
        "help": "The policy to optimise (and its frozen reference): a directory or hub id, or a model "
                "preset (recipes/models/<name>/) whose SFT policy is built once and reused; 'embedded' is "
                "the tiny-qwen2 preset."})
    lineage_dir: str = field(default="outputs/lineage", metadata={
        "help": "Where a preset's tokenizer, base LM and SFT policy are built once and reused."})
    reward_model_path: str = field(default="outputs/rm/embedded-aplot", metadata={
        "help": "The proxy reward model the policy is optimised against: a `make rm` output directory or hub id."})
    retokenize_rewards: bool = field(default=False, metadata={
        "help": "When the trainer would hand the reward model other token ids than it was trained on: decode "
                "each response and re-encode it as the reward model was trained (off: such a pair is refused "
                "at start-up)."})
    gold: str = field(default="embedded", metadata={
        "help": "'embedded' (the world's gold function) or a sequence-classification gold reward model."})
    prompt_dataset: str = field(default="embedded", metadata={
        "help": "Where prompts come from: 'embedded' or a dataset (hub name or local file) as in rm recipes."})
    prompt_config: str | None = field(default=None, metadata={"help": "Hub configuration of prompt_dataset."})
    prompt_format: str = field(default="explicit", metadata={"help": "Format of prompt_dataset (rm recipes)."})
    prompt_columns: dict[str, str] | None = field(default=None, metadata={"help": "Column mapping."})
    prompt_split: str = field(default="train", metadata={"help": "Split whose prompts the policy trains on."})
    n_prompts: int = field(default=2048, metadata={"help": "Distinct training prompts."})
    eval_prompt_split: str = field(default="test_id", metadata={"help": "Split of the held-out gold-eval prompts."})
    n_eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts of each gold evaluation."})
    eval_samples_per_prompt: int = field(default=4, metadata={"help": "Samples per held-out prompt."})
    gold_eval_steps: int = field(default=10, metadata={
        "help": "Evaluate gold reward, proxy reward and KL every this many updates (and before the first and "
                "after the last)."})
    world_seed: int = field(default=0, metadata={"help": "Embedded world seed (prompts)."})
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "Drop prompts longer than this many policy tokens (counted in metrics.json)."})
    score_max_length: int | None = field(default=None, metadata={"help": "Scorers keep the last N tokens."})
    score_batch_size: int = field(default=64, metadata={"help": "Sequences per scoring batch."})
    dtype: str | None = field(default=None, metadata={"help": "dtype of the policy and reward models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    normalize_rewards: bool = field(default=False, metadata={
        "help": "Optimise (r - mean) / std, with the reward stats `make rm` wrote into the reward model's "
                "config.json (the proxy reward of the gold evaluation is reported so too)."})
    reward_clip: float | None = field(default=None, metadata={
        "help": "Clip the optimised reward to [-reward_clip, reward_clip], after normalising (unset: off)."})
    resume: bool = field(default=True, metadata={
        "help": "Continue from the latest checkpoint in output_dir when there is one."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_dir that holds files no aplot run made (files of the same names are "
                "replaced, the others kept); off, such a directory is refused."})

    def check_policy_stage(self, trainer_keys: dict[str, int] | None = None) -> None:
        """Range checks, before any work, of the shared keys that size work and of the trainer's own
        `trainer_keys` (each at least 1 and at most its bound)."""
        from aplot.config import MAX_BATCH, MAX_ITERS, MAX_PAIRS, MAX_SEED, MAX_TOKENS, check_dtype, check_range

        bounds = {"n_prompts": MAX_PAIRS, "n_eval_prompts": MAX_PAIRS, "eval_samples_per_prompt": MAX_BATCH,
                  "score_batch_size": MAX_BATCH, "per_device_train_batch_size": MAX_BATCH,
                  "gradient_accumulation_steps": MAX_BATCH, **(trainer_keys or {})}
        for key, high in bounds.items():
            check_range(key, getattr(self, key), low=1, high=high)
        for key in ("max_prompt_length", "score_max_length"):
            if getattr(self, key) is not None:
                check_range(key, getattr(self, key), low=1, high=MAX_TOKENS)
        check_range("num_train_epochs", self.num_train_epochs, low=0, high=MAX_ITERS, low_open=True)
        check_dtype(self.dtype)
        for key in ("seed", "world_seed"):
            check_range(key, getattr(self, key), low=0, high=MAX_SEED)
        check_range("gold_eval_steps", self.gold_eval_steps, low=0)
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        if self.reward_clip is not None:
            check_range("reward_clip", self.reward_clip, low=0.0, low_open=True)

    def offline_wandb(self) -> None:
        if "wandb" in (self.report_to or []):
            os.environ.setdefault("WANDB_MODE", "offline")


# What a checkpoint's run must share with the rerun that resumes it, whichever trainer made it; each stage
# adds its trainer's own keys.
RUN_KEYS = ("sft_model_path", "reward_model_path", "retokenize_rewards", "gold", "prompt_dataset", "prompt_config",
            "prompt_format", "prompt_split", "n_prompts", "max_prompt_length", "eval_prompt_split", "n_eval_prompts",
            "eval_samples_per_prompt", "world_seed", "num_train_epochs", "per_device_train_batch_size",
            "gradient_accumulation_steps", "temperature", "learning_rate", "lr_scheduler_type", "seed", "dtype",
            "world_size", "normalize_rewards", "reward_clip")
# A policy-stage checkpoint's last file (the trainer subclasses write it after everything else): its
# presence marks the checkpoint complete.
GOLD_HISTORY = "gold_history.json"
RESULTS = ("metrics.json", "gold_curve.json", "gold_vs_kl.png", "training_args.bin", "README.md")


def run_settings(args, keys: tuple[str, ...]) -> dict:
    return {key: getattr(args, key) for key in keys}


def encode_prompts(tokenizer, prompts, max_length, add_special_tokens: bool = False):
    """The policy's query ids for each prompt (its chat template for conversations); prompts longer
    than `max_length` become None and are counted. `add_special_tokens` as the trainer encodes plain
    prompts (PPO's datasets are encoded without them, RLOO's trainer with them)."""
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
           if isinstance(p, list) else tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
           for p in prompts]
    ids = [list(x) for x in ids]
    too_long = sum(max_length is not None and len(x) > max_length for x in ids)
    if too_long:
        ids = [x if len(x) <= max_length else None for x in ids]
    return ids, {"prompts": len(prompts), "too_long": too_long}


def load_policy_tokenizer(policy_path: str, trainer: str, trust_remote_code: bool = False,
                          allow_eos_pad: bool = False):
    """The policy's tokenizer, left-padded, with a pad token distinct from eos: both trainers find the end
    of each response by its padding, so padding must not look like eos. `allow_eos_pad`: the caller gives
    such a policy another pad of its own (PPO: `aplot.ppo.distinct_pad`)."""
    from aplot.reward_model import check_weights, load_tokenizer

    check_weights(policy_path, "policy", trust_remote_code)
    tokenizer = load_tokenizer(policy_path, trust_remote_code)
    if not allow_eos_pad and (tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id):
        raise UserError(f"{policy_path}: the tokenizer needs a pad token distinct from eos for {trainer}")
    tokenizer.padding_side = "left"
    return tokenizer


def check_model_paths(args) -> None:
    """Each model a policy-stage recipe names is there, complete and loadable under the one loading policy
    (`aplot.reward_model.check_weights`), before any work (one line otherwise)."""
    from aplot.config import check_model_source
    from aplot.reward_model import check_reward_model, check_weights

    check_model_source(args.sft_model_path, "policy", args.trust_remote_code)
    for path in (args.reward_model_path, args.gold):
        if path != "embedded":
            check_reward_model(path, args.trust_remote_code)
    if getattr(args, "value_model_path", None) is not None:
        check_weights(args.value_model_path, "value model", args.trust_remote_code)


def run_plan(args, stage: str, settings: dict, checkpoint_models: tuple[str, ...] = (".",)):
    """Where a policy-stage run in `output_dir` starts (`aplot.outputs.RunPlan`): read-only, so an output_dir
    that is not this stage's or is or holds an input model, and a checkpoint of other settings, are refused
    before any work; a resumed checkpoint's models (`checkpoint_models`, relative to it) are held to the one
    loading policy."""
    from aplot.outputs import RunPlan
    from aplot.reward_model import check_weights

    inputs = {key: getattr(args, key, None) for key in ("sft_model_path", "reward_model_path", "value_model_path",
                                                         "gold")}
    plan = RunPlan(Path(args.output_dir), args.resume, settings, results=RESULTS, marker=GOLD_HISTORY, stage=stage,
                   overwrite=args.overwrite_output_dir, inputs=inputs)
    for part in checkpoint_models if plan.checkpoint is not None else ():
        check_weights(str(plan.checkpoint / part), "checkpoint", args.trust_remote_code)
    return plan


def load_scorers(args):
    """The reward model and the proxy scorer over it (the reward the policy is optimised against, encoded as
    every stage scores text), and the gold reward ("embedded", or a scorer)."""
    from aplot.reward_model import RewardScorer, load_reward_model

    reward_model, reward_tokenizer = load_reward_model(args.reward_model_path, device="cpu", dtype=args.dtype,
                                                       trust_remote_code=args.trust_remote_code)
    proxy = RewardScorer(reward_model, reward_tokenizer, args.score_batch_size, args.score_max_length,
                         normalize=args.normalize_rewards)
    gold = args.gold
    if gold != "embedded":
        gold_model, gold_tokenizer = load_reward_model(gold, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        gold = RewardScorer(gold_model, gold_tokenizer, args.score_batch_size, args.score_max_length)
    return reward_model, reward_tokenizer, proxy, gold


def load_stage_prompts(args):
    """The training prompts and the held-out gold-evaluation prompts of a policy-stage recipe."""
    from aplot.data import load_prompts

    prompts = load_prompts(args.prompt_dataset, args.prompt_split, args.n_prompts, args.prompt_format,
                           args.prompt_config, args.prompt_columns, args.world_seed)
    eval_prompts = load_prompts(args.prompt_dataset, args.eval_prompt_split, args.n_eval_prompts, args.prompt_format,
                                args.prompt_config, args.prompt_columns, args.world_seed)
    return prompts, eval_prompts


def same_tokenizer(policy_tokenizer, reward_tokenizer) -> str | None:
    """None when both map every token to the same id; else what differs, for the error message."""
    a, b = policy_tokenizer.get_vocab(), reward_tokenizer.get_vocab()
    if a == b:
        return None
    if len(a) != len(b):
        return f"{len(a)} tokens against {len(b)}"
    token = next(t for t in a if a[t] != b.get(t))
    return f"token {token!r} is id {a[token]} against {b.get(token)}"


def probe_response(prompt) -> str:
    """The response text the start-up check sends through both renderings."""
    return "apple river" if isinstance(prompt, list) else " apple river"


def first_difference(scored: list[int], trained: list[int], tokenizer, trainer: str) -> str | None:
    """None when a trainer hands the reward model the very ids it was trained on (`trained`, from the shared
    scorer's encoding of the same text); else where the two part, for the error message."""
    if list(scored) == list(trained):
        return None
    at = next((i for i, (a, b) in enumerate(zip(scored, trained)) if a != b), min(len(scored), len(trained)))
    shown = [repr(tokenizer.decode(ids[max(0, at - 3):at + 3])) for ids in (scored, trained)]
    return (f"render responses differently ({trainer} scores ...{shown[0]} where the reward model was trained on "
            f"...{shown[1]})")


def refuse_mismatch(args, policy_path: str, mismatch: str | None, trainer: str) -> None:
    """The one-line refusal of a policy/reward-model pair the trainer would score wrongly, unless bridged."""
    if mismatch and not args.retokenize_rewards:
        raise UserError(f"policy {policy_path} and reward model {args.reward_model_path} {mismatch}: {trainer} would "
                        "score token ids the reward model reads differently; set retokenize_rewards: true to "
                        "decode each response and re-encode it as the reward model was trained, or use a reward "
                        "model trained with the policy's tokenizer and layout")


class GoldEvaluation(TrainerCallback):
    """Before the first update, every `gold_eval_steps` updates and after the last: sample on held-out
    prompts, score with the gold reward and the proxy, and estimate KL(policy || reference).

    The KL is the sequence-level Monte Carlo estimate sum_t log pi(y_t) - log ref(y_t) over the
    sampled response tokens, at the sampling temperature the trainer trains with. The same code measures
    PPO and RLOO, so their curves compare; `max_new_tokens` is the trainer's response length.
    """

    def __init__(self, args, prompts: list, tokenizer, proxy, gold, *, max_new_tokens: int, batch_size: int,
                 step_offset: int = 0, history: list | None = None):
        self.args, self.prompts, self.tokenizer = args, prompts, tokenizer
        self.proxy, self.gold = proxy, gold  # RewardScorer; a RewardScorer or "embedded"
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.trainer = None  # set once the trainer exists: the callback needs its live models
        self.step_offset = step_offset  # PPO counts a resumed run's updates from 0, the Trainer from the checkpoint
        self.history = history if history is not None else []

    def set_trainer(self, trainer, query_ids: list[list[int]], policy=lambda unwrapped: unwrapped, reference=None):
        """`policy` picks the policy out of the trainer's unwrapped model (PPO's wraps policy and value
        model); `reference` is the frozen model the KL is measured against (default the trainer's)."""
        self.trainer, self.query_ids, self.policy_of = trainer, query_ids, policy
        self.reference = reference

    def on_train_begin(self, args, state, control, **kwargs):
        if not any(h["step"] == self.step_offset + state.global_step for h in self.history):
            self.evaluate(self.step_offset + state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        step = self.step_offset + state.global_step
        every = self.args.gold_eval_steps
        if (every and state.global_step % every == 0) or state.global_step == state.max_steps:
            self.evaluate(step)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        from accelerate.utils import gather_object
        from trl.models.utils import unwrap_model_for_generation

        from aplot.bon import as_response

        trainer, args = self.trainer, self.args
        accelerator = trainer.accelerator
        reference = self.reference if self.reference is not None else trainer.ref_model
        # Each rank evaluates its share of the prompts; the results are gathered in order.
        mine = list(range(len(self.prompts)))[accelerator.process_index::accelerator.num_processes]
        queries = [self.query_ids[i] for i in mine for _ in range(args.eval_samples_per_prompt)]
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        rows = []
        generator = torch.Generator().manual_seed(args.seed + 7919 * step + accelerator.process_index)
        # The trainer's prepared model (PPO's wraps policy and value model, and sets `model_wrapped` only once
        # its loop runs; the Trainer's RLOO keeps the unwrapped model in `model`).
        model = getattr(trainer, "model_wrapped", None) or trainer.model
        with unwrap_model_for_generation(model, accelerator,
                                         gather_deepspeed3_params=args.ds3_gather_for_generation) as unwrapped:
            policy = self.policy_of(unwrapped)
            policy.eval()
            for start in range(0, len(queries), self.batch_size):
                batch = queries[start:start + self.batch_size]
                width = max(map(len, batch))
                query = torch.tensor([[pad] * (width - len(q)) + q for q in batch], device=accelerator.device)
                mask = query != pad
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
                out = policy.generate(input_ids=query, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                      do_sample=True, temperature=args.temperature + 1e-7, top_k=0, top_p=1.0,
                                      pad_token_id=pad, eos_token_id=eos)
                response = out[:, width:]
                # Tokens after the first eos are padding: neither scored nor counted in the KL.
                ends = first_true_indices(response == eos) if eos is not None else response.shape[1]
                positions = torch.arange(response.shape[1], device=response.device)
                valid = positions[None, :] <= torch.as_tensor(ends, device=response.device).reshape(-1, 1)
                valid &= response != pad
                full = torch.cat([query, torch.where(valid, response, pad)], 1)
                logp = self._logprobs(policy, full, width, pad, args.temperature)
                ref = self._logprobs(reference, full, width, pad, args.temperature)
                kl = ((logp - ref) * valid).sum(1)
                texts = self.tokenizer.batch_decode(torch.where(valid, response, pad), skip_special_tokens=True)
                rows += [(t, float(k)) for t, k in zip(texts, kl)]
            policy.train()

        prompts = [self.prompts[i] for i in mine for _ in range(args.eval_samples_per_prompt)]
        texts = [t for t, _ in rows]
        responses = [as_response(p, t) for p, t in zip(prompts, texts)]
        proxy = self.proxy.score(prompts, responses).tolist()
        if self.gold == "embedded":
            from aplot.data.world import gold_reward

            gold = [gold_reward(p, t) for p, t in zip(prompts, texts)]
        else:
            gold = self.gold.score(prompts, responses).tolist()
        results = gather_object([(g, p, k, t) for g, p, (t, k) in zip(gold, proxy, rows)])
        point = {"step": step, "gold": mean(r[0] for r in results), "proxy": mean(r[1] for r in results),
                 "kl": mean(r[2] for r in results), "n": len(results),
                 "response_words": mean(len(r[3].split()) for r in results)}
        self.history.append(point)
        if accelerator.is_main_process:
            print(f"gold evaluation at update {step}: gold {point['gold']:.3f}  proxy {point['proxy']:.3f}  "
                  f"KL {point['kl']:.3f}")
        return point

    @staticmethod
    def _logprobs(model, full, context_length, pad, temperature):
        from trl.trainer.utils import selective_log_softmax

        # The forward TRL's PPO uses for its log-probs (mask and positions derived from the padding).
        mask = full != pad
        position_ids = mask.cumsum(1) - mask.long()
        logits = model(input_ids=torch.masked_fill(full, ~mask, 0), attention_mask=mask, position_ids=position_ids,
                       return_dict=True, output_hidden_states=True).logits
        logits = logits[:, context_length - 1:-1].float() / (temperature + 1e-7)
        return selective_log_softmax(logits, full[:, context_length:])


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Position of the first True in each row (the row's length where there is none)."""
    width = bools.size(-1)
    return torch.min(width * (~bools).long() + torch.arange(width, device=bools.device), dim=-1).values


def mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")


def plot_gold_vs_kl_curve(curves: dict[str, list[dict]], path) -> None:
    """Gold and proxy reward of the policy against its KL to the reference over training, one line
    per run (the policy-stage counterpart of the Best-of-N plot)."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    from aplot.evaluation import write_atomic

    fig, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, points in curves.items():
        kl = [p["kl"] for p in points]
        ax_gold.plot(kl, [p["gold"] for p in points], "o-", ms=3, label=name)
        ax_proxy.plot(kl, [p["proxy"] for p in points], "o-", ms=3, label=name)
    ax_gold.set(xlabel="KL(policy || reference), nats", ylabel="gold reward", title="gold reward during training")
    ax_proxy.set(xlabel="KL(policy || reference), nats", ylabel="proxy reward", title="proxy reward during training")
    ax_gold.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"))
    plt.close(fig)


def write_results(plan, metrics: dict, history: list, counts: dict, settings: dict, policy_path: str,
                  trainer: str, updates_name: str) -> None:
    """metrics.json, gold_curve.json, gold_vs_kl.png and the policy's model card, written beside the policy in
    the run's working directory and published into `plan.out` with it (main process only); then the
    before/after table on stdout."""
    from aplot.cards import write_model_card
    from aplot.evaluation import write_json

    out, work = plan.out, plan.work
    write_json(work / "metrics.json", metrics)
    write_json(work / "gold_curve.json", history)
    plot_gold_vs_kl_curve({out.name: history}, work / "gold_vs_kl.png")
    dropped = {"too long": counts["too_long"]} if counts["too_long"] else {}
    prompt_counts = {"rows_read": counts["prompts"], "kept": counts["prompts"] - counts["too_long"],
                     "dropped": dropped}
    write_model_card(work, kind="policy", base_model=str(policy_path), recipe=settings,
                     data_counts={"prompts": prompt_counts},
                     metrics={k: metrics[k] for k in ("reward_model", "gold", "updates", "train_seconds",
                                                      "before", "after")},
                     trainer=f"TRL's {trainer}")
    plan.publish()
    b, a = history[0], history[-1]
    print(f"{'':<8}{'gold':>8}{'proxy':>8}{'KL':>8}\n{'before':<8}{b['gold']:>8.3f}{b['proxy']:>8.3f}"
          f"{b['kl']:>8.3f}\n{'after':<8}{a['gold']:>8.3f}{a['proxy']:>8.3f}{a['kl']:>8.3f}")
    print(f"{metrics['updates']} {updates_name} in {metrics['train_seconds']:.0f} s; wrote {out}/ (model.safetensors, "
          "metrics.json, gold_curve.json, gold_vs_kl.png)")
