"""The rm stage's plan: `make rm`'s own parser and checks, the Trainer's batch and step arithmetic, the reward
model's shape, its model states and activations."""

from __future__ import annotations

import math
from pathlib import Path

from aplot.errors import UserError
from aplot.plan.base import Plan, fits, resolving_for_the_gpu_machine
from aplot.plan.memory import activation_bytes, model_states_bytes, training_advice, zero_config
from aplot.plan.shapes import describe, resolve_model

# Recipe keys only an rm recipe has: how `make plan` tells its recipes from the other stages'.
MARKS = {"model_name_or_path", "loss_type", "dataset_name", "dataset_format"}


def trainer_steps(pairs: int, per_device: int, accumulation: int, processes: int, epochs: float,
                  max_steps: int) -> tuple[int, float]:
    """(optimizer steps, epochs) as transformers' Trainer counts them: each rank's dataloader has
    ceil(pairs / (per_device x processes)) batches, an epoch ends with a partial accumulation."""
    batches = math.ceil(pairs / (per_device * processes))
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    if max_steps > 0:
        return max_steps, max_steps / per_epoch
    return math.ceil(epochs * per_epoch), epochs


def plan_rm(plan: Plan, argv: list[str], opts) -> None:
    from aplot.config import parse_rm_recipe
    from aplot.outputs import check_output_dir
    from aplot.reward_model import check_path

    with resolving_for_the_gpu_machine():
        data_cfg, args, model_cfg = parse_rm_recipe(argv)
        zero = zero_config(args.hf_deepspeed_config.config if args.deepspeed else None)
    # The checks `make rm` makes before any work, in its order and words.
    if not model_cfg.model_name_or_path:
        raise UserError("model_name_or_path is not set: name a model directory, hub id or config directory")
    check_path(model_cfg.model_name_or_path, "model")
    check_output_dir(Path(args.output_dir))

    world, pd, ga = plan.processes, args.per_device_train_batch_size, args.gradient_accumulation_steps
    batch = pd * ga * world
    processes = f"{world} process{'es' * (world > 1)}"
    plan.row("batch", f"{pd} pairs per device x {ga} accumulation x {processes} = {batch} pairs per step "
                      f"({2 * batch} sequences: chosen and rejected)")
    pairs, exact = None, True
    if data_cfg.dataset_name == "embedded":
        pairs = min(data_cfg.n_train, data_cfg.max_train_pairs or data_cfg.n_train)
    elif opts.train_pairs:
        pairs = min(opts.train_pairs, data_cfg.max_train_pairs or opts.train_pairs)
    elif data_cfg.max_train_pairs:
        pairs, exact = data_cfg.max_train_pairs, False
    if pairs is None and args.max_steps <= 0:
        plan.row("steps", f"unknown: {data_cfg.dataset_name} is not read when planning (--train_pairs N to count)")
        steps = None
    else:
        steps, epochs = trainer_steps(pairs or 1, pd, ga, world, args.num_train_epochs, args.max_steps)
        of = f"{'at most ' if not exact else ''}{pairs} pairs" if pairs else "the data set"
        plan.row("steps", f"{steps} optimizer steps = {epochs:g} epoch{'s' * (epochs != 1)} of {of}")
    length = args.max_length
    tokens = 2 * batch * length if length else None
    plan.row("tokens/step", f"at most {tokens:,} ({2 * batch} sequences x max_length {length})" if tokens
             else "unknown: max_length is not set")
    plan.numbers.update(global_batch=batch, per_device=pd, accumulation=ga, steps=steps, pairs=pairs,
                        tokens_per_step=tokens)

    model, _ = resolve_model("reward model", model_cfg.model_name_or_path, "score", model_cfg.dtype,
                             init_from=getattr(model_cfg, "init_from", "sft"),
                             lineage_dir=getattr(model_cfg, "lineage_dir", None),
                             tokenizer_name=data_cfg.tokenizer_name_or_path, trust_remote_code=args.trust_remote_code)
    plan.models["reward model"] = model
    plan.row("model", describe(model))
    states, how = model_states_bytes(model.params, model.largest_layer, zero, opts.nproc, opts.nnodes,
                                     model.weight_bytes)
    plan.need("model states", states, how)
    if length:
        act = activation_bytes(model, 2 * pd, length, args.gradient_checkpointing)
        plan.need("activations", act, f"estimate: {2 * pd} sequences x {length} tokens per micro-batch, "
                                      f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    plan.numbers.update(model_states=states, params=model.params, zero_stage=(zero or {}).get("stage", 0))
    fits(plan, training_advice(zero, args.gradient_checkpointing, pd, states > plan.fit_limit))
