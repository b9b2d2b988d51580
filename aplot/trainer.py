"""APLOTRewardTrainer: TRL's RewardTrainer with the margin of `loss_type` in its loss.

Only `compute_loss` changes. The hidden state the score head reads is captured by a hook during
the one forward pass (with `ot_embedder`, a frozen sentence encoder's embeddings of the response texts
stand in for it); under data parallelism rewards and hidden states are gathered (detached) so one
transport plan is solved over the global batch and each rank keeps its slice of margins.
"""

from __future__ import annotations

import time

import torch
from trl import RewardTrainer

from aplot import objective
from aplot.config import APLOTConfig
from aplot.errors import UserError
from aplot.reward_model import ScoreInputCapture


class NonFiniteRewardError(UserError):
    """Training stops, in one line naming the step, instead of training on NaN/inf rewards."""


class APLOTRewardTrainer(RewardTrainer):
    def __init__(self, model, args: APLOTConfig, *trainer_args, **trainer_kwargs):
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        # Resolved once: unwrapping the model per step costs a package-metadata lookup (~1 ms).
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.score_input = ScoreInputCapture(unwrapped)
        self.pad_token_id = unwrapped.config.pad_token_id
        self.eval_prefix = "eval"
        self.embedder, self.response_of = None, {}
        if args.ot_embedder and args.loss_type in ("point", "aplot"):
            from aplot.embedder import SentenceEmbedder, response_text

            self.embedder = SentenceEmbedder(args.ot_embedder)
            # A collated batch holds token ids only: each sequence finds its response text by its ids.
            evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
            for dataset in [self.train_dataset, *evals]:
                for side in ("chosen", "rejected") if dataset is not None else ():
                    for ids, response in zip(dataset[f"{side}_ids"], dataset[side]):
                        self.response_of[tuple(ids)] = response_text(response)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        # Transformers evaluates a dict of eval sets one by one as `eval_<name>`; TRL's `log` would file
        # every set's accuracy under plain `eval_`, so the prefix in use is kept for `log` below.
        self.eval_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self.eval_prefix = "eval"

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's `log`, with each eval set's reward metrics under its own prefix (`eval_train_accuracy`)."""
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(val) / len(val) for key, val in self._metrics[mode].items()}
        if mode == "eval":
            metrics = {f"{self.eval_prefix}_{key}": val for key, val in metrics.items()}
        logs.update(metrics)
        super(RewardTrainer, self).log(logs, start_time)
        self._metrics[mode].clear()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: APLOTConfig = self.args
        mode = "train" if self.model.training else "eval"
        dataset_margin = inputs.pop("margin", None)
        outputs = model(**inputs, use_cache=False)
        rewards = outputs.logits.squeeze(-1)
        if not torch.isfinite(rewards).all():
            raise NonFiniteRewardError(
                f"non-finite reward at {mode} step {self.state.global_step}: stopping instead of "
                "training on it (lower the learning rate, or use bf16 rather than fp16)")
        chosen, rejected = rewards.chunk(2)

        margin = None
        if args.loss_type == "margin":
            margin = dataset_margin if args.margin_value is None else torch.full_like(chosen, args.margin_value)
            if margin is None:
                raise UserError("loss_type=margin needs margin_value or a `margin` column in the dataset")
        elif args.loss_type in ("point", "aplot"):
            hidden = self.semantic_states(inputs)
            margin = self.adaptive_margin(chosen.detach(), rejected.detach(), *hidden.detach().chunk(2), mode)
        loss = objective.preference_loss(chosen, rejected, margin,
                                         args.label_smoothing if args.loss_type == "label_smoothing" else 0.0)
        if args.center_rewards_coefficient is not None:
            loss = loss + args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)

        with torch.no_grad():
            self.log_batch_metrics(mode, inputs, rewards, chosen, rejected, margin)
        return (loss, outputs) if return_outputs else loss

    def semantic_states(self, inputs):
        """What the semantic cost compares, one row per sequence (chosen, then rejected): the frozen
        encoder's embeddings of the response texts (`ot_embedder`), else the state the score head read."""
        if self.embedder is None:
            return self.score_input.pooled(inputs["input_ids"], self.pad_token_id, self.args.ot_hidden)
        texts = [self.response_of[tuple(ids[mask.bool()].tolist())]
                 for ids, mask in zip(inputs["input_ids"].cpu(), inputs["attention_mask"].cpu())]
        return self.embedder.embed(texts).to(inputs["input_ids"].device)

    def adaptive_margin(self, chosen, rejected, chosen_hidden, rejected_hidden, mode):
        """The `point` or `aplot` margin of this rank's pairs, solved over the global batch."""
        args: APLOTConfig = self.args
        gather = args.ot_scope == "global" and self.accelerator.num_processes > 1
        if gather:
            chosen, rejected, chosen_hidden, rejected_hidden, mine = gather_pairs(
                self.accelerator, chosen, rejected, chosen_hidden, rejected_hidden)
        start = time.perf_counter()
        if args.loss_type == "aplot":
            margin = objective.ot_margin(chosen, rejected, chosen_hidden, rejected_hidden, gamma=args.gamma,
                                         epsilon=args.epsilon, n_iters=args.sinkhorn_iters,
                                         scale=args.margin_scale)
        else:
            margin = objective.point_margin(chosen, rejected, chosen_hidden, rejected_hidden,
                                            gamma=args.gamma, scale=args.margin_scale)
        self._metrics[mode]["ot_solve_ms"].append((time.perf_counter() - start) * 1e3)
        return margin[mine] if gather else margin

    def log_batch_metrics(self, mode, inputs, rewards, chosen, rejected, margin):
        """TRL's reward statistics, plus the distribution of the margin actually applied."""
        metrics, gather = self._metrics[mode], self.accelerator.gather_for_metrics
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]
        all_rewards = gather(rewards.detach())
        metrics["min_reward"].append(all_rewards.min().item())
        metrics["mean_reward"].append(all_rewards.mean().item())
        metrics["max_reward"].append(all_rewards.max().item())
        metrics["accuracy"].append(gather((chosen > rejected).float()).mean().item())
        metrics["margin"].append(gather((chosen - rejected).detach()).mean().item())
        if margin is not None:
            applied = gather(margin.detach().float())
            metrics["loss_margin_mean"].append(applied.mean().item())
            metrics["loss_margin_std"].append(applied.std(unbiased=False).item())
            metrics["loss_margin_min"].append(applied.min().item())
            metrics["loss_margin_max"].append(applied.max().item())


def gather_pairs(accelerator, *tensors):
    """The pairs of every rank, in rank order (the global micro-batch), and the slice that is this
    rank's. Detached: no gradient crosses ranks. Every rank holds as many pairs: accelerate's
    `even_batches` (on by default) completes a short last batch, and the reward metrics gather on
    the same assumption (ACCELERATE_DEBUG_MODE=1 checks the shapes before each collective)."""
    n, rank = tensors[0].shape[0], accelerator.process_index
    gathered = [accelerator.gather(t.detach().contiguous()) for t in tensors]
    return (*gathered, slice(rank * n, (rank + 1) * n))
