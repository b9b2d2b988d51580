"""The spoken world (aplot/data/spoken.py) and `ot_embedder`: pairs labelled by the gold reward, splits that
share no prompt, a build that resumes after SIGKILL to identical rows, and the margin the trainer uses taken
from a frozen sentence encoder's embeddings."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from aplot.data import spoken, world
from tests.conftest import ROOT, make_preset

pytestmark = pytest.mark.core  # run on the newest line too (make test-latest)


def gold_by_hand(request: str, response: str) -> float:
    """The world's gold reward, recomputed here from the request's own words: share of the required words
    the response uses (whole words, any case, any punctuation) minus 0.5 if it uses the banned one."""
    listed, banned = re.search(r"mentions? (.+?), and never mentions? (\w+)\.$", request).groups()
    required = listed.replace(" and ", ", ").split(", ")
    words = set(re.split(r"[^a-z]+", response.lower()))
    return sum(w in words for w in required) / len(required) - 0.5 * (banned in words)


def test_gold_reads_a_spoken_request_and_natural_text():
    request = "Write two sentences about a trip that mention apple, river and stone, and never mention cloud."
    assert world.parse_prompt(request) == world.Constraints(("apple", "river", "stone"), "cloud")
    assert world.gold_reward(request, "An Apple fell by the RIVER's edge.") == pytest.approx(2 / 3)
    assert world.gold_reward(request, "Stone, river, apple; no Cloud!") == pytest.approx(0.5)
    assert world.gold_reward(request, "apples and rivers, stones") == 0.0  # whole words only
    chat = [{"role": "user", "content": request}]
    assert world.gold_reward(chat, "apple river stone") == 1.0
    with pytest.raises(ValueError, match="not a prompt of the embedded world"):
        world.parse_prompt("Write a poem.")


def test_splits_share_no_prompt_and_keep_the_worlds_constraint_distributions():
    splits = {s: spoken.first_requests(s, 0, 600) for s in world.SPLITS}
    for split, requests in splits.items():
        assert len(set(requests)) == len(requests)
        for r in requests:
            c = spoken.parse_request(r)
            assert gold_by_hand(r, " ".join(c.required)) == 1.0
            if split == "test_ood":  # 4 required words from both topics, as the world's OOD split
                assert len(c.required) == 4 and not any(set(c.required) <= set(h) for h in world.HALVES)
            else:
                assert len(c.required) == 3 and any(set(c.required) <= set(h) for h in world.HALVES)
    constraints = {s: {(frozenset(spoken.parse_request(r).required), spoken.parse_request(r).banned) for r in rs}
                   for s, rs in splits.items()}
    assert not constraints["train"] & constraints["test_id"]
    assert not set(splits["train"]) & set(splits["test_id"]) and not set(splits["train"]) & set(splits["test_ood"])
    # the i-th request does not depend on how many are taken
    assert spoken.first_requests("train", 0, 10) == splits["train"][:10]
    assert spoken.first_requests("train", 1, 10) != splits["train"][:10]


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """The tiny-qwen2 architecture's SFT policy, trained in seconds, and its lineage directory."""
    from aplot.lineage import policy_path

    root = tmp_path_factory.mktemp("spoken")
    preset = make_preset(root)
    policy_path(preset, str(root / "lineage"))
    return preset, str(root / "lineage")


def spoken_recipe(path, tiny_policy, **overrides) -> str:
    preset, lineage_dir = tiny_policy
    recipe = {"dataset_name": "spoken", "dataset_format": "conversational", "n_train": 24, "n_eval": 8,
              "eval_splits": ["test_id", "test_ood"], "spoken_policy": preset, "spoken_lineage_dir": lineage_dir,
              "spoken_backend": "transformers", "spoken_samples": 4, "spoken_max_new_tokens": 16,
              "spoken_chunk_prompts": 1, "spoken_dir": str(Path(path) / "spoken"), "model_name_or_path": preset,
              "output_dir": str(Path(path) / "rm"), "report_to": "none", "bf16": False, **overrides}
    file = Path(path) / "recipe.yaml"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(yaml.safe_dump(recipe))
    return str(file)


def build(recipe) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "aplot.data.spoken", "--config", recipe], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def built_rows(recipe, **overrides):
    from aplot.config import parse_rm_recipe
    from aplot.data import load_eval_sets, load_train

    data_cfg, _, _ = parse_rm_recipe(["--config", recipe, *sum(([f"--{k}", str(v)] for k, v in overrides.items()),
                                                                [])])
    train, counts = load_train(data_cfg)
    return train, load_eval_sets(data_cfg), counts


