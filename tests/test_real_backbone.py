"""The real-backbone bench section (benchmarks/real_backbone.py): the split reward model (frozen layers run once,
the top trained on their output) scores exactly what the whole sequence-classification model scores, on the real
SmolLM2 and the tiny embedded architecture; and the section runs end to end on the tiny policy, with Best-of-N
tables that obey the gold ceiling and a report that states its verdicts."""

import json
import re

import pytest
import torch

from aplot.errors import UserError
from benchmarks import real_backbone, report
from tests.conftest import make_preset

# Not `core`: like tests/test_benchmarks.py, these test the bench, which runs on the pinned line.


def whole_and_split_scores(path, top_layers, texts):
    """Rewards of `texts` from the whole model (the project's scorer) and from the split one, same score head."""
    from transformers import AutoModelForSequenceClassification

    from aplot.reward_model import RewardScorer, load_tokenizer

    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    whole = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32).eval()
    whole.config.pad_token_id = tokenizer.pad_token_id
    scorer = RewardScorer(whole, tokenizer, batch_size=4, chat=True)
    ids = scorer.encode_all([q for q, _ in texts], [r for _, r in texts])
    trunk = real_backbone.Trunk(path, top_layers)
    trunk.features(ids, tokenizer.pad_token_id, batch_size=3)  # other batches, other padding than the scorer's
    head = trunk.head(0).eval()
    with torch.no_grad():
        head.score.weight.copy_(whole.score.weight)
    split = real_backbone.score(head, trunk, ids, tokenizer.pad_token_id, batch_size=2)
    return scorer.score_ids(ids), split, ids, tokenizer


TEXTS = [("Write one sentence about a market that mentions apple, river and stone, and never mentions cloud.",
          "The apple seller stood by the river, on a stone."),
         ("Write about a trip.", "We went."),
         ("Write two sentences about an old house that mention door, lamp and rug, and never mention roof.",
          "The old house had a red door and a lamp that glowed over the rug. Nobody had been inside for years, "
          "and the dust lay thick on every shelf."),
         ("Say hi.", "Hi! <|im_end|> is how my turns end.")]


def test_split_smollm2_scores_what_the_whole_model_scores():
    from aplot.lineage import model_path

    path = model_path("smollm2-135m-instruct", "sft", "outputs/lineage")  # imported by make test (real-checkpoints)
    whole, split, ids, tokenizer = whole_and_split_scores(path, 2, TEXTS)
    assert torch.allclose(whole, split, atol=1e-4), (whole, split)
    # SmolLM2 pads with its eos <|im_end|>: the reward is read at the newline after the turn's <|im_end|>
    pad = tokenizer.pad_token_id
    assert pad == tokenizer.eos_token_id
    for seq in ids:
        assert real_backbone.read_index(seq, pad) == len(seq) - 1 and seq[-2] == pad
        assert tokenizer.decode(seq[-1:]) == "\n"


def test_split_tiny_model_scores_what_the_whole_model_scores_and_bad_splits_fail_in_one_line(tmp_path):
    from aplot.lineage import policy_path

    path = policy_path(make_preset(tmp_path), str(tmp_path / "lineage"))
    whole, split, *_ = whole_and_split_scores(path, 1, TEXTS)
    assert torch.allclose(whole, split, atol=1e-5)
    for layers in (0, 2):
        with pytest.raises(UserError, match="top_layers must be between 1 and 1"):
            real_backbone.Trunk(path, layers)


