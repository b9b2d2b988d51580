"""Throughput arithmetic for `make gpu-check`: FLOPs per trained token and the device's dense bf16 peak, for
model FLOPs utilisation."""

from __future__ import annotations

# Dense bf16 peaks in TFLOP/s by device name (NVIDIA's data sheets, no sparsity); the first match wins, so
# the specific names come before the family's. An unknown device gets no MFU.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))


def peak_bf16_flops(device_name: str) -> float | None:
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


def matmul_params(model) -> int:
    """Parameters that multiply activations (every nn.Linear weight, a tied LM head included): the N of
    the 6N FLOPs-per-token rule; embedding lookups and norms do no matmul."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def training_flops_per_token(model, seq_len: int) -> float:
    """Forward and backward FLOPs per token: 6N plus attention's 12 x layers x hidden x sequence length
    (the PaLM paper's estimate, which MFU is conventionally measured against)."""
    c = model.config
    return 6 * matmul_params(model) + 12 * c.num_hidden_layers * c.hidden_size * seq_len
