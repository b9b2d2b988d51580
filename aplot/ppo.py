"""PPO against a trained reward model: the stage's recipe keys, the policy/reward-model tokenizer
check (and the decode-and-re-encode bridge), and the gold-reward evaluation run during training."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from aplot.errors import UserError

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives in trl.experimental in the pinned TRL line
from trl.experimental.ppo import PPOConfig  # noqa: E402


@dataclass
class APLOTPPOConfig(PPOConfig):
    """TRL's `PPOConfig` (every `TrainingArguments` key too) plus where the prompts, reward models and
    gold reward come from. `sft_model_path` is the policy, `reward_model_path` a `make rm` output."""

    sft_model_path: str = field(default="embedded", metadata={
        "help": "The policy to optimise (and its frozen reference): a directory or hub id, or a model "
                "preset (recipes/models/<name>/) whose SFT policy is built once and reused; 'embedded' is "
                "the tiny-qwen2 preset."})
    lineage_dir: str = field(default="outputs/lineage", metadata={
        "help": "Where a preset's tokenizer, base LM and SFT policy are built once and reused."})
    reward_model_path: str = field(default="outputs/rm/embedded-aplot", metadata={
        "help": "The proxy reward model PPO optimises: a `make rm` output directory or hub id."})
    value_model_path: str | None = field(default=None, metadata={
        "help": "Where the value model starts; unset, from the reward model (from the policy when "
                "retokenize_rewards is on, since the value model reads the policy's tokens)."})
    retokenize_rewards: bool = field(default=False, metadata={
        "help": "When the policy and reward model tokenizers differ: decode each response and re-encode "
                "it for the reward model (off: such a pair is refused at start-up)."})
    gold: str = field(default="embedded", metadata={
        "help": "'embedded' (the world's gold function) or a sequence-classification gold reward model."})
    prompt_dataset: str = field(default="embedded", metadata={
        "help": "Where prompts come from: 'embedded' or a dataset (hub name or local file) as in rm recipes."})
    prompt_config: str | None = field(default=None, metadata={"help": "Hub configuration of prompt_dataset."})
    prompt_format: str = field(default="explicit", metadata={"help": "Format of prompt_dataset (rm recipes)."})
    prompt_columns: dict[str, str] | None = field(default=None, metadata={"help": "Column mapping."})
    prompt_split: str = field(default="train", metadata={"help": "Split whose prompts PPO trains on."})
    n_prompts: int = field(default=2048, metadata={"help": "Distinct training prompts."})
    eval_prompt_split: str = field(default="test_id", metadata={"help": "Split of the held-out gold-eval prompts."})
    n_eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts of each gold evaluation."})
    eval_samples_per_prompt: int = field(default=4, metadata={"help": "Samples per held-out prompt."})
    gold_eval_steps: int = field(default=10, metadata={
        "help": "Evaluate gold reward, proxy reward and KL every this many PPO updates (and before the "
                "first and after the last)."})
    world_seed: int = field(default=0, metadata={"help": "Embedded world seed (prompts)."})
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "Drop prompts longer than this many policy tokens (counted in metrics.json)."})
    score_max_length: int | None = field(default=None, metadata={"help": "Scorers keep the last N tokens."})
    score_batch_size: int = field(default=64, metadata={"help": "Sequences per scoring batch."})
    dtype: str | None = field(default=None, metadata={"help": "dtype of the policy, value and reward models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    normalize_rewards: bool = field(default=False, metadata={
        "help": "Optimise (r - mean) / std, with the reward stats `make rm` wrote into the reward model's "
                "config.json (the proxy reward of the gold evaluation is reported so too)."})
    reward_clip: float | None = field(default=None, metadata={
        "help": "Clip the reward PPO optimises to [-reward_clip, reward_clip], after normalising (unset: off)."})
    resume: bool = field(default=True, metadata={
        "help": "Continue from the latest checkpoint in output_dir when there is one."})

    def __post_init__(self):
        from aplot.config import check_range

        for key in ("n_prompts", "n_eval_prompts", "eval_samples_per_prompt", "score_batch_size",
                    "response_length", "num_ppo_epochs", "num_mini_batches", "per_device_train_batch_size"):
            check_range(key, getattr(self, key), low=1)
        check_range("gold_eval_steps", self.gold_eval_steps, low=0)
        check_range("kl_coef", self.kl_coef, low=0.0)
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        check_range("cliprange", self.cliprange, low=0.0, low_open=True)
        if self.reward_clip is not None:
            check_range("reward_clip", self.reward_clip, low=0.0, low_open=True)
        # PPOConfig turns TrainingArguments' `world_size` property into a field (None until the trainer
        # sets it), which a `deepspeed` config reads while the arguments are built: give it the launch's.
        if self.world_size is None:
            self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.deepspeed:
            # PPOTrainer builds its own Accelerator and never runs the Trainer's DeepSpeed set-up, so the
            # config goes to accelerate, as `accelerate launch --deepspeed_config_file` hands it over;
            # accelerate fills its "auto" values from the PPO batch sizes when the models are prepared.
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(self.deepspeed)
            self.deepspeed = None
        super().__post_init__()
        if "wandb" in (self.report_to or []):
            os.environ.setdefault("WANDB_MODE", "offline")


def same_tokenizer(policy_tokenizer, reward_tokenizer) -> str | None:
    """None when both map every token to the same id; else what differs, for the error message."""
    a, b = policy_tokenizer.get_vocab(), reward_tokenizer.get_vocab()
    if a == b:
        return None
    if len(a) != len(b):
        return f"{len(a)} tokens against {len(b)}"
    token = next(t for t in a if a[t] != b.get(t))
    return f"token {token!r} is id {a[token]} against {b.get(token)}"


def distinct_pad(tokenizer, query_ids: list[list[int]]) -> str:
    """A pad token for a policy that pads with its eos (SmolLM2: both `<|im_end|>`) or not at all.

    TRL's PPO takes every pad token for padding: it masks them out of the prompt (where a chat template's
    `<|im_end|>` closes each turn) and ends each response at the first one, before the eos. So the policy
    pads with another special token of its own vocabulary (no new embedding row), the first by id that no
    prompt contains and that is not eos: SmolLM2's `<|endoftext|>`. Generation still stops at the eos."""
    used = {t for ids in query_ids for t in ids}
    special = sorted(set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values()))
    for token_id in special:
        if token_id != tokenizer.eos_token_id and token_id not in used:
            return tokenizer.convert_ids_to_tokens(token_id)
    raise UserError(f"{tokenizer.name_or_path}: the tokenizer pads with its eos (or not at all) and has no other "
                    "special token that the prompts do not use, to pad with in PPO: give it a pad token")


