"""RLOO stage: a short run end to end through TRL's RLOOTrainer, the start-up rendering check and its bridge,
resume after SIGKILL, a changed setting refused, two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from aplot.errors import UserError
from aplot.outputs import WORK
from tests.conftest import snapshot

pytestmark = pytest.mark.core  # run on the newest line too (make test-latest)


def rloo_recipe(tmp_path, embedded_rms, **keys):
    rms, policy = embedded_rms
    recipe = {"sft_model_path": policy, "reward_model_path": rms[1], "retokenize_rewards": True, "gold": "embedded",
              "n_prompts": 64, "n_eval_prompts": 6, "eval_samples_per_prompt": 2, "gold_eval_steps": 2,
              "max_steps": 4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
              "num_generations": 4, "max_completion_length": 10, "learning_rate": 1.0e-4, "beta": 0.05,
              "temperature": 1.0, "bf16": False, "gradient_checkpointing": False, "logging_steps": 1,
              "save_strategy": "steps", "save_steps": 2, "save_total_limit": 1, "report_to": "none",
              "disable_tqdm": True, "output_dir": str(tmp_path / "rloo"), "seed": 0, **keys}
    path = tmp_path / "rloo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_short_rloo_run_checkpoints_measures_gold_against_kl_and_saves_a_loadable_policy(tmp_path, embedded_rms):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines import rloo

    metrics = rloo.main(["--config", rloo_recipe(tmp_path, embedded_rms)])
    out = tmp_path / "rloo"
    assert metrics["updates"] == 4 and metrics["episodes_per_update"] == 8 and metrics["reward_bridged"]
    assert [p["step"] for p in metrics["gold_curve"]] == [0, 2, 4]  # before, every 2 updates, and the last
    before, after = metrics["before"], metrics["after"]
    assert before["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference before the first update
    assert after["kl"] != pytest.approx(0.0, abs=1e-4)  # and not after
    assert all(-0.5 <= p["gold"] <= 1.0 and p["n"] == 12 for p in metrics["gold_curve"])
    # TRL's own log: the reward it optimised (the bridge, named after the reward model) and its KL, every update
    logged = [e for e in metrics["rloo_log"] if "kl" in e]
    assert len(logged) == 4 and all(f"rewards/{Path(embedded_rms[0][1]).name}/mean" in e for e in logged)
    assert (out / "gold_vs_kl.png").stat().st_size > 0 and json.loads((out / "gold_curve.json").read_text())
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]  # save_total_limit 1
    assert json.loads((out / "checkpoint-4" / "gold_history.json").read_text()) == metrics["gold_curve"]
    policy = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(embedded_rms[1])
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), reference.state_dict().values()))
    pad = AutoTokenizer.from_pretrained(embedded_rms[1]).pad_token_id
    assert AutoTokenizer.from_pretrained(out).pad_token_id == pad
    assert "RLOOTrainer" in (out / "README.md").read_text()


def test_trl_rendering_is_refused_with_one_line_and_the_bridge_scores_as_make_rm_trained(tmp_path, embedded_rms):
    """TRL's RLOO would hand the plain-text reward model `prompt + completion` with no eos: refused before any
    work. The bridge's reward is the shared scorer's, and differs from what TRL's own path would read."""
    from aplot.bon import as_response
    from aplot.reward_model import RewardScorer, load_reward_model
    from aplot.rloo import ProxyReward, rendering_mismatch
    from pipelines import rloo

    with pytest.raises(UserError) as err:
        rloo.main(["--config", rloo_recipe(tmp_path, embedded_rms, retokenize_rewards=False)])
    message = str(err.value)
    assert message.startswith(f"policy {embedded_rms[1]} and reward model {embedded_rms[0][1]} render responses "
                              "differently (RLOO scores")
    assert "retokenize_rewards: true" in message and "\n" not in message
    assert not (tmp_path / "rloo").exists()  # refused before any work

    model, tokenizer = load_reward_model(embedded_rms[0][1], device="cpu")
    scorer = RewardScorer(model, tokenizer)
    prompts = ["Write about river, stone and cloud. Do not use fire.\nAnswer:",
               "Write about apple, bread and milk. Do not use salt.\nAnswer:"]
    completions = [" river stone the cloud", " bread"]
    assert rendering_mismatch(scorer, prompts[0]) is not None
    bridged = torch.tensor(ProxyReward(scorer, "rm")(prompts=prompts, completions=completions))
    assert torch.allclose(bridged, scorer.score(prompts, [as_response(p, c) for p, c in zip(prompts, completions)]))
    trl_ids = tokenizer([p + c for p, c in zip(prompts, completions)], add_special_tokens=False)["input_ids"]
    assert not torch.allclose(bridged, scorer.score_ids(trl_ids), atol=1e-4)
    clipped = ProxyReward(scorer, "rm", clip=0.01)(prompts=prompts, completions=completions)
    assert all(abs(r) <= 0.01 for r in clipped)


