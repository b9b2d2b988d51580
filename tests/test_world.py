"""The embedded world: deterministic, verifiable pairs, the documented OOD shift, and its tokenizer."""

import shutil

import pytest
from transformers import AutoTokenizer

from aplot.data import world

pytestmark = pytest.mark.core


def words(text):
    return text.split()


def test_same_seed_same_rows_other_seed_other_rows():
    assert world.generate_split("train", 50, seed=3) == world.generate_split("train", 50, seed=3)
    assert world.generate_split("train", 50, seed=3) != world.generate_split("train", 50, seed=4)
    assert world.generate_split("train", 50, seed=3) != world.generate_split("test_id", 50, seed=3)


def test_chosen_has_the_higher_gold_reward_and_tags_match_their_gaps():
    rows = world.generate_split("train", 400, seed=0)
    assert {r["difficulty"] for r in rows} == {"hard", "easy"}
    for r in rows:
        gap = world.gold_reward(r["prompt"], r["chosen"]) - world.gold_reward(r["prompt"], r["rejected"])
        assert gap == pytest.approx(r["gold_gap"], abs=1e-6) and gap > 0
        if r["difficulty"] == "hard":
            assert gap <= 0.55
            a, b = words(r["chosen"]), words(r["rejected"])
            # one edit apart: a substitution keeps the length, an insertion or deletion changes it by one
            if len(a) == len(b):
                assert sum(x != y for x, y in zip(a, b)) == 1
            else:
                short, long_ = sorted((a, b), key=len)
                assert len(long_) - len(short) == 1
                assert any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))
        else:
            assert gap >= 0.6


def test_hard_fraction_is_respected():
    rows = world.generate_split("train", 1000, seed=0, hard_fraction=0.3)
    share = sum(r["difficulty"] == "hard" for r in rows) / len(rows)
    assert 0.25 < share < 0.35


def test_label_noise_flips_exactly_that_share_and_only_those():
    clean = world.generate_split("train", 200, seed=1)
    noisy = world.generate_split("train", 200, seed=1, label_noise=0.2)
    flipped = [n for n in noisy if n["label_flipped"]]
    assert len(flipped) == 40
    for c, n in zip(clean, noisy):
        if n["label_flipped"]:
            assert (n["chosen"], n["rejected"]) == (c["rejected"], c["chosen"])
            assert world.gold_reward(n["prompt"], n["chosen"]) < world.gold_reward(n["prompt"], n["rejected"])
        else:
            assert (n["chosen"], n["rejected"]) == (c["chosen"], c["rejected"])


def test_ood_split_shifts_count_and_combination_of_constraints():
    def halves(c):
        return {0 if w in world.HALVES[0] else 1 for w in c.required}

    for split in ("train", "test_id"):
        for r in world.generate_split(split, 200, seed=0):
            c = world.parse_prompt(r["prompt"])
            assert len(c.required) == 3 and len(halves(c)) == 1
    for r in world.generate_split("test_ood", 200, seed=0):
        c = world.parse_prompt(r["prompt"])
        assert len(c.required) == 4 and halves(c) == {0, 1}


@pytest.mark.parametrize("response", ["", "   ", "@@@ ### \x00", "ÄÖÜ 漢字 🙂", "apple " * 300])
def test_gold_reward_is_defined_for_any_text(response):
    prompt = world.format_prompt(world.Constraints(("apple", "river", "stone"), "cloud"))
    value = world.gold_reward(prompt, response)
    assert isinstance(value, float) and -0.5 <= value <= 1.0


def test_gold_reward_values():
    prompt = world.format_prompt(world.Constraints(("apple", "river", "stone"), "cloud"))
    assert prompt == "Write about apple, river and stone. Do not use cloud.\nAnswer:"
    assert world.parse_prompt(prompt) == world.Constraints(("apple", "river", "stone"), "cloud")
    assert world.gold_reward(prompt, " apple river stone the a") == pytest.approx(1.0)
    assert world.gold_reward(prompt, "Apple, RIVER! stone cloud") == pytest.approx(0.5)
    assert world.gold_reward(prompt, "apple river river") == pytest.approx(2 / 3)
    assert world.gold_reward(prompt, "clouds cloud") == pytest.approx(-0.5)


def test_parse_prompt_rejects_foreign_prompts():
    with pytest.raises(ValueError, match="not a prompt of the embedded world"):
        world.parse_prompt("What is the capital of France?")


def test_tokenizer_is_a_standard_hf_tokenizer_that_round_trips_any_text(tmp_path):
    tok = world.build_tokenizer(seed=0)
    tok.save_pretrained(tmp_path)
    # beside a Qwen2 config, as in a model directory: AutoTokenizer must still rebuild the same tokenizer
    shutil.copy("recipes/models/tiny-qwen2/config.json", tmp_path / "config.json")
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.pad_token != loaded.eos_token and loaded.pad_token_id is not None
    row = world.generate_split("train", 1, seed=0)[0]
    text = row["prompt"] + row["chosen"]
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert len(tok(text)["input_ids"]) < len(text) / 2  # the world's words are whole tokens
    for odd in ("ÄÖÜ 漢字 🙂 \t\n", "zzzz qqqq"):
        assert loaded.decode(loaded(odd)["input_ids"]) == odd