@pytest.mark.slow
def test_section_runs_end_to_end_on_the_tiny_policy(tmp_path):
    from aplot.data import spoken, world
    from aplot.lineage import policy_path

    lineage_dir = str(tmp_path / "lineage")
    preset = make_preset(tmp_path)
    policy_path(preset, lineage_dir)
    s = real_backbone.RealSettings(
        name="micro", seeds=(0, 1), noise_levels=(0.0, 0.3), n_train=16, n_eval=6, bon_prompts=3, bon_samples=4,
        bon_ns=(1, 2, 4), epochs=1, batch_pairs=8, spoken_dir=str(tmp_path / "spoken"),
        extra=("--spoken_policy", preset, "--spoken_lineage_dir", lineage_dir, "--model_name_or_path", preset,
               "--lineage_dir", lineage_dir, "--spoken_backend", "transformers", "--spoken_max_new_tokens", "12",
               "--max_length", "96"))
    real = real_backbone.run(s, tmp_path / "work", log=lambda m: None)

    assert len(real["runs"]) == 2 * 2 * 3 and real["trunk"]["trained_layers"] == 1 and real["trunk"]["layers"] == 2
    for r in real["runs"]:
        assert 0 <= r["id_acc"] <= 1 and 0 <= r["ood_acc"] <= 1 and r["steps"] == 2
        assert (r["margin_mean"] is None) == (r["method"] == "bt")
    # up to two pairs of distinct samples per prompt: 16 pairs from 8 to 15 prompts with a pair
    counts = real["pairs"]["train"]
    assert counts["hard"] + counts["easy"] == 16 and 8 <= counts["prompts"] - counts["no_pair"] < 16
    # seeds differ in initialisation and order; one seed is reproducible
    by = {(r["method"], r["seed"], r["noise"]): r["id_margin"] for r in real["runs"]}
    assert by[("bt", 0, 0.0)] != by[("bt", 1, 0.0)]

    bon = real["bon"]
    requests = spoken.first_requests("test_id", 0, 3)
    cache = spoken.SpokenWorld(real_backbone.data_config(s, spoken_samples=4, spoken_pairs_per_prompt=1)[0])
    gold = [[world.gold_reward(q, r) for r in cache.responses("test_id", i)] for i, q in enumerate(requests)]
    assert bon["ceiling"][1] == pytest.approx(sum(map(sum, gold)) / 12)          # n = 1: the mean sample
    assert bon["ceiling"][4] == pytest.approx(sum(map(max, gold)) / 3)           # n = N: the best sample
    assert len(bon["proxies"]) == 2 * 3  # the 0 %-flipped models, every method and seed
    for proxy in bon["proxies"]:
        assert proxy["gold"][1] == pytest.approx(bon["ceiling"][1])
        assert all(proxy["gold"][n] <= bon["ceiling"][n] + 1e-9 for n in (1, 2, 4))

    real.update(settings=s.to_dict(), confidence=0.95, started="now", wall_seconds=1.0, peak_rss_gib=1.0,
                environment={"cpu_count": 2, "commit": "abc"})
    real = json.loads(json.dumps(real))  # as the report reads it back: json keys are strings
    text = "\n".join(report.render_real_backbone(real, True))
    assert text.count("against bt, in distribution") == 2 * 2 and "Best-of-4 gold" in text
    assert "The labels are synthetic" in text and "gold itself (ceiling)" in text
    assert report.plot_real_backbone(real, tmp_path / "real.png") and (tmp_path / "real.png").stat().st_size > 0


@pytest.mark.slow
def test_speed_ratios_on_a_preset_reach_the_report(tmp_path):
    """benchmarks.real_speed end to end on the tiny architecture (no vLLM here: its engine start alone is
    a minute): both ratios measured, recorded by preset, and rendered with their targets."""
    from benchmarks import real_speed

    preset = make_preset(tmp_path)
    results = tmp_path / "results"
    result = real_speed.main(["--preset", preset, "--recipe", "recipes/rm/embedded.yaml", "--lineage_dir",
                              str(tmp_path / "lineage"), "--step_steps", "2", "--score_sequences", "16",
                              "--repeats", "1", "--gen_prompts", "0", "--results", str(results),
                              "--work", str(tmp_path / "work")])
    assert result["step"]["steps"] == 2 and result["step"]["aplot_over_bt"] > 0
    assert result["scoring"]["sequences"] == 16 and result["scoring"]["scorer_ids_over_bare"]["median"] > 0
    entries = json.loads((results / "real_speed.json").read_text())
    assert list(entries) == ["tiny-fast"]
    text = "\n".join(report.render_real_speed(entries))
    assert "`tiny-fast`" in text and "target <= 1.01" in text and "not measured" in text


@pytest.mark.parametrize("batch, message", [("-1", ">= 0 (0: the recipe's batch), got -1"),
                                            ("100000000", "<= 65536, got 100000000")])
def test_a_bad_step_batch_is_one_line_before_any_work(tmp_path, batch, message):
    from benchmarks import real_speed

    with pytest.raises(UserError, match=re.escape(f"--step_batch must be {message}")):
        real_speed.main(["--step_batch", batch, "--results", str(tmp_path / "results")])
    assert not (tmp_path / "results").exists()

