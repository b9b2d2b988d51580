"""Reward normalisation and model cards: `make rm` records its reward stats in config.json and writes a
README.md card; the shared scorer and PPO's reward read `(r - mean) / std` (and PPO clips) from them."""

import json
from importlib.metadata import version

import pytest
import torch

from aplot.errors import UserError
from tests.conftest import tiny_rm_argv

pytestmark = pytest.mark.core


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pipelines import rm

    out = tmp_path_factory.mktemp("rm") / "card-aplot"
    metrics = rm.main(tiny_rm_argv(out, "--eval_strategy", "no"))
    return out, metrics


def test_rm_records_reward_stats_the_scorer_then_normalises_with(trained):
    from aplot.data import world
    from aplot.reward_model import RewardScorer, load_reward_model

    out, metrics = trained
    stats = json.loads((out / "config.json").read_text())["reward_stats"]
    assert stats == metrics["reward_stats"]
    assert (stats["eval_set"], stats["pairs"], stats["responses"]) == ("test_id", 40, 80)
    # the same numbers from the published model, scored afresh on the held-out split
    model, tokenizer = load_reward_model(str(out), device="cpu")
    rows = world.generate_split("test_id", 40, 0, 0.5, 0.0)
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    raw = RewardScorer(model, tokenizer, max_length=128).score(prompts, responses).double()
    assert stats["mean"] == pytest.approx(raw.mean().item(), abs=1e-5)
    assert stats["std"] == pytest.approx(raw.std(unbiased=False).item(), rel=1e-4)
    normalized = RewardScorer(model, tokenizer, max_length=128, normalize=True).score(prompts, responses)
    torch.testing.assert_close(normalized.double(), (raw - stats["mean"]) / stats["std"], atol=1e-5, rtol=1e-5)


def test_rm_writes_a_model_card_with_recipe_data_metrics_command_and_versions(trained):
    out, metrics = trained
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card  # TRL's card metadata
    assert "tags:\n- generated_from_trainer\n- aplot\n- reward-model\n" in card
    assert "This model was trained from `recipes/models/tiny-qwen2`." in card
    assert "| `loss_type` | `aplot` |" in card and "| `n_train` | `48` |" in card
    counts = metrics["data"]["train"]
    assert f"| train | {counts['rows_read']} | {counts['kept']} | 0 | {counts['pairs']} |" in card
    assert "| test_id | 40 | 40 | 0 | 40 |" in card
    assert '"train_steps": 3' in card and f'"std": {metrics["reward_stats"]["std"]}' in card
    assert "- command line: `" in card
    for package in ("torch", "transformers", "trl", "datasets", "deepspeed", "aplot"):
        assert f"| {package} | {version(package)} |" in card


def test_write_model_card_links_only_hub_ids(tmp_path):
    from aplot.cards import write_model_card

    path = write_model_card(tmp_path, kind="policy", base_model="Qwen/Qwen2.5-0.5B", recipe={"kl_coef": 0.05},
                            data_counts={"prompts": {"rows_read": 3, "kept": 2, "dropped": {"too long": 1}}},
                            metrics=None, trainer="TRL's PPOTrainer")
    card = path.read_text()
    assert "base_model: Qwen/Qwen2.5-0.5B" in card and "[Qwen/Qwen2.5-0.5B](https://huggingface.co/Qwen" in card
    assert "| prompts | 3 | 2 | too long: 1 | - |" in card and "No metrics recorded." in card
    assert "This model was trained with TRL's PPOTrainer." in card
    with pytest.raises(ValueError):
        write_model_card(tmp_path, kind="critic", base_model=None, recipe={})


