"""Real pretrained checkpoints at the places every stage breaks on them: SmolLM2-135M-Instruct (pad == eos ==
`<|im_end|>`, a ChatML template with a default system turn, tied embeddings) and all-MiniLM-L6-v2 (a BERT
encoder read at its first token). Real components throughout: the imported checkpoints, their own
tokenizers, TRL's PPO functions, vLLM; each case is a few forward passes (the checkpoints are not trained
here beyond a step or two)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.conftest import ROOT, tiny_rm_argv

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def imported(preset: str) -> str:
    """The plain HF directory of a real checkpoint preset, imported once into outputs/lineage/ (make test
    imports the small ones first)."""
    from aplot import lineage

    return lineage.policy_path(preset)


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    path = imported("smollm2-135m-instruct")
    return SimpleNamespace(path=path, tokenizer=AutoTokenizer.from_pretrained(path))


@pytest.fixture(scope="module")
def smol_rm(smol):
    from aplot.reward_model import RewardScorer, build_reward_model

    torch.manual_seed(0)
    model = build_reward_model(smol.path, smol.tokenizer).eval()
    return RewardScorer(model, smol.tokenizer, batch_size=8)


def chat_pairs(n=4, split="test_id"):
    from datasets import Dataset

    from aplot.data import world

    return Dataset.from_list([world.as_chat(r) for r in world.generate_split(split, n, 0)])


# SmolLM2 always; the Qwen preset too under `APLOT_TEST_IMPORTS=qwen2.5-0.5b-instruct` (as make test-qwen sets it)
CHAT_PRESETS = ["smollm2-135m-instruct", *os.environ.get("APLOT_TEST_IMPORTS", "").split()]


@pytest.mark.parametrize("preset", CHAT_PRESETS)
def test_every_stage_encodes_chat_as_the_checkpoints_own_template(preset):
    """Training pairs, the scorer (evaluation, Best-of-N), Best-of-N's prompt text and PPO's queries: the very
    ids of the checkpoint tokenizer's own apply_chat_template."""
    from transformers import AutoTokenizer

    from aplot.bon import policy_inputs
    from aplot.reward_model import RewardScorer, tokenize_pairs
    from pipelines.ppo import encode_prompts

    path = imported(preset)
    tok = AutoTokenizer.from_pretrained(path)
    pairs = chat_pairs(6)
    for column in ("chosen", "rejected"):
        rendered = [tok.apply_chat_template(p + c, tokenize=True, return_dict=False)
                    for p, c in zip(pairs["prompt"], pairs[column])]
        assert [list(x) for x in tokenize_pairs(pairs, tok, max_length=None)[0][f"{column}_ids"]] == rendered
        assert RewardScorer(None, tok).encode_all(pairs["prompt"], pairs[column]) == rendered
    prompts = list(pairs["prompt"])
    queries, _ = encode_prompts(tok, prompts, None)
    assert queries == [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                       for p in prompts]
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in policy_inputs(path, prompts)] == queries


