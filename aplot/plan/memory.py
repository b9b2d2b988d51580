"""Memory per GPU, in bytes: model states from DeepSpeed's own estimators under ZeRO-2/3 (their numbers
unchanged), activations and logits as stated estimates, and the setting to change when they do not fit."""

from __future__ import annotations

from pathlib import Path

from aplot.errors import UserError
from aplot.plan.shapes import ModelShape

GIB = 2**30


def zero_config(deepspeed) -> dict | None:
    """The `zero_optimization` section of a recipe's DeepSpeed config (a path or a mapping)."""
    if not deepspeed:
        return None
    import json

    if isinstance(deepspeed, dict):
        return deepspeed.get("zero_optimization", {})
    path = Path(deepspeed)
    if not path.is_file():
        raise UserError(f"deepspeed config does not exist: {deepspeed}")
    return json.loads(path.read_text()).get("zero_optimization", {})


def _offloaded(zero: dict, key: str) -> bool:
    return str((zero.get(key) or {}).get("device", "none")) in ("cpu", "nvme")


def model_states_bytes(params: int, largest_layer: int, zero: dict | None, gpus_per_node: int, nodes: int,
                       weight_bytes: int) -> tuple[int, str]:
    """Bytes per GPU for the weights, gradients and optimizer state of a trained model, and how they were
    reckoned: DeepSpeed's own estimators under ZeRO-2/3 (their numbers unchanged), else weights, gradients
    and AdamW's two moments, all in the weights' dtype."""
    stage = int((zero or {}).get("stage", 0))
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        offload_opt, offload_param = _offloaded(zero, "offload_optimizer"), _offloaded(zero, "offload_param")
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload_opt,
            cpu_offload_params=offload_param, zero_init=True)
        offload = " + ".join(k for k, on in (("optimizer", offload_opt), ("parameters", offload_param)) if on)
        return gpu, f"ZeRO-3{f', {offload} offloaded' if offload else ''} (DeepSpeed estimate)"
    if stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        offload_opt = _offloaded(zero, "offload_optimizer")
        _, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
                                                       cpu_offload=offload_opt)
        label = "ZeRO-2" if stage == 2 else "ZeRO-1 (ZeRO-2's estimate)"
        return gpu, f"{label}{', optimizer offloaded' if offload_opt else ''} (DeepSpeed estimate)"
    return 4 * weight_bytes * params, f"no DeepSpeed: weights, gradients, 2 AdamW moments in {weight_bytes}-byte values"


def activation_bytes(model: ModelShape, sequences: int, length: int, checkpointing: bool) -> int:
    """Estimate of what one training micro-batch keeps for the backward pass, in the weights' dtype.

    Per token and layer a decoder block keeps about 6h + 2kv + 4i values (norm inputs, q/k/v, the
    attention output and its projection input, the MLP's gate, up, product and down-projection input;
    memory-efficient attention, no dropout), h the hidden size, kv the key/value width, i the MLP width.
    With gradient checkpointing only each layer's input (h values) is kept, plus one layer recomputed
    at a time. Logits are counted apart (`logits_bytes`)."""
    c = model.config
    tokens = sequences * length
    kv = c.num_key_value_heads * model.head_dim if getattr(c, "num_key_value_heads", None) else c.hidden_size
    per_layer = tokens * (6 * c.hidden_size + 2 * kv + 4 * c.intermediate_size) * model.weight_bytes
    if checkpointing:
        return c.num_hidden_layers * tokens * c.hidden_size * model.weight_bytes + per_layer
    return c.num_hidden_layers * per_layer


def inference_bytes(model: ModelShape, sequences: int, length: int) -> int:
    """Estimate of a no-grad forward pass's peak beyond the weights: one layer's widest activations."""
    c = model.config
    return sequences * length * (2 * c.hidden_size + 3 * c.intermediate_size) * model.weight_bytes


def logits_bytes(model: ModelShape, sequences: int, length: int) -> int:
    """float32 logits over the vocabulary (what log-softmax over sampled tokens works on)."""
    return sequences * length * model.config.vocab_size * 4


def training_advice(zero, checkpointing, per_device, states_alone: bool) -> str:
    stage = int((zero or {}).get("stage", 0))
    if states_alone:
        if stage < 3:
            return "set deepspeed: recipes/deepspeed/zero3.json (or more processes: NPROC, NNODES)"
        if not _offloaded(zero, "offload_optimizer"):
            return "set deepspeed: recipes/deepspeed/zero3_offload.json (or more processes: NPROC, NNODES)"
        return "more processes (NPROC, NNODES)"
    if not checkpointing:
        return "set gradient_checkpointing: true"
    return (f"lower per_device_train_batch_size (now {per_device}; raise gradient_accumulation_steps to keep "
            "the global batch) or max_length")
