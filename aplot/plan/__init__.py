"""Planning a job before the GPUs (`make plan`): a recipe resolved exactly as its stage resolves it, then the
batch and step arithmetic, every model's parameter count from its config alone, the memory per GPU (model
states from DeepSpeed's own estimators, activations and logits as stated estimates) and whether the tokenizers
the stage pairs up agree. Nothing is loaded but config and tokenizer files, and nothing is written.

One module per concern: `shapes` (models from their configs), `tokenizers`, `memory`, `base` (the Plan every
stage planner fills in), `throughput` (make gpu-check's FLOPs), and one planner per stage (`rm`, `bon`, `ppo`).
A stage planner is a module with `MARKS` (recipe keys only that stage has) and a function `(plan, argv, opts)`
that parses the recipe with the stage's own parser, makes the stage's own checks and fills in the plan; adding
a stage is such a module and its line in `STAGE_PLANNERS`."""

from __future__ import annotations

from pathlib import Path

from aplot.errors import UserError
from aplot.plan import bon, ppo, rm
from aplot.plan.base import Plan, fits, resolving_for_the_gpu_machine
from aplot.plan.bon import VLLM_GPU_MEMORY_UTILIZATION, plan_bon
from aplot.plan.memory import (
    GIB,
    activation_bytes,
    inference_bytes,
    logits_bytes,
    model_states_bytes,
    training_advice,
    zero_config,
)
from aplot.plan.ppo import plan_ppo
from aplot.plan.rm import plan_rm, trainer_steps
from aplot.plan.shapes import (
    DTYPE_BYTES,
    HUB_CONFIGS,
    RM_RECIPES,
    ROOT,
    ModelShape,
    config_dir,
    describe,
    is_hub_id,
    model_shape,
    policy_shape,
    resolve_model,
    reward_model_shape,
    rm_recipe_writing,
    weight_dtype,
)
from aplot.plan.throughput import PEAK_BF16_TFLOPS, matmul_params, peak_bf16_flops, training_flops_per_token
from aplot.plan.tokenizers import TokenizerFacts, compare_tokenizers, tokenizer_facts

# stage -> (the recipe keys only its recipes have, its planner); the order is `--stage`'s.
STAGE_PLANNERS = {"rm": (rm.MARKS, plan_rm), "bon": (bon.MARKS, plan_bon), "ppo": (ppo.MARKS, plan_ppo)}
STAGES = tuple(STAGE_PLANNERS)

__all__ = ["DTYPE_BYTES", "GIB", "HUB_CONFIGS", "PEAK_BF16_TFLOPS", "RM_RECIPES", "ROOT", "STAGES", "STAGE_PLANNERS",
           "VLLM_GPU_MEMORY_UTILIZATION", "ModelShape", "Plan", "TokenizerFacts", "activation_bytes",
           "compare_tokenizers", "config_dir", "describe", "detect_stage", "fits", "inference_bytes", "is_hub_id",
           "logits_bytes", "make_plan", "matmul_params", "model_shape", "model_states_bytes", "parse_plan_flags",
           "peak_bf16_flops", "plan_bon", "plan_ppo", "plan_rm", "policy_shape", "resolve_model",
           "resolving_for_the_gpu_machine", "reward_model_shape", "rm_recipe_writing", "tokenizer_facts",
           "trainer_steps", "training_advice", "training_flops_per_token", "weight_dtype", "zero_config"]


def parse_plan_flags(argv: list[str]):
    """The planner's own flags, taken out of the command line; the rest goes to the stage's parser."""
    import argparse

    parser = argparse.ArgumentParser(prog="make plan", allow_abbrev=False, add_help=False)
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--gpu_memory_gib", type=float, default=80.0)
    parser.add_argument("--train_pairs", type=int, default=None,
                        help="rm: training pairs, for a data set that is not read here")
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"command line: {message}"))
    opts, rest = parser.parse_known_args(argv)
    from aplot.config import check_range

    for key in ("nproc", "nnodes"):
        check_range(key, getattr(opts, key), low=1)
    check_range("gpu_memory_gib", opts.gpu_memory_gib, low=0, low_open=True)
    if opts.train_pairs is not None:
        check_range("train_pairs", opts.train_pairs, low=1)
    return opts, rest


def detect_stage(recipe: str) -> str:
    """The stage a recipe is for: the keys only one stage has, else the folder it sits in."""
    from aplot.config import read_recipe

    keys = set(read_recipe(recipe))
    found = [stage for stage, (marks, _) in STAGE_PLANNERS.items() if keys & marks]
    if len(found) == 1:
        return found[0]
    folder = Path(recipe).resolve().parent.name
    if folder in STAGES:
        return folder
    raise UserError(f"{recipe}: cannot tell which stage this recipe is for; pass --stage "
                    f"{', '.join(STAGES[:-1])} or {STAGES[-1]}")


def make_plan(argv: list[str]) -> Plan:
    """The plan of `argv` (`--config recipe.yaml [--key value ...]` plus the planner's own flags)."""
    opts, rest = parse_plan_flags(argv)
    if "--config" not in rest[:-1]:
        raise UserError("command line: name a recipe: --config recipes/<stage>/<name>.yaml")
    recipe = rest[rest.index("--config") + 1]
    from aplot.config import read_recipe

    read_recipe(recipe)  # a missing or unreadable recipe: the stages' own one-line errors
    stage = opts.stage or detect_stage(recipe)
    plan = Plan(recipe, stage, opts.nproc * opts.nnodes, opts.nnodes, opts.gpu_memory_gib)
    plan.fit_limit = int(opts.gpu_memory_gib * GIB)
    _, planner = STAGE_PLANNERS[stage]
    planner(plan, rest, opts)
    if plan.total_bytes > plan.fit_limit and not any("does not fit" in p for p in plan.problems):
        plan.problems.insert(0, f"{recipe}: does not fit in {opts.gpu_memory_gib:g} GiB per GPU "
                                f"({plan.total_bytes / GIB:.1f} GiB)")
    return plan

