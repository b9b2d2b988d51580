"""The shared reward-model module: the captured hidden state, batched scoring, clear load errors."""

import pytest
import torch

from aplot.data import world
from aplot.errors import UserError
from aplot.reward_model import RewardScorer, ScoreInputCapture, build_reward_model, load_reward_model, load_tokenizer

pytestmark = pytest.mark.core


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = world.build_tokenizer()
    return build_reward_model("recipes/models/tiny-qwen2", tok, fresh=True).eval(), tok


def test_built_model_has_one_output_and_head_dim_vllm_accepts(tiny):
    model, tok = tiny
    cfg = model.config
    # the config's 512 rows are kept although the tokenizer has fewer tokens, as a checkpoint keeps them
    assert cfg.num_labels == 1 and cfg.vocab_size == 512 > len(tok) and cfg.pad_token_id == tok.pad_token_id
    assert cfg.hidden_size // cfg.num_attention_heads >= 64 and cfg.model_type == "qwen2"


def test_captured_state_is_exactly_what_the_score_head_read(tiny):
    model, tok = tiny
    rows = world.generate_split("train", 6, seed=0)
    texts = [r["prompt"] + r["chosen"] + tok.eos_token for r in rows]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert (enc["input_ids"] == tok.pad_token_id).any()  # the batch really is padded
    capture = ScoreInputCapture(model)
    with torch.no_grad():
        logits = model(**enc).logits[:, 0]
        pooled = capture.pooled(enc["input_ids"], model.config.pad_token_id)
    capture.remove()
    torch.testing.assert_close(model.score(pooled)[:, 0], logits)


def test_length_sorted_batches_score_like_one_at_a_time(tiny):
    model, tok = tiny
    rows = world.generate_split("test_id", 20, seed=0)
    prompts, responses = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    batched, hidden = RewardScorer(model, tok, batch_size=7).score(prompts, responses, return_hidden=True)
    single = RewardScorer(model, tok, batch_size=1).score(prompts, responses)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.score(hidden)[:, 0], batched, atol=1e-5, rtol=1e-5)


def test_scorer_encodes_as_the_trainer_does(tiny):
    _, tok = tiny
    scorer = RewardScorer(tiny[0], tok)
    assert scorer.encode("Q:", " a b") == tok("Q: a b" + tok.eos_token)["input_ids"]
    assert scorer.encode("Q:", " a b" + tok.eos_token) == scorer.encode("Q:", " a b")


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(UserError, match="model path does not exist: ./no/such/model"):
        build_reward_model("./no/such/model", world.build_tokenizer())
    with pytest.raises(UserError, match="tokenizer path does not exist: /no/such/tok"):
        load_tokenizer("/no/such/tok")
    with pytest.raises(UserError, match=f"{tmp_path}: no model weights"):
        load_reward_model(str(tmp_path))