@pytest.mark.ppo
def test_ppo_reward_is_normalised_and_clipped_through_trls_get_reward(trained):
    from trl.experimental.utils import get_reward

    from aplot.ppo import ScaledReward
    from aplot.reward_model import load_reward_model, normalization

    out, _ = trained
    model, tokenizer = load_reward_model(str(out), device="cpu")
    pad = tokenizer.pad_token_id
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in
           ("Write about apple. Do not use cloud.\nAnswer: apple river", "Write about stone.\nAnswer: cloud")]
    width = max(map(len, ids)) + 2
    batch = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    mean, std = normalization(model)
    with torch.no_grad():
        _, raw, _ = get_reward(model, batch, pad, 4)
        _, scaled, _ = get_reward(ScaledReward(model, mean, std), batch, pad, 4)
        clip = float(((raw - mean) / std).abs().min()) / 2  # clips both
        _, clipped, _ = get_reward(ScaledReward(model, mean, std, clip), batch, pad, 4)
    torch.testing.assert_close(scaled, (raw - mean) / std)
    torch.testing.assert_close(clipped, ((raw - mean) / std).clamp(-clip, clip))
    assert clipped.abs().max().item() == pytest.approx(clip)


@pytest.mark.ppo
def test_ppo_reward_clip_is_checked_and_a_changed_clip_refuses_to_resume(tmp_path):
    from aplot.outputs import RunPlan
    from aplot.ppo import APLOTPPOConfig
    from pipelines.ppo import GOLD_HISTORY, run_settings

    with pytest.raises(UserError) as err:
        APLOTPPOConfig(output_dir=str(tmp_path / "x"), reward_clip=0.0, report_to="none", bf16=False)
    assert str(err.value) == "reward_clip must be > 0.0, got 0.0"
    args = APLOTPPOConfig(output_dir=str(tmp_path / "ppo"), report_to="none", bf16=False)
    out = tmp_path / "ppo"
    checkpoint = out / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"")
    (checkpoint / GOLD_HISTORY).write_text("[]")
    (out / "run_settings.json").write_text(json.dumps(run_settings(args), default=str))
    assert RunPlan(out, True, run_settings(args), marker=GOLD_HISTORY, stage="ppo").checkpoint == checkpoint
    args.reward_clip, args.normalize_rewards = 5.0, True
    with pytest.raises(UserError) as err:
        RunPlan(out, True, run_settings(args), marker=GOLD_HISTORY, stage="ppo")
    assert "(normalize_rewards, reward_clip)" in str(err.value)


@pytest.mark.ppo
def test_ppo_optimises_the_clipped_normalised_reward_and_writes_a_policy_card(tmp_path, trained):
    """One PPO update of an untrained tiny policy (the world's tokenizer, as the reward model's)."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from aplot.data import world
    from pipelines import ppo

    rm_dir, _ = trained
    tokenizer = world.build_tokenizer()
    config = AutoConfig.from_pretrained("recipes/models/tiny-qwen2")
    config.update({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                   "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None, "architectures": None})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    recipe = {"sft_model_path": str(tmp_path / "policy"), "reward_model_path": str(rm_dir), "gold": "embedded",
              "n_prompts": 16, "n_eval_prompts": 2, "eval_samples_per_prompt": 2, "gold_eval_steps": 0,
              "total_episodes": 16, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
              "num_mini_batches": 1, "num_ppo_epochs": 1, "response_length": 6, "stop_token": "eos",
              "bf16": False, "gradient_checkpointing": False, "num_sample_generations": 0, "save_strategy": "no",
              "report_to": "none", "disable_tqdm": True, "output_dir": str(tmp_path / "ppo"), "seed": 0,
              "logging_steps": 1, "normalize_rewards": True, "reward_clip": 0.001}
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(recipe))
    metrics = ppo.main(["--config", str(tmp_path / "ppo.yaml")])
    scores = [log["objective/scores"] for log in metrics["ppo_log"] if "objective/scores" in log]
    assert scores and all(abs(s) <= 0.001 + 1e-7 for s in scores)
    card = (tmp_path / "ppo" / "README.md").read_text()
    assert "- policy\n" in card and "This model was trained with TRL's PPOTrainer." in card
    assert "| `reward_clip` | `0.001` |" in card and "| `normalize_rewards` | `true` |" in card
    assert "| prompts | 16 | 16 | 0 | - |" in card and '"updates": 1' in card