@pytest.mark.slow
def test_spoken_build_resumes_after_sigkill_to_identical_rows_labelled_by_the_gold(tmp_path, tiny_policy):
    whole = build(spoken_recipe(tmp_path / "whole", tiny_policy))
    assert whole.wait() == 0, whole.stderr.read().decode()[-2000:]

    killed_recipe = spoken_recipe(tmp_path / "killed", tiny_policy)
    proc = build(killed_recipe)
    samples = next(iter((tmp_path / "whole" / "spoken").glob("*/samples.jsonl")))
    total = len(samples.read_text().splitlines())
    target = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed" / "spoken").glob("*/samples.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3 * 4:
            target = found[0]
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target is not None and 0 < len(target.read_text().splitlines()) < total, "the kill must land mid-build"

    resumed = build(killed_recipe)
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    lines = target.read_text().splitlines()
    assert len(lines) == len(set(lines)) == total
    assert sorted(lines) == sorted(samples.read_text().splitlines())

    train, evals, counts = built_rows(killed_recipe)
    again, evals_again, _ = built_rows(spoken_recipe(tmp_path / "whole", tiny_policy))
    assert train.to_list() == again.to_list()
    assert {k: d.to_list() for k, (d, _) in evals.items()} == {k: d.to_list() for k, (d, _) in evals_again.items()}
    assert counts["spoken"]["dir"] == str(target.parent)
    record = json.loads((target.parent / "spoken.json").read_text())
    assert record["settings"]["policy"] == tiny_policy[0] and record["settings"]["backend"] == "transformers"
    assert record["splits"]["train"]["pairs"] == 24

    # Labelled by the gold reward of the samples, recomputed here; one pair per prompt; the layout TRL reads.
    responses = {}
    for line in lines:
        row = json.loads(line)
        responses[(row["split"], row["prompt_index"], row["sample_index"])] = row["response"].strip()
    pairs = {"train": train, **{k: d for k, (d, _) in evals.items()}}
    for split, dataset in pairs.items():
        requests = spoken.first_requests(split, 0, max(dataset["prompt_index"]) + 1)
        assert len(set(dataset["prompt_index"])) == len(dataset)
        for row in dataset:
            request = row["prompt"][0]["content"]
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert request == requests[row["prompt_index"]]
            assert chosen == responses[(split, row["prompt_index"], row["chosen_sample"])]
            assert rejected == responses[(split, row["prompt_index"], row["rejected_sample"])]
            gap = gold_by_hand(request, chosen) - gold_by_hand(request, rejected)
            assert gap > 0 and gap == pytest.approx(row["gold_gap"], abs=1e-6)
            assert (row["chosen_gold"], row["rejected_gold"]) == pytest.approx(
                (gold_by_hand(request, chosen), gold_by_hand(request, rejected)))
            assert gap <= 0.55 if row["difficulty"] == "hard" else gap >= 0.6
    prompts = {s: {r[0]["content"] for r in d["prompt"]} for s, d in pairs.items()}
    assert not prompts["train"] & prompts["test_id"] and not prompts["train"] & prompts["test_ood"]

    # label_noise flips an exact, seeded share of the training pairs, as in the embedded world
    noisy, _, _ = built_rows(killed_recipe, label_noise=0.25)
    flipped = [r for r in noisy if r["label_flipped"]]
    assert len(flipped) == 6
    for row in flipped:
        request = row["prompt"][0]["content"]
        assert gold_by_hand(request, row["chosen"][0]["content"]) < gold_by_hand(request, row["rejected"][0]["content"])


def test_other_sampling_settings_build_aside_and_bad_ones_fail_in_one_line(tmp_path):
    from aplot.config import parse_rm_recipe

    recipe = spoken_recipe(tmp_path, (make_preset(tmp_path), str(tmp_path / "lineage")))  # nothing is sampled
    first = spoken.SpokenWorld(parse_rm_recipe(["--config", recipe])[0]).dir
    other = spoken.SpokenWorld(parse_rm_recipe(["--config", recipe, "--spoken_temperature", "0.7"])[0]).dir
    assert first != other and first.parent == other.parent
    from aplot.errors import UserError

    for key, value, message in (("spoken_backend", "hf", "spoken_backend 'hf' is not one of vllm, transformers"),
                                ("spoken_samples", "1", "spoken_samples must be >= 2"),
                                ("spoken_policy", "./no/such/policy", "spoken_policy path does not exist")):
        with pytest.raises(UserError, match=re.escape(message)):
            spoken.SpokenWorld(parse_rm_recipe(["--config", recipe, f"--{key}", value])[0])
    assert not (tmp_path / "spoken").exists() or {p.name for p in (tmp_path / "spoken").iterdir()} == {first.name,
                                                                                                   other.name}


