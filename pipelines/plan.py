"""`make plan`: a dry run of an rm, bon or ppo recipe before the GPUs. Resolves the recipe exactly as its
stage would, touches no output, and prints the batch and step arithmetic, parameter counts, memory per GPU
and whether the tokenizers agree; a recipe that cannot run, or does not fit, fails in one line.

    python -m pipelines.plan --config recipes/rm/x.yaml [--nproc 8] [--nnodes 2] [--gpu_memory_gib 80] [--key value ...]
"""

from __future__ import annotations

import sys

from aplot.errors import UserError, run_pipeline


def main(argv=None):
    import logging
    import os

    # DeepSpeed's estimators import its accelerator, which announces a CPU fallback nobody asked about.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    from aplot.plan import make_plan

    plan = make_plan(list(sys.argv[1:] if argv is None else argv))
    print(plan.format())
    if plan.problems:
        sys.stdout.flush()
        raise UserError(plan.problems[0])
    return plan


if __name__ == "__main__":
    run_pipeline(main)
