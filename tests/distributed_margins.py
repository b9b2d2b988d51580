"""Run by tests/test_distributed.py, plainly or under torchrun: the APLOT margins of one fixed global
batch through the trainer's own code path (compute_loss -> adaptive_margin), written as JSON by rank 0.

    [torchrun --nproc_per_node N] tests/distributed_margins.py OUT.json
"""

import json
import sys

import torch
from datasets import Dataset

from aplot.config import APLOTConfig
from aplot.data import world
from aplot.distributed import init_distributed
from aplot.reward_model import build_reward_model
from aplot.trainer import APLOTRewardTrainer

GLOBAL_PAIRS = 16


def margins(trainer, batch, scope):
    """This rank's margins of `batch` as compute_loss applies them, under one `ot_scope`."""
    trainer.args.ot_scope = scope
    applied = []
    solve = trainer.adaptive_margin
    trainer.adaptive_margin = lambda *a: applied.append(solve(*a)) or applied[-1]
    try:
        with torch.no_grad():
            trainer.compute_loss(trainer.model, dict(batch))
    finally:
        del trainer.adaptive_margin
    return applied[0]


def main(out):
    state = init_distributed()
    world_size, rank = state.num_processes, state.process_index
    tok = world.build_tokenizer()
    torch.manual_seed(0)  # the same initial weights on every rank and in every run
    model = build_reward_model("recipes/models/tiny-qwen2", tok, fresh=True).eval()
    args = APLOTConfig(output_dir="/tmp/dist-margins", report_to="none", bf16=False, disable_tqdm=True,
                       per_device_train_batch_size=GLOBAL_PAIRS // world_size, max_length=128,
                       # one padded width for every slice: the rewards then match to rounding
                       pad_to_multiple_of=128)
    pairs = Dataset.from_list(world.generate_split("train", GLOBAL_PAIRS, seed=0))
    trainer = APLOTRewardTrainer(model, args, train_dataset=pairs, processing_class=tok)
    n = GLOBAL_PAIRS // world_size
    mine = [trainer.train_dataset[i] for i in range(rank * n, (rank + 1) * n)]  # rank r's slice, in order
    batch = trainer.data_collator(mine)
    result = {scope: trainer.accelerator.gather(margins(trainer, batch, scope)).tolist()
              for scope in ("global", "local")}
    if state.is_main_process:
        result["processes"] = world_size
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
