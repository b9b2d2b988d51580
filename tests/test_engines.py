"""Reward models other engines load: a `make rm` directory read the way OpenRLHF and verl read a reward model
(their loading steps reproduced with transformers, neither package installed), each reading giving the shared
scorer's rewards, and the normalisation OpenRLHF applies giving what `normalize_rewards: true` gives here."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_rm_argv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from aplot.data import world
    from pipelines import rm

    out = tmp_path_factory.mktemp("engines") / "rm"
    rm.main(tiny_rm_argv(out, "--eval_strategy", "no"))
    rows = world.generate_split("test_id", 6, 0, 0.5, 0.0)  # texts of several lengths: padding matters
    return out, [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]


def scored_here(out, prompts, responses, normalize=False):
    from aplot.reward_model import RewardScorer, load_reward_model

    model, tokenizer = load_reward_model(str(out), device="cpu")
    scorer = RewardScorer(model, tokenizer, normalize=normalize)
    return scorer.score(prompts, responses), scorer.encode_all(prompts, responses)


def test_config_json_holds_what_openrlhf_and_verl_read(trained):
    out, _, _ = trained
    config = json.loads((out / "config.json").read_text())
    stats = config["reward_stats"]
    # OpenRLHF: `value_head_prefix`, `mean`, `std` read back; `normalize_reward` as its own train_rm saves it.
    assert config["value_head_prefix"] == "score" and config["normalize_reward"] is False
    assert (config["mean"], config["std"]) == (stats["mean"], stats["std"])
    # verl (and transformers): one label, and a token-classification head without a bias, as trained.
    assert len(config["id2label"]) == 1  # transformers saves num_labels as id2label
    assert config["token_classification_bias"] is False
    from aplot.reward_model import checkpoint_keys

    keys = checkpoint_keys(str(out))
    assert "score.weight" in keys and "score.bias" not in keys  # the value head OpenRLHF builds: no bias


def test_openrlhf_reads_the_directory_as_its_reward_model(trained):
    """openrlhf/models/model.py (OpenRLHF 3c3be62, v0.11): `get_llm_for_sequence_regression(path, "reward",
    normalize_reward=...)` reads the config with AutoConfig, sets `normalize_reward` from the flag
    (`--reward.normalize_enable`), takes `value_head_prefix` from the config (default "score"), and builds
    `_get_reward_model`'s class: the base model `AutoModel._model_mapping[type(config)]` under its
    `base_model_prefix`, an `nn.Linear(hidden_size, 1, bias=False)` named by the prefix, and `mean`/`std`
    from `config.mean`/`config.std`. Its forward reads the value at the last attended token (left
    padding, positions from the mask) and returns `(r - mean) / std` in eval mode when normalising."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    out, prompts, responses = trained
    config = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    config.normalize_reward = True
    config._attn_implementation = "sdpa"  # OpenRLHF's default is flash_attention_2, which needs a GPU
    prefix = getattr(config, "value_head_prefix", "score")
    base_class = AutoModel._model_mapping[type(config)]

    class RewardModel(base_class.__base__):
        def __init__(self, config):
            super().__init__(config)
            setattr(self, self.base_model_prefix, base_class(config))
            setattr(self, prefix, torch.nn.Linear(config.hidden_size, 1, bias=False))
            # OpenRLHF also copies config.mean/std into buffers here; under transformers 5 from_pretrained
            # builds the model on the meta device and the buffers lose those values (measured here with
            # transformers 5.19; OpenRLHF PR #1343, open), so the statistics are taken from the config below.
            self.post_init()

    model, info = RewardModel.from_pretrained(str(out), config=config, dtype=torch.float32,
                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # every weight, the value head included
    model.eval()

    # serve_rm.py's RewardModelProxy: get_tokenizer(path, model, "left"), texts encoded without special tokens
    tokenizer = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    tokenizer.padding_side = "left"
    texts = [p + r + tokenizer.eos_token for p, r in zip(prompts, responses)]
    batch = tokenizer(texts, return_tensors="pt", add_special_tokens=False, padding=True)
    ours, ours_ids = scored_here(out, prompts, responses)
    assert [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])] == ours_ids

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        eos = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
        position_ids = mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(mask == 0, 1)
        hidden = getattr(model, model.base_model_prefix)(ids, attention_mask=mask,
                                                         position_ids=position_ids)["last_hidden_state"]
        raw = getattr(model, prefix)(hidden).squeeze(-1).gather(dim=1, index=eos).squeeze(1)
    assert hasattr(config, "mean")  # _get_reward_model reads `mean` and `std` only when the config has `mean`
    normalized = (raw - config.mean) / config.std
    torch.testing.assert_close(raw, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normalized, scored_here(out, prompts, responses, normalize=True)[0], atol=1e-5,
                               rtol=1e-5)


