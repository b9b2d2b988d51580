"""The shapes of the models users bring, through every stage: the Qwen2.5-shaped preset (151,936 tied
embedding rows for a small tokenizer, grouped-query attention, ChatML with pad != eos, bf16), tested at
the places where reward-model pipelines break. Real components throughout; the preset's lineage is
trained for two steps a stage (its shapes, not its quality, are under test)."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from aplot.errors import UserError
from tests.conftest import ROOT, make_preset, tiny_rm_argv

QWEN = "recipes/models/qwen2.5-shaped"
ROWS = 151_936


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from transformers import AutoTokenizer

    from aplot import lineage

    root = tmp_path_factory.mktemp("qwen")
    preset = yaml.safe_load((ROOT / QWEN / "preset.yaml").read_text())
    preset["base"].update(documents=32, save_steps=1000)
    preset["sft"].update(examples=32, save_steps=1000)
    path = make_preset(root, "qwen2.5-shaped", yaml.safe_dump(preset), config=f"{QWEN}/config.json")
    sft = lineage.policy_path(path, str(root / "lineage"))
    return SimpleNamespace(preset=path, lineage=str(root / "lineage"), sft=sft, root=root,
                           tokenizer=AutoTokenizer.from_pretrained(sft))


def chat_pairs(n=6, split="test_id"):
    from datasets import Dataset

    from aplot.data import world

    return Dataset.from_list([world.as_chat(r) for r in world.generate_split(split, n, 0)])


def test_preset_lineage_has_qwen25_shapes_roles_and_tied_embeddings(qwen):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tok = qwen.tokenizer
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>") and tok.pad_token_id != tok.eos_token_id
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|fim_pad|>"} <= set(tok.get_vocab())
    assert len(tok) < ROWS
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    for stage in ("base", "sft"):
        path = Path(qwen.lineage) / "qwen2.5-shaped" / stage
        model = AutoModelForCausalLM.from_pretrained(path)
        cfg = model.config
        assert (cfg.vocab_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (ROWS, 14, 2, 896)
        assert model.get_input_embeddings().weight.shape[0] == ROWS and cfg.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()  # stored once, tied again on load


def test_reward_model_from_sft_gets_a_new_head_and_keeps_every_embedding_row(qwen, tmp_path):
    from safetensors.torch import load_file

    from aplot.reward_model import RewardScorer, build_reward_model, load_reward_model

    torch.manual_seed(0)
    model = build_reward_model(qwen.sft, qwen.tokenizer).eval()
    sft = load_file(f"{qwen.sft}/model.safetensors")
    assert torch.equal(model.model.embed_tokens.weight, sft["model.embed_tokens.weight"])
    assert model.score.weight.shape == (1, 896) and "score.weight" not in sft
    model.save_pretrained(tmp_path / "rm")
    qwen.tokenizer.save_pretrained(tmp_path / "rm")
    loaded, tok = load_reward_model(str(tmp_path / "rm"), device="cpu")
    assert loaded.config.vocab_size == ROWS and loaded.model.embed_tokens.weight.shape[0] == ROWS
    pairs = chat_pairs()
    before = RewardScorer(model, qwen.tokenizer).score(pairs["prompt"], pairs["chosen"])
    torch.testing.assert_close(RewardScorer(loaded, tok).score(pairs["prompt"], pairs["chosen"]), before)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_is_read_at_the_last_non_pad_token_whatever_the_padding(qwen, pad_is_eos):
    from aplot.data import world
    from aplot.reward_model import RewardScorer, build_reward_model

    tok = copy.deepcopy(qwen.tokenizer)
    if pad_is_eos:  # as many checkpoints ship: padding with the eos token
        tok.pad_token = tok.eos_token
    pad = tok.pad_token_id
    torch.manual_seed(0)
    model = build_reward_model(qwen.sft, tok).eval()
    assert model.config.pad_token_id == pad
    rows = world.generate_split("test_id", 5, 0)
    scorer = RewardScorer(model, tok, batch_size=5)
    ids = scorer.encode_all([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    assert len(set(map(len, ids))) > 1 and all(x[-1] == tok.eos_token_id for x in ids)  # padding will happen
    with torch.no_grad():
        alone = []
        for x in ids:  # one sequence, no padding: the reward at the last token that is not pad
            out = model(torch.tensor([x]), output_hidden_states=True)
            last = max(i for i, t in enumerate(x) if t != pad)
            assert last == len(x) - (2 if pad_is_eos else 1)
            expected = model.score(out.hidden_states[-1][0, last])[0]
            torch.testing.assert_close(out.logits[0, 0], expected)
            alone.append(out.logits[0, 0])
        right = scorer.score_ids(ids)  # the shared scorer pads on the right
        width = max(map(len, ids))
        left_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        left = model(left_ids, attention_mask=(torch.arange(width) >= width - torch.tensor(
            [[len(x)] for x in ids])).long()).logits[:, 0]
    torch.testing.assert_close(right, torch.stack(alone), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(left, torch.stack(alone), atol=1e-4, rtol=1e-4)


def test_conversations_are_tokenised_as_the_chat_template_renders_them_in_every_stage(qwen):
    from aplot.bon import as_response
    from aplot.ppo import RetokenizedReward, rendering_mismatch
    from aplot.reward_model import RewardScorer, build_reward_model, tokenize_pairs
    from pipelines.bon import score_samples

    tok = qwen.tokenizer
    pairs = chat_pairs()
    rendered = [tok.apply_chat_template(p + c, tokenize=True, return_dict=False)
                for p, c in zip(pairs["prompt"], pairs["chosen"])]
    # training (the trainer's chosen_ids) and evaluation (the scorer) encode alike
    trained, _ = tokenize_pairs(pairs, tok, max_length=None)
    assert [list(x) for x in trained["chosen_ids"]] == rendered
    torch.manual_seed(0)
    scorer = RewardScorer(build_reward_model(qwen.sft, tok).eval(), tok)
    assert scorer.encode_all(pairs["prompt"], pairs["chosen"]) == rendered
    expected = scorer.score_ids(rendered)
    # Best-of-N scores sampled texts through the same rendering
    prompts, texts = list(pairs["prompt"]), [c[-1]["content"] for c in pairs["chosen"]]
    bon = score_samples(scorer, prompts, [((i, 0), t) for i, t in enumerate(texts)])
    torch.testing.assert_close(torch.tensor(bon), expected)
    # PPO: the token ids PPO scores lack the template's closing newline, so they are refused as they are...
    queries = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
               for p in prompts]
    assert "render responses differently" in rendering_mismatch(tok, scorer, prompts[0], queries[0])
    # ...and the bridge re-renders each response exactly as training did
    bridge = RetokenizedReward(scorer, tok, prompts, queries)
    sequences = [q + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for q, t in zip(queries, texts)]
    width = max(map(len, sequences))
    batch = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in sequences])
    hidden = bridge.backbone(batch, batch != tok.pad_token_id).hidden_states[-1][:, -1]
    torch.testing.assert_close(bridge.score(hidden)[:, 0], expected, atol=1e-5, rtol=1e-5)
    assert [as_response(p, t) for p, t in zip(prompts, texts)] == list(pairs["chosen"])


def test_same_vocabulary_other_chat_template_is_refused_before_ppo(qwen, tmp_path):
    from aplot.data.world import CHAT_TEMPLATE
    from aplot.reward_model import build_reward_model
    from pipelines import ppo

    other = tmp_path / "rm"
    torch.manual_seed(0)
    build_reward_model(qwen.sft, qwen.tokenizer).save_pretrained(other)
    qwen.tokenizer.save_pretrained(other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # ChatML without the default system turn
    config.pop("chat_template", None)
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(yaml.safe_dump({
        "sft_model_path": qwen.sft, "reward_model_path": str(other), "prompt_format": "conversational",
        "n_prompts": 16, "n_eval_prompts": 2, "total_episodes": 16, "per_device_train_batch_size": 4,
        "response_length": 8, "output_dir": str(tmp_path / "out"), "report_to": "none", "bf16": False}))
    with pytest.raises(UserError) as err:
        ppo.main(["--config", str(recipe)])
    message = str(err.value)
    assert message.startswith(f"policy {qwen.sft} and reward model {other} render responses differently (")
    assert "<|im_start|>system" in message and "retokenize_rewards: true" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_bf16_reward_model_trains_with_finite_margins(qwen, tmp_path):
    from pipelines import rm

    metrics = rm.main(tiny_rm_argv(tmp_path / "rm", "--model_name_or_path", qwen.preset, "--init_from", "sft",
                                   "--lineage_dir", qwen.lineage, "--dtype", "bfloat16", "--bf16", "true",
                                   "--use_cpu", "true", "--dataset_format", "conversational", "--eval_strategy", "no",
                                   "--max_steps", "2"))
    logs = json.loads((tmp_path / "rm" / "log_history.json").read_text())
    steps = [r for r in logs if "loss" in r]
    assert len(steps) == 2 and metrics["train_steps"] == 2
    assert all(math.isfinite(r[k]) for r in steps for k in ("loss", "loss_margin_mean", "loss_margin_min"))
    assert math.isfinite(metrics["eval"]["test_id"]["accuracy"])
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["vocab_size"] == ROWS and saved["dtype"] == "bfloat16"


@pytest.mark.slow
def test_qwen_shaped_chain_rm_bon_vllm_ppo(qwen, tmp_path):
    """rm from the SFT checkpoint -> Best-of-N with vLLM -> PPO through the bridge, on chat prompts."""
    from transformers import AutoModelForCausalLM

    from pipelines import ppo, rm

    rm_dir = tmp_path / "rm"
    rm.main(tiny_rm_argv(rm_dir, "--model_name_or_path", qwen.preset, "--init_from", "sft", "--lineage_dir",
                         qwen.lineage, "--dataset_format", "conversational", "--eval_strategy", "no"))
    recipe = tmp_path / "bon.yaml"
    recipe.write_text(yaml.safe_dump({
        "policy_name_or_path": qwen.preset, "lineage_dir": qwen.lineage, "reward_models": [str(rm_dir)],
        "prompt_format": "conversational", "n_prompts": 2, "n_samples": 4, "backend": "vllm",
        "max_new_tokens": 8, "output_dir": str(tmp_path / "bon")}))
    done = subprocess.run([sys.executable, "-m", "pipelines.bon", "--config", str(recipe)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    samples = [json.loads(line) for line in (tmp_path / "bon" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(isinstance(s["response"], str) for s in samples)
    assert set(json.loads((tmp_path / "bon" / "metrics.json").read_text())["gold_at_n"]) == {"rm"}

    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(yaml.safe_dump({
        "sft_model_path": qwen.preset, "lineage_dir": qwen.lineage, "reward_model_path": str(rm_dir),
        "prompt_format": "conversational", "retokenize_rewards": True, "n_prompts": 16, "n_eval_prompts": 2,
        "eval_samples_per_prompt": 1, "gold_eval_steps": 0, "total_episodes": 8, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "num_ppo_epochs": 1, "local_rollout_forward_batch_size": 4,
        "response_length": 6, "save_strategy": "no", "num_sample_generations": 0, "report_to": "none",
        "disable_tqdm": True, "bf16": False, "output_dir": str(tmp_path / "ppo")}))
    metrics = ppo.main(["--config", str(recipe)])
    assert metrics["updates"] == 2 and all(math.isfinite(p["gold"]) for p in metrics["gold_curve"])
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")
    assert policy.get_input_embeddings().weight.shape[0] == ROWS
    assert policy.lm_head.weight.data_ptr() == policy.get_input_embeddings().weight.data_ptr()


def test_as_chat_renders_string_pairs_as_chat_turns_in_training_and_after_loading(qwen, tmp_path):
    from aplot.data import world
    from aplot.reward_model import RewardScorer, load_reward_model
    from pipelines import rm

    rm.main(tiny_rm_argv(tmp_path / "rm", "--model_name_or_path", qwen.preset, "--lineage_dir", qwen.lineage,
                         "--as_chat", "true", "--eval_strategy", "no", "--max_steps", "1"))
    model, tok = load_reward_model(str(tmp_path / "rm"), device="cpu")
    row = world.generate_split("test_id", 1, 0)[0]
    turns = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["chosen"]}]
    expected = tok.apply_chat_template(turns, tokenize=True, return_dict=False)
    assert RewardScorer(model, tok).encode(row["prompt"], row["chosen"]) == expected  # as its config records
    assert RewardScorer(model, tok, chat=False).encode(row["prompt"], row["chosen"]) != expected
