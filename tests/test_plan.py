"""`make plan`: the arithmetic (global batch, steps, parameter counts, DeepSpeed's model-state estimates),
the one-line errors (the stages' own, and "does not fit" naming the setting), and that nothing is written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from aplot.errors import UserError
from aplot.plan import make_plan, model_shape
from pipelines.plan import main as plan_main

SHAPED = "recipes/models/qwen2.5-shaped"


def test_parameter_count_of_the_qwen_shaped_config_matches_a_model_built_from_it():
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoConfig, AutoModelForCausalLM

    planned = model_shape("policy", SHAPED, "lm", None)
    torch.manual_seed(0)
    built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(SHAPED), dtype=torch.bfloat16)
    total, largest = model_to_params(built)  # DeepSpeed's own count on real tensors (tied embeddings once)
    assert planned.params == sum(p.numel() for p in built.parameters()) == total
    assert planned.largest_layer == largest == 151936 * 896  # the (tied) embedding is the largest layer
    assert planned.config.num_hidden_layers == 2


def test_rm_batch_and_steps_follow_the_trainer_arithmetic(tmp_path):
    out = tmp_path / "never-made"
    plan = make_plan(["--config", "recipes/rm/embedded.yaml", "--nproc", "2", "--nnodes", "2",
                      "--per_device_train_batch_size", "7", "--gradient_accumulation_steps", "3",
                      "--output_dir", str(out)])
    n = plan.numbers
    assert plan.processes == 4
    assert n["global_batch"] == 7 * 3 * 4
    # 40000 pairs over 4 ranks of 7: 1429 batches per rank, 476 full accumulations and one partial.
    assert n["pairs"] == 40000
    assert n["steps"] == math.ceil(40000 / 28) // 3 + 1 == 477
    assert n["tokens_per_step"] == 2 * 84 * 128
    assert not out.exists()  # planning writes nothing, not even the output directory


@pytest.mark.parametrize("recipe, stage", [("recipes/rm/unified-feedback-qwen2.5-1.5b.yaml", 2),
                                           ("recipes/rm/skywork-qwen2.5-1.5b.yaml", 3)])
def test_model_states_are_deepspeeds_estimate(recipe, stage):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    plan = make_plan(["--config", recipe, "--nproc", "8", "--nnodes", "2"])
    model = plan.models["reward model"]
    assert plan.numbers["zero_stage"] == stage
    if stage == 2:
        expected = estimate_zero2_model_states_mem_needs(model.params, 8, 2, cpu_offload=False)[1]
    else:
        expected = estimate_zero3_model_states_mem_needs(model.params, model.largest_layer, 8, 2, cpu_offload=False,
                                                         cpu_offload_params=False, zero_init=True)[1]
    assert plan.numbers["model_states"] == expected
    assert dict((item, b) for item, b, _ in plan.memory)["model states"] == expected
    # Qwen2.5-1.5B-Instruct as a one-output classifier: the published 1.54B less nothing (tied embeddings)
    assert 1.50e9 < model.params < 1.56e9
    assert plan.numbers["global_batch"] == 4 * 2 * 16
    # 40000 pairs (max_train_pairs) over 16 ranks of 4: 625 batches a rank, accumulated 2 by 2; the Skywork
    # data set is not read when planning, so its steps are unknown.
    expected_steps = math.ceil(math.ceil(40000 / (4 * 16)) / 2) if "unified" in recipe else None
    assert plan.numbers["steps"] == expected_steps


def test_ppo_rollout_arithmetic():
    plan = make_plan(["--config", "recipes/ppo/unified-feedback-qwen2.5-1.5b.yaml", "--nproc", "8"])
    n = plan.numbers
    assert n["global_batch"] == 4 * 2 * 8
    assert n["updates"] == math.ceil(20000 / 64)
    assert n["tokens_per_step"] == 64 * 256
    assert {"policy", "reference", "value model", "reward model", "gold"} <= set(plan.models)
    items = {item for item, _, _ in plan.memory}
    assert {"policy + value states", "reference weights", "reward weights", "rollout logits"} <= items
    assert "agree" in dict(plan.rows)["tokenizers"]


def test_a_recipe_that_does_not_fit_fails_in_one_line_naming_the_setting(capsys):
    with pytest.raises(UserError) as err:
        plan_main(["--config", "recipes/rm/unified-feedback-qwen2.5-1.5b.yaml", "--gpu_memory_gib", "4"])
    message = str(err.value)
    assert "\n" not in message
    assert "does not fit" in message and "--gpu_memory_gib 4" in message
    assert "deepspeed: recipes/deepspeed/zero3.json" in message  # model states alone exceed 4 GiB under ZeRO-2
    assert "memory per GPU" in capsys.readouterr().out  # the table is printed first

    with pytest.raises(UserError) as err:
        plan_main(["--config", "recipes/rm/unified-feedback-qwen2.5-1.5b.yaml", "--gpu_memory_gib", "7",
                   "--nproc", "8", "--per_device_train_batch_size", "32"])
    assert "lower per_device_train_batch_size (now 32" in str(err.value)


def test_bad_recipes_give_the_stages_own_errors(tmp_path):
    from aplot.config import RecipeParser, parse_rm_recipe
    from pipelines.bon import BonConfig

    typo = tmp_path / "typo.yaml"
    typo.write_text(Path("recipes/rm/embedded.yaml").read_text().replace("gamma:", "gama:"))
    with pytest.raises(UserError) as stage_err:
        parse_rm_recipe(["--config", str(typo)])
    with pytest.raises(UserError) as plan_err:
        plan_main(["--config", str(typo), "--stage", "rm"])
    assert str(plan_err.value) == str(stage_err.value)
    assert "unknown key 'gama'" in str(plan_err.value)

    bon = tmp_path / "bon.yaml"
    bon.write_text(Path("recipes/bon/embedded.yaml").read_text().replace("n_samples: 64", "n_samples: 48"))
    with pytest.raises(UserError) as stage_err:
        RecipeParser((BonConfig,)).parse_recipe(["--config", str(bon)])
    with pytest.raises(UserError) as plan_err:
        plan_main(["--config", str(bon)])
    assert str(plan_err.value) == str(stage_err.value) and "power of two" in str(plan_err.value)

    with pytest.raises(UserError, match="recipe file does not exist"):
        plan_main(["--config", str(tmp_path / "missing.yaml")])
