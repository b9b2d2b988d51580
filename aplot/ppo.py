"""PPO against a trained reward model: TRL's PPOTrainer (the pinned TRL line) over the shared policy stage
(`aplot.policy`), with the PPO-only parts: its recipe keys, how it hands responses to the reward model
(the policy's own ids, checked, or decoded and re-encoded), and checkpoints that hold the value model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from aplot.errors import UserError
from aplot.policy import (  # noqa: F401  (the policy-stage names PPO's callers have always imported from here)
    GoldEvaluation,
    PolicyStageConfig,
    first_difference,
    plot_gold_vs_kl_curve,
    probe_response,
    same_tokenizer,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives in trl.experimental in the pinned TRL line
try:
    from trl.experimental.ppo import PPOConfig
except ImportError as err:  # TRL 1.13 and later: upstream removed PPO; the core install has no pin on TRL
    from importlib.metadata import version

    from aplot.errors import UserError

    raise UserError(f"PPO needs TRL's PPOTrainer, removed in trl 1.13 (this environment has trl "
                    f"{version('trl')}): pip install \"aplot[ppo]\" (trl<1.13), or make install") from err


@dataclass
class APLOTPPOConfig(PolicyStageConfig, PPOConfig):
    """TRL's `PPOConfig` (every `TrainingArguments` key too) plus the policy stage's keys (where the prompts,
    reward models and gold reward come from). `sft_model_path` is the policy, `reward_model_path` a `make rm`
    output."""

    value_model_path: str | None = field(default=None, metadata={
        "help": "Where the value model starts; unset, from the reward model (from the policy when "
                "their tokenizers differ, since the value model reads the policy's tokens)."})

    def __post_init__(self):
        from aplot.config import MAX_BATCH, MAX_ITERS, MAX_STEPS, MAX_TOKENS, check_range

        self.check_policy_stage({"response_length": MAX_TOKENS, "num_ppo_epochs": MAX_ITERS,
                                 "num_mini_batches": MAX_BATCH, "local_rollout_forward_batch_size": MAX_BATCH})
        if self.total_episodes is not None:
            check_range("total_episodes", self.total_episodes, low=1, high=MAX_STEPS)
        check_range("kl_coef", self.kl_coef, low=0.0)
        check_range("cliprange", self.cliprange, low=0.0, low_open=True)
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
        self.offline_wandb()


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

    text = probe_response(prompt)
    sampled = policy_tokenizer(text, add_special_tokens=False)["input_ids"] + [policy_tokenizer.eos_token_id]
    trained = reward_scorer.encode(prompt, as_response(prompt, text))
    scored = list(query_ids) + sampled
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
    return first_difference(scored, trained, policy_tokenizer, "PPO")


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