def test_smollm2_roles_template_and_tied_embeddings_survive_a_save(smol, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tok = smol.tokenizer
    assert (tok.eos_token, tok.pad_token, tok.eos_token_id) == ("<|im_end|>", "<|im_end|>", 2)
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                       tokenize=False)
    assert rendered == (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\nYo<|im_end|>\n")
    model = AutoModelForCausalLM.from_pretrained(smol.path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert again.lm_head.weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()
    for path in (Path(smol.path), tmp_path / "again"):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()  # stored once, tied again on load
    torch.testing.assert_close(again.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_reward_model_from_smollm2_says_new_score_head_in_one_line(smol, capfd):
    from aplot.reward_model import build_reward_model

    build_reward_model(smol.path, smol.tokenizer)
    out, err = capfd.readouterr()
    assert f"new score head on {smol.path} (LlamaForSequenceClassification, score.weight initialised)" in out
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err and "not sharded" not in out + err


def test_chat_ids_equal_apply_chat_template_in_training_scoring_bon_and_ppo(smol, smol_rm):
    from aplot.bon import policy_inputs
    from aplot.ppo import RetokenizedReward, rendering_mismatch
    from aplot.reward_model import tokenize_pairs
    from pipelines.bon import score_samples
    from pipelines.ppo import encode_prompts

    tok = smol.tokenizer
    pairs = chat_pairs()
    rendered = [tok.apply_chat_template(p + c, tokenize=True, return_dict=False)
                for p, c in zip(pairs["prompt"], pairs["chosen"])]
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    assert all(SMOL_SYSTEM in tok.decode(r) and r[-2:] == [2, newline] for r in rendered)  # <|im_end|>\n
    trained, _ = tokenize_pairs(pairs, tok, max_length=None)  # training: the trainer's chosen_ids
    assert [list(x) for x in trained["chosen_ids"]] == rendered
    assert smol_rm.encode_all(pairs["prompt"], pairs["chosen"]) == rendered  # evaluation
    expected = smol_rm.score_ids(rendered)
    prompts, texts = list(pairs["prompt"]), [c[-1]["content"] for c in pairs["chosen"]]
    # Best-of-N: the policy's prompt text tokenises back to the template's ids; samples score as trained
    queries, _ = encode_prompts(tok, prompts, None)
    assert queries == [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                       for p in prompts]
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in policy_inputs(smol.path, prompts)] == queries
    bon = score_samples(smol_rm, prompts, [((i, 0), t) for i, t in enumerate(texts)])
    torch.testing.assert_close(torch.tensor(bon), expected)
    # PPO ends the sequence at <|im_end|>, without the template's newline: refused as it is, bridged exactly
    assert "render responses differently" in rendering_mismatch(tok, smol_rm, prompts[0], queries[0])
    bridge = RetokenizedReward(smol_rm, tok, prompts, queries)
    sequences = [q + tok(t, add_special_tokens=False)["input_ids"] + [2] for q, t in zip(queries, texts)]
    width = max(map(len, sequences))
    batch = torch.tensor([s + [0] * (width - len(s)) for s in sequences])  # PPO's pad: <|endoftext|>
    hidden = bridge.backbone(batch, batch != 0).hidden_states[-1][:, -1]
    torch.testing.assert_close(bridge.score(hidden)[:, 0], expected, atol=1e-5, rtol=1e-5)


def test_reward_is_read_at_the_same_token_in_training_scoring_and_ppo_under_pad_eq_eos(smol, smol_rm):
    """SmolLM2 pads with `<|im_end|>`. A chat turn closes with `<|im_end|>\\n`: the reward is read at that
    newline (the `<|im_end|>` before it is not taken for padding), by the model's own pooling (training), the
    scorer, the hidden state APLOT captures and PPO (through the bridge). String pairs end with the eos
    itself, so the reward is read at the response's last token before it, and PPO, which reads at the eos,
    is sent through the bridge (a direct path is refused, naming the two tokens)."""
    from trl.experimental.ppo.ppo_trainer import get_reward

    from aplot.data import world
    from aplot.ppo import RetokenizedReward, distinct_pad, rendering_mismatch
    from aplot.reward_model import ScoreInputCapture

    tok, model = smol.tokenizer, smol_rm.model
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    rows = world.generate_split("test_id", 3, 0)
    chat = [world.as_chat(r) for r in rows]
    for layout, prompts, responses, read_token in (
            ("chat", [c["prompt"] for c in chat], [c["chosen"] for c in chat], newline),
            ("string", [r["prompt"] for r in rows], [r["chosen"] for r in rows], None)):
        ids = smol_rm.encode_all(prompts, responses)
        capture = ScoreInputCapture(model)
        try:
            with torch.no_grad():
                for x in ids:
                    out = model(torch.tensor([x]), output_hidden_states=True)
                    captured = capture.pooled(torch.tensor([x]), 2)[0]  # what APLOT's cost reads in training
                    last = max(i for i, t in enumerate(x) if t != 2)
                    assert last == len(x) - (1 if layout == "chat" else 2), layout
                    assert x[last] == read_token if read_token else x[last + 1] == 2
                    torch.testing.assert_close(captured, out.hidden_states[-1][0, last])
                    torch.testing.assert_close(out.logits[0, 0], model.score(out.hidden_states[-1][0, last])[0])
        finally:
            capture.remove()
        alone = torch.stack([model(torch.tensor([x])).logits[0, 0].detach() for x in ids])
        torch.testing.assert_close(smol_rm.score_ids(ids), alone, atol=1e-4, rtol=1e-4)  # right-padded batches

        # PPO: the policy's prompts hold <|im_end|> (2), so the policy pads with <|endoftext|> (0) instead
        queries = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                   if layout == "chat" else tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        policy_tok = copy.deepcopy(tok)
        policy_tok.pad_token = distinct_pad(policy_tok, queries)
        assert (policy_tok.pad_token, policy_tok.pad_token_id) == ("<|endoftext|>", 0)
        message = rendering_mismatch(policy_tok, smol_rm, prompts[0], queries[0])
        assert message == ("render responses differently (PPO scores ...'apple river<|im_end|>' where the reward "
                           "model was trained on ...'apple river<|im_end|>\\n')" if layout == "chat" else
                           "read the reward at different tokens (PPO at the final '<|im_end|>', the reward model, "
                           "which pads with it, at ' river' before it)")
        texts = [r[-1]["content"] if layout == "chat" else r for r in responses]
        sequences = [q + tok(t, add_special_tokens=False)["input_ids"] + [2] for q, t in zip(queries, texts)]
        width = max(map(len, sequences))
        batch = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
        context = min(map(len, queries))
        with torch.no_grad():
            _, rewards, _ = get_reward(RetokenizedReward(smol_rm, policy_tok, prompts, queries), batch, 0, context)
        torch.testing.assert_close(rewards, alone, atol=1e-4, rtol=1e-4)


def test_policy_with_a_distinct_pad_still_stops_at_eos_in_ppo_generation(smol):
    """TRL's PPO generation with SmolLM2 padding with `<|endoftext|>`: the prompt's `<|im_end|>` tokens stay
    attended, sampling stops at `<|im_end|>`, and the response ends (TRL's sequence length) at that eos."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from trl.experimental.ppo.ppo_trainer import batch_generation, first_true_indices, truncate_response

    tok = copy.deepcopy(smol.tokenizer)
    prompts = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "Say hi."}]]
    queries = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
               for p in prompts]
    from aplot.ppo import distinct_pad

    tok.pad_token = distinct_pad(tok, queries)
    policy = AutoModelForCausalLM.from_pretrained(smol.path).eval()
    policy.generation_config.eos_token_id = 2  # TRL's stop_token: eos
    policy.config.pad_token_id = policy.generation_config.pad_token_id = tok.pad_token_id
    width = max(map(len, queries))
    query = torch.tensor([[0] * (width - len(q)) + q for q in queries])
    assert (query == 2).sum(1).tolist() == [2, 2]  # the system and user turns' <|im_end|>, attended
    config = GenerationConfig(max_new_tokens=24, do_sample=False)
    torch.manual_seed(0)
    with torch.no_grad():
        responses, _ = batch_generation(policy, query, 2, tok.pad_token_id, config)
    response = truncate_response(2, tok.pad_token_id, responses[:, width:])
    ends = first_true_indices(response == tok.pad_token_id) - 1
    assert response[0, ends[0]] == 2 and response[1, ends[1]] == 2  # both stopped, at <|im_end|>
    assert "Paris" in tok.decode(response[0], skip_special_tokens=True)


def test_minilm_encoder_reward_model_reads_its_cls_token_and_keeps_it_when_truncating(tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from aplot.data import world
    from aplot.reward_model import RewardScorer, ScoreInputCapture, load_reward_model, tokenize_pairs
    from pipelines import rm

    path = imported("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    rows = world.generate_split("test_id", 4, 0)
    pairs, truncated = tokenize_pairs(Dataset.from_list(rows), tok, max_length=12)
    assert truncated == 4
    for ids in list(pairs["chosen_ids"]) + list(pairs["rejected_ids"]):
        assert len(ids) == 12 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id

    out = tmp_path / "minilm"
    metrics = rm.main(tiny_rm_argv(out, "--model_name_or_path", path, "--init_from", "sft", "--tokenizer_name_or_path",
                                   path, "--ot_hidden", "first_token", "--max_length", "32", "--max_steps", "2",
                                   "--learning_rate", "1e-4", "--eval_strategy", "no"))
    logs = [r for r in json.loads((out / "log_history.json").read_text()) if "loss" in r]
    assert len(logs) == 2 and all(r["loss_margin_mean"] == r["loss_margin_mean"] for r in logs)
    assert 0 <= metrics["eval"]["test_id"]["accuracy"] <= 1
    model, tokenizer = load_reward_model(str(out), device="cpu")
    assert type(model).__name__ == "BertForSequenceClassification"
    scorer = RewardScorer(model, tokenizer, max_length=32)
    ids = scorer.encode_all([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    capture = ScoreInputCapture(model)
    try:
        with torch.no_grad():
            out_ = model.bert(torch.tensor([ids[0]]))
            model.classifier(out_.pooler_output)
            pooled = capture.pooled(torch.tensor([ids[0]]), tokenizer.pad_token_id, "first_token")
    finally:
        capture.remove()
    # BERT's head reads the pooler's transform of [CLS], which APLOT's semantic cost then uses
    torch.testing.assert_close(pooled, out_.pooler_output)


@pytest.mark.slow
def test_vllm_samples_from_the_imported_smollm2_directory(smol, smol_rm, tmp_path):
    """The Best-of-N stage with vLLM on the imported instruct policy: nearly greedy (top_p 0.01), it answers
    a question it knows, so the weights vLLM read are the checkpoint's; the reward model also serves as gold."""
    rm_dir = tmp_path / "rm"
    smol_rm.model.save_pretrained(rm_dir)
    smol.tokenizer.save_pretrained(rm_dir)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"chosen": [*question, {"role": "assistant", "content": "Paris."}],
                                   "rejected": [*question, {"role": "assistant", "content": "Lyon."}]}) + "\n")
    recipe = tmp_path / "bon.yaml"
    recipe.write_text(yaml.safe_dump({
        "policy_name_or_path": smol.path, "reward_models": [str(rm_dir)], "gold": str(rm_dir),
        "prompt_dataset": str(prompts), "prompt_format": "conversational", "prompt_split": "train",
        "n_prompts": 1, "n_samples": 2, "backend": "vllm", "top_p": 0.01, "max_new_tokens": 12,
        "score_batch_size": 4, "output_dir": str(tmp_path / "bon")}))
    done = subprocess.run([sys.executable, "-m", "pipelines.bon", "--config", str(recipe)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    samples = [json.loads(line) for line in (tmp_path / "bon" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all("Paris" in s["response"] for s in samples), samples


@pytest.mark.slow
def test_zero3_on_smollm2_in_two_processes_saves_what_the_sharded_model_scores(smol, tmp_path):
    out = tmp_path / "zero3"
    argv = tiny_rm_argv(out, "--model_name_or_path", smol.path, "--init_from", "sft", "--tokenizer_name_or_path",
                        smol.path, "--deepspeed", "recipes/deepspeed/zero3.json", "--dataset_format",
                        "conversational", "--max_steps", "2", "--max_length", "64", "--per_device_train_batch_size",
                        "2", "--learning_rate", "1e-5", "--eval_strategy", "no", "--n_eval", "8")
    done = subprocess.run([*TORCHRUN, "-m", "pipelines.rm", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zero_stage"] == 3 and metrics["processes"] == 2
    assert metrics["zero3_saved_vs_live_max_abs_diff"] <= 1e-5


@pytest.mark.slow
def test_ppo_from_smollm2_instruct_against_a_smollm2_reward_model(smol, smol_rm, tmp_path, capsys):
    """The ppo stage on the real pair: the policy pads with <|endoftext|> (said in one line), the chat reward
    model is reached through the bridge, and the saved policy keeps its tied embeddings and its new pad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines import ppo

    rm_dir = tmp_path / "rm"
    smol_rm.model.save_pretrained(rm_dir)
    smol.tokenizer.save_pretrained(rm_dir)
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(yaml.safe_dump({
        "sft_model_path": "smollm2-135m-instruct", "reward_model_path": str(rm_dir), "prompt_format": "conversational",
        "retokenize_rewards": True, "n_prompts": 8, "n_eval_prompts": 2, "eval_samples_per_prompt": 1,
        "gold_eval_steps": 0, "total_episodes": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "num_ppo_epochs": 1, "local_rollout_forward_batch_size": 4, "response_length": 6, "stop_token": "eos",
        "save_strategy": "no", "num_sample_generations": 0, "report_to": "none", "disable_tqdm": True,
        "bf16": False, "output_dir": str(tmp_path / "ppo")}))
    metrics = ppo.main(["--config", str(recipe)])
    assert f"{smol.path}: the policy pads with '<|endoftext|>' in PPO" in capsys.readouterr().out
    assert metrics["updates"] == 1 and all(p["gold"] == p["gold"] for p in metrics["gold_curve"])
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")
    assert policy.lm_head.weight.data_ptr() == policy.get_input_embeddings().weight.data_ptr()
    assert AutoTokenizer.from_pretrained(tmp_path / "ppo").pad_token == "<|endoftext|>"