def rendering_mismatch(policy_tokenizer, reward_scorer, prompt, query_ids: list[int]) -> str | None:
    """None when a response reaches the reward model, through PPO, as the very token ids it was trained
    to score (`reward_scorer` encodes as its training did); else where they part. PPO scores `query +
    sampled tokens + eos`; the reward model was trained on `prompt + response + eos`, or on its chat
    template's rendering of the conversation, which may differ (ChatML ends a turn with `<|im_end|>` and
    a newline PPO never samples)."""
    from aplot.bon import as_response

    text = "apple river" if isinstance(prompt, list) else " apple river"  # a probe response
    sampled = policy_tokenizer(text, add_special_tokens=False)["input_ids"] + [policy_tokenizer.eos_token_id]
    scored = list(query_ids) + sampled
    trained = reward_scorer.encode(prompt, as_response(prompt, text))
    if scored == trained:
        # Same ids; TRL's PPO reads the reward at the last one, the reward model at its last non-pad one,
        # which for a reward model padding with its eos (SmolLM2) is the token before that eos.
        pad = reward_scorer.model.config.pad_token_id
        read = max((i for i, t in enumerate(trained) if t != pad), default=len(trained) - 1)
        if read == len(trained) - 1:
            return None
        shown = [repr(policy_tokenizer.decode(trained[i:i + 1])) for i in (len(trained) - 1, read)]
        return (f"read the reward at different tokens (PPO at the final {shown[0]}, the reward model, which pads "
                f"with it, at {shown[1]} before it)")
    at = next((i for i, (a, b) in enumerate(zip(scored, trained)) if a != b), min(len(scored), len(trained)))
    shown = [repr(policy_tokenizer.decode(ids[max(0, at - 3):at + 3])) for ids in (scored, trained)]
    return (f"render responses differently (PPO scores ...{shown[0]} where the reward model was trained on "
            f"...{shown[1]})")