def test_verl_reads_the_directory_as_its_reward_model_worker(trained):
    """verl/workers/fsdp_workers.py (verl b178a3c): `RewardModelWorker._build_model` reads the config with
    AutoConfig, sets `num_labels = 1` and `classifier_dropout = 0.0`, and loads the directory with
    `AutoModelForTokenClassification.from_pretrained` (the tokenizer with `hf_tokenizer`, AutoTokenizer with
    pad set to eos when missing); `_forward_micro_batch` takes the per-token logit at the last valid token,
    `argmax(position_ids * attention_mask)`, positions `clip(cumsum(mask) - 1, 0)`."""
    from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

    out, prompts, responses = trained

    def verl_config():
        config = AutoConfig.from_pretrained(str(out), trust_remote_code=False, attn_implementation="sdpa")
        config.num_labels = 1
        config.classifier_dropout = 0.0
        return config

    model, info = AutoModelForTokenClassification.from_pretrained(str(out), config=verl_config(),
                                                                  dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id

    _, ids = scored_here(out, prompts, responses)
    assert len(set(map(len, ids))) > 1  # padded rows: the last valid token is not the last column
    width = max(map(len, ids))  # right padding, as verl pads the rendered sequences (postprocess_data)
    input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    position_ids = torch.clip(torch.cumsum(mask, dim=-1) - 1, min=0)  # verl's compute_position_id_with_mask
    with torch.no_grad():
        scores = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                       use_cache=False).logits.squeeze(-1)
    rm_score = scores[torch.arange(len(ids)), torch.argmax(position_ids * mask, dim=-1)]
    torch.testing.assert_close(rm_score, scored_here(out, prompts, responses)[0], atol=1e-5, rtol=1e-5)

    # Without `token_classification_bias: false` transformers adds a head bias the weights do not have.
    config = verl_config()
    del config.token_classification_bias
    _, info = AutoModelForTokenClassification.from_pretrained(str(out), config=config, output_loading_info=True)
    assert info["missing_keys"] == {"score.bias"}


def test_normalisation_reads_openrlhf_stats_too(tmp_path):
    """A directory OpenRLHF trained carries `mean` and `std` at the top of config.json, no `reward_stats`."""
    from types import SimpleNamespace

    from aplot.errors import UserError
    from aplot.reward_model import check_reward_stats, normalization

    assert normalization(SimpleNamespace(config=SimpleNamespace(mean=0.5, std=2.0))) == (0.5, 2.0)
    (tmp_path / "config.json").write_text(json.dumps({"mean": 0.5, "std": 0.0, "value_head_prefix": "score"}))
    with pytest.raises(UserError, match="positive std"):
        check_reward_stats(str(tmp_path))


def test_an_encoders_classifier_gets_no_engine_fields():
    """A BERT-style head (a bias, read from the pooled first token) is not what either engine reads."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from aplot.reward_model import engine_config

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=1)
    assert engine_config(AutoModelForSequenceClassification.from_config(config), {"mean": 0.0, "std": 1.0}) == {}
