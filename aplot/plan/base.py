"""What every stage planner shares: the Plan it fills in (rows of arithmetic, memory items per GPU, problems),
the recipe parsed as on the GPU machine the job is meant for, and the check that the total fits."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

from aplot.plan.memory import GIB


@dataclass
class Plan:
    """What `make plan` prints: rows of arithmetic, memory items per GPU, and the problems found."""

    recipe: str
    stage: str
    processes: int
    nodes: int
    gpu_memory_gib: float
    rows: list = field(default_factory=list)  # (label, text)
    memory: list = field(default_factory=list)  # (item, bytes, how)
    models: dict = field(default_factory=dict)  # role -> ModelShape
    numbers: dict = field(default_factory=dict)  # the arithmetic, for tests and callers
    problems: list = field(default_factory=list)  # one-line messages; the first is raised after printing
    fit_limit: int | None = None  # bytes one GPU must hold at most (a share of it for vLLM)

    def row(self, label, text):
        self.rows.append((label, text))

    def need(self, item, nbytes, how):
        self.memory.append((item, int(nbytes), how))

    @property
    def total_bytes(self) -> int:
        return sum(b for _, b, _ in self.memory)

    def format(self) -> str:
        lines = [f"plan: {self.recipe} ({self.stage}), {self.processes} process{'es' * (self.processes > 1)}"
                 f" ({self.nodes} node{'s' * (self.nodes > 1)} x {self.processes // self.nodes}), "
                 f"GPUs of {self.gpu_memory_gib:g} GiB"]
        width = max(len(label) for label, _ in self.rows) if self.rows else 0
        lines += [f"  {label:<{width}}  {text}" for label, text in self.rows]
        if self.memory:
            lines.append("  memory per GPU (GiB):")
            iw = max(len(i) for i, _, _ in self.memory)
            lines += [f"    {item:<{iw}}  {b / GIB:7.2f}  {how}" for item, b, how in self.memory]
            lines.append(f"    {'total':<{iw}}  {self.total_bytes / GIB:7.2f}  of {self.gpu_memory_gib:g}")
        return "\n".join(lines)


@contextmanager
def resolving_for_the_gpu_machine():
    """Parse as the stage would on the GPU machine the job is meant for, leaving this process as it was.

    TrainingArguments asks this machine whether it can run bf16 on a GPU; a plan made on a laptop or a
    login node answers for the GPU node (the one hardware question in the parse). The PPO recipe keys
    hand a DeepSpeed config to accelerate through the environment, and a ZeRO-3 config registers itself
    with transformers: both are undone afterwards, so later work in this process is not affected."""
    import torch
    import transformers.training_args as training_args
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    environ = dict(os.environ)
    original = training_args.is_torch_bf16_gpu_available
    if not torch.cuda.is_available():
        training_args.is_torch_bf16_gpu_available = lambda: True
    try:
        yield
    finally:
        training_args.is_torch_bf16_gpu_available = original
        os.environ.clear()
        os.environ.update(environ)
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)


def fits(plan: Plan, advice: str) -> None:
    """When the memory items exceed one GPU, put "does not fit" first among the problems, naming the items
    and `advice`, the setting to change."""
    if plan.total_bytes > plan.fit_limit:
        parts = ", ".join(f"{item} {b / GIB:.1f}" for item, b, _ in plan.memory if b >= 0.05 * GIB)
        plan.problems.insert(0, f"{plan.recipe}: does not fit: {plan.total_bytes / GIB:.1f} GiB per GPU ({parts}) "
                                f"> --gpu_memory_gib {plan.gpu_memory_gib:g}; {advice}")