class RetokenizedReward(torch.nn.Module):
    """A reward model that reads the policy's token ids: each (prompt, response) is decoded with the
    policy tokenizer and re-encoded for the reward model exactly as the other stages score it.

    TRL's PPO calls `getattr(model, model.base_model_prefix)(input_ids=...)` then
    `model.score(hidden_states[-1])` and reads the score at the last response token; so the backbone
    here returns, at every position, the hidden state the real score head pools for that sequence.
    """

    base_model_prefix = "backbone"

    def __init__(self, scorer, policy_tokenizer, prompts: list, query_ids: list[list[int]]):
        super().__init__()
        from aplot.reward_model import score_head

        self.scorer, self.policy_tokenizer = scorer, policy_tokenizer
        self.score = score_head(scorer.model)
        self.queries = {tuple(q): p for q, p in zip(query_ids, prompts)}
        self.query_lengths = sorted({len(q) for q in query_ids})
        self.config = scorer.model.config

    def backbone(self, input_ids, attention_mask, **_):
        from aplot.bon import as_response

        prompts, responses = [], []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            ids = [i for i, m in zip(ids, mask) if m]  # drop left and right padding
            length = next((n for n in self.query_lengths if tuple(ids[:n]) in self.queries), None)
            if length is None:
                raise RuntimeError("a PPO sequence does not start with any known prompt")
            prompt = self.queries[tuple(ids[:length])]
            text = self.policy_tokenizer.decode(ids[length:], skip_special_tokens=True)
            prompts.append(prompt)
            responses.append(as_response(prompt, text))
        _, hidden = self.scorer.score(prompts, responses, return_hidden=True)
        hidden = hidden.to(input_ids.device, self.score.weight.dtype)
        states = hidden[:, None, :].expand(-1, input_ids.shape[1], -1)
        return _Output(hidden_states=(states,))

    def forward(self, *args, **kwargs):  # PPO only uses backbone + score
        raise NotImplementedError


class ScaledReward(torch.nn.Module):
    """The reward model as PPO sees it, its reward `clip((r - mean) / std, -clip, clip)`.

    TRL's PPO reads rewards through `get_reward`: `getattr(model, model.base_model_prefix)(...)` for the
    hidden states, then `model.score(...)`. This wrapper forwards the first to the wrapped model (a
    transformers reward model or RetokenizedReward) and rescales the second, so PPO's own code runs as
    it is and the reward model itself, which the proxy scorer also uses, is left unchanged.
    """

    base_model_prefix = "backbone"

    def __init__(self, reward_model, mean: float = 0.0, std: float = 1.0, clip: float | None = None):
        super().__init__()
        self.inner, self.mean, self.std, self.clip = reward_model, mean, std, clip
        self.config = reward_model.config

    def backbone(self, **kwargs):
        return getattr(self.inner, self.inner.base_model_prefix)(**kwargs)

    def score(self, hidden):
        reward = (self.inner.score(hidden) - self.mean) / self.std
        return reward.clamp(-self.clip, self.clip) if self.clip is not None else reward

    def forward(self, *args, **kwargs):  # PPO only uses backbone + score
        raise NotImplementedError


@dataclass
class _Output:
    hidden_states: tuple


