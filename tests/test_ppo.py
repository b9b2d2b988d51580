"""PPO stage: a short run end to end, the tokenizer check and its bridge, resume after SIGKILL."""

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


def ppo_recipe(tmp_path, embedded_rms, **keys):
    rms, policy = embedded_rms
    recipe = {"sft_model_path": policy, "reward_model_path": rms[1], "gold": "embedded", "n_prompts": 64,
              "n_eval_prompts": 6, "eval_samples_per_prompt": 2, "gold_eval_steps": 2, "total_episodes": 64,
              "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "num_mini_batches": 1,
              "num_ppo_epochs": 2, "response_length": 10, "stop_token": "eos", "learning_rate": 3.0e-5,
              "temperature": 1.0, "bf16": False, "gradient_checkpointing": False, "num_sample_generations": 0,
              "save_strategy": "steps", "save_steps": 2, "save_total_limit": 1, "report_to": "none",
              "disable_tqdm": True, "output_dir": str(tmp_path / "ppo"), "seed": 0, **keys}
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_short_ppo_run_checkpoints_measures_gold_and_saves_a_loadable_policy(tmp_path, embedded_rms):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines import ppo

    metrics = ppo.main(["--config", ppo_recipe(tmp_path, embedded_rms)])
    out = tmp_path / "ppo"
    assert metrics["updates"] == 4  # 64 episodes / (8 x 2) per update
    steps = [p["step"] for p in metrics["gold_curve"]]
    assert steps == [0, 2, 4]  # before, every 2 updates, and the last
    before, after = metrics["before"], metrics["after"]
    assert before["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference before the first update
    assert after["kl"] != pytest.approx(0.0, abs=1e-4)  # and not after
    assert all(-0.5 <= p["gold"] <= 1.0 and p["n"] == 12 for p in metrics["gold_curve"])
    assert (out / "gold_vs_kl.png").stat().st_size > 0 and json.loads((out / "gold_curve.json").read_text())
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]  # save_total_limit 1
    assert (out / "checkpoint-4" / "value_model" / "model.safetensors").exists()
    policy = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(embedded_rms[1])
    changed = any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(),
                                                         reference.state_dict().values()))
    assert changed and AutoTokenizer.from_pretrained(out).pad_token_id == AutoTokenizer.from_pretrained(
        embedded_rms[1]).pad_token_id


@pytest.fixture(scope="module")
def foreign_rm(tmp_path_factory):
    """A reward model trained with another tokenizer (other BPE merges) than the embedded policy's."""
    from aplot.data.world import build_tokenizer
    from pipelines import rm
    from tests.conftest import tiny_rm_argv

    root = tmp_path_factory.mktemp("foreign")
    build_tokenizer(seed=1, vocab_size=600).save_pretrained(root / "tokenizer")
    rm.main(tiny_rm_argv(root / "rm", "--tokenizer_name_or_path", str(root / "tokenizer"), "--eval_strategy", "no"))
    return str(root / "rm")


def test_tokenizer_mismatch_is_refused_at_start_up_with_one_line(tmp_path, embedded_rms, foreign_rm):
    from pipelines import ppo

    recipe = ppo_recipe(tmp_path, embedded_rms, reward_model_path=foreign_rm)
    with pytest.raises(UserError) as err:
        ppo.main(["--config", recipe])
    message = str(err.value)
    assert message.startswith(f"policy {embedded_rms[1]} and reward model {foreign_rm} have different tokenizers (")
    assert "retokenize_rewards: true" in message and "\n" not in message
    assert not (tmp_path / "ppo").exists()  # refused before any work


def test_bridge_scores_policy_tokens_as_the_reward_model_scores_the_text(embedded_rms, foreign_rm):
    """What TRL's PPO reads from the bridge (its own get_reward on policy ids) equals the reward
    model's score of the decoded text, encoded with its own tokenizer."""
    from trl.experimental.utils import get_reward

    from aplot.ppo import RetokenizedReward
    from aplot.reward_model import RewardScorer, load_reward_model, load_tokenizer

    policy_tokenizer = load_tokenizer(embedded_rms[1])
    model, tokenizer = load_reward_model(foreign_rm, device="cpu")
    scorer = RewardScorer(model, tokenizer)
    prompts = ["Write about river, stone and cloud. Do not use fire.\nAnswer:",
               "Write about apple, bread and milk. Do not use salt.\nAnswer:"]
    responses = [" river stone the cloud", " bread"]
    queries = [policy_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    bridge = RetokenizedReward(scorer, policy_tokenizer, prompts, queries)
    pad, eos = policy_tokenizer.pad_token_id, policy_tokenizer.eos_token_id
    width = max(map(len, queries))
    rows = []
    for q, r in zip(queries, responses):
        ids = policy_tokenizer(r, add_special_tokens=False)["input_ids"] + [eos]
        rows.append([pad] * (width - len(q)) + q + ids)
    length = max(map(len, rows))
    ids = torch.tensor([row + [pad] * (length - len(row)) for row in rows])
    _, scores, _ = get_reward(bridge, ids, pad, width)
    expected = scorer.score(prompts, responses)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1])