def test_rerun_with_other_settings_is_refused_and_resume_false_starts_over(tmp_path, embedded_rms):
    from pipelines import rloo

    recipe = rloo_recipe(tmp_path, embedded_rms, max_steps=2, save_steps=1, gold_eval_steps=0)
    rloo.main(["--config", recipe])
    out = tmp_path / "rloo"
    before = snapshot(out)
    with pytest.raises(UserError, match=r"checkpoint-2 was trained with other settings \(beta\)"):
        rloo.main(["--config", recipe, "--beta", "0.1"])
    assert snapshot(out) == before  # refused before touching anything
    metrics = rloo.main(["--config", recipe, "--beta", "0.1", "--resume", "false"])
    assert metrics["resumed_from_update"] is None and metrics["beta"] == 0.1
    assert [p["step"] for p in metrics["gold_curve"]] == [0, 2]


@pytest.mark.slow
def test_killed_rloo_resumes_from_its_checkpoint(tmp_path, embedded_rms):
    """SIGKILL after the first checkpoint, rerun: it continues from that update (not from 0), ends with every
    update done once and one gold evaluation per step, as an uninterrupted run's."""
    recipe = rloo_recipe(tmp_path, embedded_rms, max_steps=10, save_total_limit=2)
    out = tmp_path / "rloo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "pipelines.rloo", "--config", recipe]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / WORK).glob("checkpoint-*/gold_history.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(p.parent.name.split("-")[1]) for p in (out / WORK).glob("checkpoint-*/gold_history.json"))
    assert saved and saved[-1] < 10, "the run should be killed mid-training"
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from" in rerun.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    resumed = metrics["resumed_from_update"]
    assert resumed is not None and resumed >= saved[-1] and metrics["updates"] == 10
    assert [p["step"] for p in metrics["gold_curve"]] == [0, 2, 4, 6, 8, 10]
    steps = [e["step"] for e in metrics["rloo_log"] if "kl" in e]
    assert steps == list(range(1, 11))  # TRL's log over both runs: every update once
    assert Path(out / "model.safetensors").exists()


@pytest.mark.slow
def test_rloo_in_two_cpu_processes(tmp_path, embedded_rms):
    """NPROC=2 (torchrun, gloo): each rank samples its share of every update and of the gold evaluation."""
    from transformers import AutoModelForCausalLM

    recipe = rloo_recipe(tmp_path, embedded_rms, max_steps=2, save_strategy="no")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "pipelines.rloo",
               "--config", recipe]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "rloo" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["episodes_per_update"] == 16 and metrics["updates"] == 2
    assert metrics["gold_curve"][-1]["n"] == 12  # both ranks' evaluation samples gathered
    AutoModelForCausalLM.from_pretrained(tmp_path / "rloo")


def test_make_plan_tells_the_rloo_stage_and_its_batch_arithmetic(tmp_path):
    from aplot.plan import detect_stage, make_plan

    assert detect_stage("recipes/rloo/embedded.yaml") == "rloo"  # its own keys, beside the policy stage's shared ones
    assert detect_stage("recipes/ppo/embedded.yaml") == "ppo"
    plan = make_plan(["--config", "recipes/rloo/embedded.yaml", "--nproc", "2", "--output_dir", str(tmp_path / "x")])
    n = plan.numbers
    assert n["global_batch"] == 32 * 2 * 2 and n["updates"] == 40 and n["tokens_per_step"] == 128 * 16
    assert "16 prompts" not in plan.format() and "32 prompts x num_generations 4" in plan.format()
    assert {"policy", "reference", "reward model"} <= set(plan.models) and not (tmp_path / "x").exists()