class GoldEvaluation(TrainerCallback):
    """Before the first update, every `gold_eval_steps` updates and after the last: sample on held-out
    prompts, score with the gold reward and the proxy, and estimate KL(policy || reference).

    The KL is the sequence-level Monte Carlo estimate sum_t log pi(y_t) - log ref(y_t) over the
    sampled response tokens, at the sampling temperature PPO trains with.
    """

    def __init__(self, args: APLOTPPOConfig, prompts: list, tokenizer, proxy, gold, step_offset: int = 0,
                 history: list | None = None):
        self.args, self.prompts, self.tokenizer = args, prompts, tokenizer
        self.proxy, self.gold = proxy, gold  # RewardScorer; a RewardScorer or "embedded"
        self.trainer = None  # set once the trainer exists: the callback needs its live models
        self.step_offset = step_offset
        self.history = history if history is not None else []

    def on_train_begin(self, args, state, control, **kwargs):
        if not any(h["step"] == self.step_offset for h in self.history):
            self.evaluate(self.step_offset)

    def on_step_end(self, args, state, control, **kwargs):
        step = self.step_offset + state.global_step
        every = self.args.gold_eval_steps
        if (every and state.global_step % every == 0) or state.global_step == state.max_steps:
            self.evaluate(step)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        from trl.experimental.utils import first_true_indices
        from trl.models.utils import unwrap_model_for_generation

        from aplot.bon import as_response

        trainer, args = self.trainer, self.args
        accelerator = trainer.accelerator
        # Each rank evaluates its share of the prompts; the results are gathered in order.
        mine = list(range(len(self.prompts)))[accelerator.process_index::accelerator.num_processes]
        queries = [self.query_ids[i] for i in mine for _ in range(args.eval_samples_per_prompt)]
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        rows = []
        generator = torch.Generator().manual_seed(args.seed + 7919 * step + accelerator.process_index)
        with unwrap_model_for_generation(trainer.model, accelerator,
                                         gather_deepspeed3_params=args.ds3_gather_for_generation) as unwrapped:
            policy = unwrapped.policy
            policy.eval()
            for start in range(0, len(queries), args.local_rollout_forward_batch_size):
                batch = queries[start:start + args.local_rollout_forward_batch_size]
                width = max(map(len, batch))
                query = torch.tensor([[pad] * (width - len(q)) + q for q in batch], device=accelerator.device)
                mask = query != pad
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
                out = policy.generate(input_ids=query, attention_mask=mask, max_new_tokens=args.response_length,
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
                ref = self._logprobs(trainer.ref_model, full, width, pad, args.temperature)
                kl = ((logp - ref) * valid).sum(1)
                texts = self.tokenizer.batch_decode(torch.where(valid, response, pad), skip_special_tokens=True)
                rows += [(t, float(k)) for t, k in zip(texts, kl)]
            policy.train()
        from accelerate.utils import gather_object

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

    def set_trainer(self, trainer, query_ids: list[list[int]]):
        self.trainer, self.query_ids = trainer, query_ids

    @staticmethod
    def _logprobs(model, full, context_length, pad, temperature):
        from trl.experimental.ppo.ppo_trainer import forward
        from trl.trainer.utils import selective_log_softmax

        # The same forward (pad-derived mask and positions) PPO itself uses for its log-probs.
        logits = forward(model, full, pad).logits[:, context_length - 1:-1].float() / (temperature + 1e-7)
        return selective_log_softmax(logits, full[:, context_length:])


def mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")


def plot_gold_vs_kl_curve(curves: dict[str, list[dict]], path) -> None:
    """Gold and proxy reward of the policy against its KL to the reference over training, one line
    per run (the PPO counterpart of the Best-of-N plot)."""
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
    ax_gold.set(xlabel="KL(policy || reference), nats", ylabel="gold reward", title="gold reward during PPO")
    ax_proxy.set(xlabel="KL(policy || reference), nats", ylabel="proxy reward", title="proxy reward during PPO")
    ax_gold.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"))
    plt.close(fig)


def load_trainer_class():
    """TRL's PPOTrainer, with checkpoints that also hold what a resumed run needs (the value model
    and the gold-evaluation history), and a learning-rate schedule that can span an interrupted run."""
    from trl.experimental.ppo import PPOTrainer

    class APLOTPPOTrainer(PPOTrainer):
        schedule_steps: int | None = None  # the whole run's updates, when this trainer resumes one
        gold: GoldEvaluation | None = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Trainer.save_model (transformers >= 5.18) reads this attribute, set in Trainer.__init__,
            # which PPOTrainer does not call.
            self.is_distributed_loading_by_transformers = False

        def create_model_card(self, *args, **kwargs):
            pass  # TRL's card reads attributes a DDP-wrapped model lacks; the stage writes metrics.json

        def create_scheduler(self, num_training_steps, optimizer=None):
            return super().create_scheduler(self.schedule_steps or num_training_steps, optimizer)

        def parts(self) -> tuple[dict | None, dict | None]:
            """The policy's and the value model's full weights under DeepSpeed (gathered from every
            rank under ZeRO-3, so every rank must call it); (None, None) without DeepSpeed."""
            if not self.is_deepspeed_enabled:
                return None, None
            state = self.accelerator.get_state_dict(self.model)
            split = [{k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(p)} if state else None
                     for p in ("policy.", "value_model.")]
            return split[0], split[1]

        def save_model(self, output_dir=None, _internal_call=False):
            if not self.is_deepspeed_enabled:
                return super().save_model(output_dir, _internal_call)
            # transformers' DeepSpeed branch expects the Trainer's own engine; save the policy directly.
            policy_state, _ = self.parts()
            if self.args.should_save:
                output_dir = output_dir or self.args.output_dir
                self.accelerator.unwrap_model(self.model).policy.save_pretrained(output_dir, state_dict=policy_state)
                self.processing_class.save_pretrained(output_dir)

        def _save_checkpoint(self, model, trial):
            from pathlib import Path

            from aplot.evaluation import write_json

            # TRL numbers the checkpoint by this trainer's step; a resumed run counts from where it began.
            offset = self.gold.step_offset if self.gold else 0
            self.state.global_step += offset
            try:
                super()._save_checkpoint(model, trial)
                checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                _, value_state = self.parts()
                if self.args.should_save:
                    value_model = self.accelerator.unwrap_model(self.model).value_model
                    value_model.save_pretrained(checkpoint / "value_model", state_dict=value_state)
                    if self.gold is not None:  # written last (atomically): it marks a complete checkpoint
                        write_json(checkpoint / "gold_history.json", self.gold.history)
            finally:
                self.state.global_step -= offset

    return APLOTPPOTrainer
