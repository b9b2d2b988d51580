"""Data-parallel set-up shared by the stages: one process group and one accelerate state, the same
under torchrun on a CPU box as on GPU nodes, and work split across ranks and gathered in order."""

from __future__ import annotations

import os
from contextlib import contextmanager

_PATCHED = "_aplot_cpu_fallback"


def launched_world_size() -> int:
    """How many processes the launcher (torchrun, accelerate, deepspeed) started; 1 when run plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed():
    """Set up this process's place among its data-parallel ranks. Call it first thing in `main()`,
    before any `TrainingArguments` (a recipe parse) or model is built; calling it again is harmless.

    Contract:
    - Run plainly (no launcher, or WORLD_SIZE=1): nothing is initialised; returns a one-process
      `accelerate.PartialState`.
    - Launched with GPUs (or any device accelerate knows): nothing changes; accelerate and DeepSpeed
      set up NCCL themselves, as they always do, when `TrainingArguments` is built.
    - Launched on CPU only (torchrun --nproc_per_node N): accelerate finds no backend for a process
      that has no GPU unless it was told `cpu=True`, so `TrainingArguments` would count one process
      while DeepSpeed counts N (its batch-size assertion), and a plain DDP run would train N
      independent copies. Here every process joins one gloo process group (through
      `deepspeed.init_distributed` when DeepSpeed is installed, so `zero.Init` also sees N ranks) and
      accelerate is made to treat launched processes without a device as CPU ranks (what its own
      `cpu=True` does), so DDP, ZeRO-2 and ZeRO-3 all see the same N processes.
    Returns the `PartialState` (`.num_processes`, `.process_index`, `.is_main_process`, `.device`,
    `.wait_for_everyone()`, `.main_process_first()`), for stages that do not build a Trainer.
    """
    import torch
    from accelerate import PartialState

    if launched_world_size() > 1:
        _let_accelerate_fall_back_to_cpu()
        if not torch.distributed.is_initialized() and not _has_device():
            try:
                import deepspeed
            except ImportError:
                torch.distributed.init_process_group("gloo")
            else:
                deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    return PartialState()


def _has_device() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def _let_accelerate_fall_back_to_cpu() -> None:
    """Where accelerate would give a launched process no backend at all (no device it knows), give it
    the backend its `cpu=True` path gives (gloo, MULTI_CPU). Every other case is left untouched.

    `PartialState` is re-created by `TrainingArguments` (which resets any state made before it), so
    the choice has to be made where accelerate makes it, not by building a state in advance."""
    from accelerate.state import DistributedType, PartialState

    original = PartialState._prepare_backend
    if getattr(original, _PATCHED, False):
        return

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, kind = original(self, cpu, sagemaker_dp, backend)
        if kind == DistributedType.NO and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return original(self, True, sagemaker_dp, backend)
        return chosen, kind

    setattr(prepare_backend, _PATCHED, True)
    PartialState._prepare_backend = prepare_backend


def map_sharded(fn, items: list) -> list:
    """`fn(items)` computed across the data-parallel ranks: each rank runs `fn` on its contiguous share
    (`PartialState.split_between_processes`), and every rank gets all results, in `items`' order.
    `fn` takes a list and returns one result per item; in one process it is simply `fn(items)`."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return list(fn(items))
    with state.split_between_processes(list(items)) as part:
        local = list(fn(part)) if len(part) else []
    return gather_object(local)


@contextmanager
def zero3_init_disabled():
    """Models built inside load whole, as in a plain process: `from_pretrained` otherwise partitions
    them under ZeRO-3 (`zero.Init`, a collective every rank must join) while a ZeRO-3 Trainer's
    DeepSpeed config is alive, which hangs when one rank loads alone (evaluation on rank 0)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    config = hf_deepspeed.deepspeed_config() and hf_deepspeed._hf_deepspeed_config_weak_ref()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config:
            hf_deepspeed.set_hf_deepspeed_config(config)