def tiny_bert(path) -> str:
    """A BERT encoder built from config (random weights) with a word-piece vocabulary of the world's words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *world.CONTENT_WORDS, *world.FILLER_WORDS,
             *"abcdefghijklmnopqrstuvwxyz.,!?'", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    return str(path)


def embed_by_hand(encoder_dir, texts):
    """Mean pooling over the attention mask and L2 normalisation, as sentence-transformers' all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(encoder_dir), AutoModel.from_pretrained(encoder_dir).eval()
    out = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding at all
            enc = tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
            out.append(F.normalize(model(**enc).last_hidden_state[0].mean(0), dim=-1))
    return torch.stack(out)


def ot_embedder_margin_case(tmp_path, encoder_dir):
    """The loss the trainer computes on a batch equals the Bradley-Terry loss minus `aplot.ot_margin` taken on
    the encoder's embeddings of the responses, recomputed independently; and that margin is not the one of
    the reward model's own hidden state."""
    import aplot
    from aplot.config import APLOTConfig, DataConfig
    from aplot.data import load_train
    from aplot.lineage import tokenizer_path
    from aplot.reward_model import build_reward_model, load_tokenizer, tokenize_pairs
    from aplot.trainer import APLOTRewardTrainer

    preset = make_preset(tmp_path)
    tokenizer = load_tokenizer(tokenizer_path(preset, str(tmp_path / "lineage")))
    pairs, _ = load_train(DataConfig(n_train=16, dataset_format="conversational"))
    pairs, _ = tokenize_pairs(pairs, tokenizer, 128, chat=False)
    torch.manual_seed(0)
    model = build_reward_model(preset, tokenizer, fresh=True)
    args = APLOTConfig(output_dir=str(tmp_path / "rm"), loss_type="aplot", gamma=0.5, ot_embedder=encoder_dir,
                       report_to="none", per_device_train_batch_size=8, max_length=128, bf16=False)
    trainer = APLOTRewardTrainer(model, args, train_dataset=pairs, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    model.eval()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        chosen, rejected = rewards.chunk(2)
        hidden = trainer.score_input.pooled(batch["input_ids"], model.config.pad_token_id, "last_token")
    texts_c = [pairs[i]["chosen"][-1]["content"] for i in range(8)]
    texts_r = [pairs[i]["rejected"][-1]["content"] for i in range(8)]
    emb_c, emb_r = embed_by_hand(encoder_dir, texts_c), embed_by_hand(encoder_dir, texts_r)
    margin = aplot.ot_margin(chosen, rejected, emb_c, emb_r, gamma=0.5)
    expected = -F.logsigmoid(chosen - rejected - margin).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(trainer.semantic_states(batch), torch.cat([emb_c, emb_r]), atol=1e-5, rtol=1e-5)
    own = aplot.ot_margin(chosen, rejected, *hidden.chunk(2), gamma=0.5)
    assert (own - margin).abs().max() > 1e-3
    return emb_c, emb_r


def test_ot_embedder_margin_is_ot_margin_on_the_encoders_embeddings(tmp_path):
    ot_embedder_margin_case(tmp_path, tiny_bert(tmp_path / "bert"))


def test_ot_embedder_on_the_real_minilm(tmp_path):
    from aplot.lineage import model_path

    encoder = model_path("minilm-l6", "sft", "outputs/lineage")  # imported by make test (real-checkpoints)
    emb_c, _ = ot_embedder_margin_case(tmp_path, encoder)
    assert emb_c.shape[1] == 384


@pytest.mark.slow
def test_make_rm_trains_on_the_spoken_world_through_a_recipe(tmp_path, tiny_policy):
    from pipelines import rm

    recipe = spoken_recipe(tmp_path, tiny_policy, n_train=16, n_eval=8, max_steps=2, per_device_train_batch_size=8,
                           per_device_eval_batch_size=8, eval_strategy="no", save_strategy="no", init_from="scratch",
                           lineage_dir=tiny_policy[1], ot_embedder=tiny_bert(tmp_path / "bert"), disable_tqdm=True)
    metrics = rm.main(["--config", recipe])
    assert metrics["train_steps"] == 2 and metrics["train_pairs"] == 16
    assert metrics["data"]["train"]["spoken"]["hard"] + metrics["data"]["train"]["spoken"]["easy"] == 16
    assert {"test_id", "test_ood"} <= set(metrics["eval"])
    settings = json.loads((tmp_path / "rm" / "run_settings.json").read_text())
    assert settings["spoken_policy"] == tiny_policy[0] and settings["ot_embedder"] == str(tmp_path / "bert")


def test_bon_and_ppo_prompts_of_the_spoken_world_need_no_samples():
    from aplot.data import load_prompts

    prompts = load_prompts("spoken", "test_id", 5, "conversational")
    assert prompts == [spoken.chat_prompt(r) for r in spoken.first_requests("test_id", 0, 5)]
    assert world.gold_reward(prompts[0], " ".join(spoken.parse_request(prompts[0][0]["content"]).required)) == 1.0


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_builds_pairs_labelled_by_the_gold_and_a_rerun_reads_the_cache(tmp_path, tiny_policy):
    recipe = spoken_recipe(tmp_path, tiny_policy, spoken_backend="vllm", n_train=8, n_eval=4,
                           spoken_chunk_prompts=8)
    first = build(recipe)
    assert first.wait() == 0, first.stderr.read().decode()[-2000:]
    samples = next(iter((tmp_path / "spoken").glob("*/samples.jsonl")))
    before = samples.read_bytes()
    train, evals, _ = built_rows(recipe)  # in this process: every sample is cached, no engine starts
    assert samples.read_bytes() == before
    for dataset in [train, *(d for d, _ in evals.values())]:
        for row in dataset:
            request = row["prompt"][0]["content"]
            assert gold_by_hand(request, row["chosen"][0]["content"]) - gold_by_hand(
                request, row["rejected"][0]["content"]) == pytest.approx(row["gold_gap"], abs=1e-6)
    assert json.loads((samples.parent / "spoken.json").read_text())["settings"]["backend"] == "vllm"


def test_several_pairs_per_prompt_use_distinct_samples_each_labelled_by_the_gold():
    request = "Write two sentences about a trip that mention apple, river and stone, and never mention cloud."
    responses = ["Apple, river, stone.", "An apple by the river.", "An apple.", "A cloud over an apple.",
                 "River, stone and apple under a cloud.", "Nothing here.", "A river.", "Stones."]
    pairs = spoken.choose_pairs(request, responses, 0, 0, 0.5, k=4)
    assert 2 <= len(pairs) <= 4
    used = [i for p in pairs for i in (p["chosen_sample"], p["rejected_sample"])]
    assert len(used) == len(set(used))  # no response in two pairs
    for p in pairs:
        chosen, rejected = gold_by_hand(request, p["chosen"]), gold_by_hand(request, p["rejected"])
        assert chosen > rejected and p["gold_gap"] == pytest.approx(chosen - rejected, abs=1e-6)
        assert (p["gold_gap"] <= spoken.HARD_GAP) == (p["difficulty"] == "hard")
        assert responses[p["chosen_sample"]] == p["chosen"] and responses[p["rejected_sample"]] == p["rejected"]
    assert spoken.choose_pairs(request, responses, 0, 0, 0.5, k=1) == [spoken.choose_pair(request, responses, 0, 0,
                                                                                           0.5)]
    assert spoken.choose_pairs(request, ["Same.", "Same!"], 0, 0, 0.5, k=2) == []  # no gold gap: no pair


def test_pairs_per_prompt_beyond_half_the_samples_fail_in_one_line(tmp_path):
    from aplot.config import parse_rm_recipe
    from aplot.errors import UserError

    data_cfg, _, _ = parse_rm_recipe(["--config", "recipes/rm/spoken-smollm2.yaml", "--spoken_samples", "4",
                                      "--spoken_pairs_per_prompt", "3", "--spoken_dir", str(tmp_path)])
    with pytest.raises(UserError, match="spoken_pairs_per_prompt must be <= 2, got 3"):
        spoken.sampling_settings(data_cfg)