def test_ppo_through_the_bridge_runs(tmp_path, embedded_rms, foreign_rm):
    from pipelines import ppo

    metrics = ppo.main(["--config", ppo_recipe(tmp_path, embedded_rms, reward_model_path=foreign_rm,
                                               retokenize_rewards=True, total_episodes=32, save_strategy="no")])
    assert metrics["updates"] == 2 and [p["step"] for p in metrics["gold_curve"]] == [0, 2]


@pytest.mark.slow
def test_killed_ppo_resumes_from_its_checkpoint(tmp_path, embedded_rms):
    """SIGKILL after the first checkpoint, rerun: it continues from that update (not from 0), ends with
    every update done once and one gold evaluation per step."""
    recipe = ppo_recipe(tmp_path, embedded_rms, total_episodes=160, save_total_limit=2)  # 10 updates
    out = tmp_path / "ppo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "pipelines.ppo", "--config", recipe]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob(".aplot-run/checkpoint-*/gold_history.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(p.parent.name.split("-")[1]) for p in out.glob(".aplot-run/checkpoint-*/gold_history.json"))
    assert saved and saved[-1] < 10, "the run should be killed mid-training"
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from" in rerun.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    resumed = metrics["resumed_from_update"]
    assert resumed is not None and resumed >= saved[-1] and metrics["updates"] == 10
    assert [p["step"] for p in metrics["gold_curve"]] == [0, 2, 4, 6, 8, 10]
    assert Path(out / "model.safetensors").exists()


@pytest.mark.slow
def test_ppo_with_zero2_in_two_cpu_processes(tmp_path, embedded_rms):
    """The shared ZeRO-2 config drives PPO across two gloo ranks; the saved policy loads plainly."""
    from transformers import AutoModelForCausalLM

    recipe = ppo_recipe(tmp_path, embedded_rms, total_episodes=64, save_strategy="no",
                        deepspeed="recipes/deepspeed/zero2.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "pipelines.ppo",
               "--config", recipe]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["zero_stage"] == 2
    assert metrics["episodes_per_update"] == 32 and metrics["updates"] == 2  # 8 x 2 accumulation x 2 ranks
    assert metrics["gold_curve"][-1]["n"] == 12  # both ranks' evaluation samples gathered
    AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")


def test_real_ppo_recipe_parses_and_takes_its_prompts_from_the_dataset_format(tmp_path):
    from aplot.config import RecipeParser
    from aplot.data import load_prompts
    from aplot.ppo import APLOTPPOConfig

    # bf16 and DeepSpeed need GPUs: everything else is the recipe as a GPU node reads it.
    (cfg,) = RecipeParser((APLOTPPOConfig,)).parse_recipe(
        ["--config", "recipes/ppo/unified-feedback-qwen2.5-1.5b.yaml", "--bf16", "false", "--deepspeed", "",
         "--output_dir", str(tmp_path)])
    assert cfg.sft_model_path == "Qwen/Qwen2.5-1.5B-Instruct" and cfg.prompt_format == "ratings"
    assert cfg.reward_model_path == "outputs/rm/unified-feedback-qwen2.5-0.5b" and cfg.response_length == 256
    prompts = load_prompts("tests/fixtures/unified_feedback.jsonl", cfg.prompt_split, 2, cfg.prompt_format)
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)


def test_demo_summary_reads_each_stage_and_names_a_missing_one(tmp_path, embedded_rms):
    from pipelines import ppo, summary

    ppo.main(["--config", ppo_recipe(tmp_path, embedded_rms, total_episodes=16, save_strategy="no")])
    text = summary.main(["--rm", *embedded_rms[0], "--bon", "", "--ppo", str(tmp_path / "ppo")])
    assert "gold before" in text and Path(embedded_rms[0][1]).name in text
    assert (tmp_path / "gold_vs_kl.png").exists()  # every PPO run's curve in one figure
    with pytest.raises(UserError, match=r"^/nonexistent/metrics.json does not exist: run that stage first$"):
        summary.main(["--rm", "/nonexistent"])


def test_rerun_with_other_settings_is_refused_and_resume_false_starts_over(tmp_path, embedded_rms):
    from pipelines import ppo

    recipe = ppo_recipe(tmp_path, embedded_rms, total_episodes=16, save_steps=1)
    ppo.main(["--config", recipe])
    out = tmp_path / "ppo"
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match=r"checkpoint-1 was trained with other settings \(kl_coef\)"):
        ppo.main(["--config", recipe, "--kl_coef", "0.2"])
    assert sorted(p.name for p in out.iterdir()) == before  # refused before touching anything
    metrics = ppo.main(["--config", recipe, "--kl_coef", "0.2", "--resume", "false"])
    assert metrics["resumed_from_update"] is None and metrics["kl_coef"] == 0.2
