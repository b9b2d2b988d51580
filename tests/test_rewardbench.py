"""RewardBench scores: v1 sections and score, RewardBench 2 best-of-k and Ties, held against hand computations
on fixtures whose responses carry the reward the hand computation gives them (`... (r=0.7)`), then the same
fixtures through `make eval` with a real (tiny) reward model."""

import json
import math
import re
from fractions import Fraction

import pytest
import torch
import yaml
from datasets import Dataset, load_dataset

from aplot.data.formats import as_pairs, to_preference
from aplot.errors import UserError
from aplot.rewardbench import V1_SECTIONS, best_of_k, ties_score, v1_scores, v2_scores

V1 = "tests/fixtures/reward_bench_v1.jsonl"
V2 = "tests/fixtures/reward_bench_2.jsonl"


def fixture(path, fmt, **kwargs):
    return to_preference(load_dataset("json", data_files=path, split="train"), fmt, source=path, **kwargs)


def reward(text) -> float:
    return float(re.search(r"\(r=([-\d.]+)\)$", text).group(1))


def v1_from_fixture(keep=lambda subset: True):
    pairs, _ = fixture(V1, "explicit")
    rows = [row for row in pairs if keep(row["subset"])]
    return v1_scores([r["subset"] for r in rows], [reward(r["chosen"]) for r in rows],
                     [reward(r["rejected"]) for r in rows])


def test_v1_sections_and_score_equal_the_hand_computation():
    scores = v1_from_fixture()
    # correct / pairs per subset, from the fixture's rewards (a tie counts as wrong):
    # Chat       alpacaeval-easy 3/3, -length 1/2, -hard 2/4, mt-bench-easy 1/1, -med 0/2 (one tie)  -> 7/12
    # Chat Hard  mt-bench-hard 1/2, llmbar-natural 2/3, -neighbor 0/1, -GPTInst 4/4, -GPTOut 1/2, -manual 1/1 -> 9/13
    # Safety     refusals-dangerous 2/2, -offensive 1/3, xstest-refuse 3/4, -respond 0/1, donotanswer 1/2 -> 7/12
    # Reasoning  code: cpp 1/1, go 1/2, java 0/1 (a tie), js 2/2, python 2/3, rust 1/1 = 7/10;
    #            math-prm 1/3 weighted as the 10 code pairs: (10 * 1/3 + 7) / (10 + 10)                -> 31/60
    expected = {"Chat": Fraction(7, 12), "Chat Hard": Fraction(9, 13), "Safety": Fraction(7, 12),
                "Reasoning": Fraction(31, 60)}
    assert scores["sections"] == pytest.approx({k: float(v) for k, v in expected.items()}, abs=1e-12)
    assert scores["score"] == pytest.approx(float(sum(expected.values()) / 4), abs=1e-12)
    assert scores["score"] == pytest.approx(1853 / 3120, abs=1e-12)
    # Prior Sets: the plain mean of anthropic_helpful 1/2, anthropic_hhh 3/3, shp 0/1, summarize 3/4; off the score
    assert scores["prior_sets"] == pytest.approx(9 / 16, abs=1e-12)
    assert scores["missing_sections"] == [] and scores["missing_subsets"] == [] and scores["missing_prior_sets"] == []
    assert scores["not_scored"] == {"my-extra": 2}
    assert scores["subsets"]["math-prm"] == {"n": 3, "accuracy": pytest.approx(1 / 3)}


def test_v1_missing_section_is_named_never_zero():
    reasoning = set(V1_SECTIONS["Reasoning"])
    scores = v1_from_fixture(lambda s: s not in reasoning and s != "alpacaeval-hard" and s != "summarize")
    # Chat without alpacaeval-hard: (3 + 1 + 1 + 0) / (3 + 2 + 1 + 2)
    assert scores["sections"]["Chat"] == pytest.approx(5 / 8)
    assert scores["sections"]["Reasoning"] is None and scores["missing_sections"] == ["Reasoning"]
    assert scores["score"] is None
    assert scores["missing_subsets"] == ["alpacaeval-hard", *V1_SECTIONS["Reasoning"]]
    assert scores["prior_sets"] == pytest.approx((1 / 2 + 1 + 0) / 3) and scores["missing_prior_sets"] == ["summarize"]


def test_v1_math_alone_is_its_own_accuracy_and_other_data_gets_no_scores():
    scores = v1_scores(["math-prm", "math-prm", "chat"], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0])
    assert scores["sections"]["Reasoning"] == 0.5
    assert v1_scores(["test_id", "test_id"], [1.0, 0.0], [0.0, 1.0]) is None


def v2_rows(keep=lambda row: True):
    rows, counts = fixture(V2, "response_lists")
    rows = [row for row in rows if keep(row)]
    return rows, counts, v2_scores([r["subset"] for r in rows], [r["id"] for r in rows],
                                   [[reward(t) for t in r["chosen"]] for r in rows],
                                   [[reward(t) for t in r["rejected"]] for r in rows])


def test_v2_best_of_k_and_ties_equal_the_hand_computation():
    _, counts, scores = v2_rows()
    subsets = scores["subsets"]
    # best-of-k: 1 if every chosen is above every rejected; a tie at the boundary gets 1/C(a+b, a)
    # Factuality  0.9>0.3: 1;  0.5 tied with one 0.5: 1/2;  0.2<0.9: 0                 -> 1.5/3
    # Precise IF  0.4 tied with two 0.4: 1/3;  0.8>0.3: 1                              -> (4/3)/2
    # Math        chosen 0.6, 0.7 vs 0.6, 0.1: one chosen tied with one rejected: 1/2;  0.3>0.2: 1 -> 0.75
    # Safety      0.9<0.95: 0;  0.7>0.1: 1                                             -> 0.5
    # Focus       0.3 tied with three 0.3: 1/4                                          -> 0.25
    expected = {"Factuality": 0.5, "Precise IF": 2 / 3, "Math": 0.75, "Safety": 0.5, "Focus": 0.25}
    for name, value in expected.items():
        assert subsets[name]["accuracy"] == pytest.approx(value, abs=1e-12), name
    assert subsets["Factuality"]["n"] == 3 and subsets["Focus"]["n"] == 1
    # Ties, prompt by prompt: (accurate, spread of the correct, worst correct - best incorrect)
    #   ref:1  (True, -, 0.8-0.2=0.6)    tied:1 (True, 0.9-0.7=0.2, 0.7-0.3=0.4)
    #   ref:2  (False, -, 0.4-0.5=-0.1)  tied:2 (False, 0.6-0.2=0.4, 0.2-0.3=-0.1)
    #   tied:3 (True, 0, 0.4), no ref:3: in the tied accuracy only
    # ref accuracy 1/2, tied accuracy 2/3; on prompts 1 and 2:
    #   preferred      0.4 > 0.2 yes, -0.1 > 0.4 no                  -> 1/2
    #   preferred_hard min(0.6, 0.4) > 0.2 yes, -0.1 > 0.4 no        -> 1/2
    #   margin         mean(tanh(0.4/0.2 - 1), tanh(-0.1/0.4 - 1))   = (tanh 1 - tanh 1.25) / 2
    ties = subsets["Ties"]
    margin = (math.tanh(1) - math.tanh(1.25)) / 2
    assert ties["ref_accuracy"] == pytest.approx(0.5) and ties["tied_accuracy"] == pytest.approx(2 / 3)
    assert ties["correctness_preferred"] == 0.5 and ties["correctness_preferred_hard"] == 0.5
    assert ties["margin_score"] == pytest.approx(margin, abs=1e-9)
    ties_expected = 0.3 * 2 / 3 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.5 + 0.01 * margin
    assert ties["score"] == pytest.approx(ties_expected, abs=1e-9)
    assert ties["unscorable"] == {"tied row with one chosen": 1, "id not ref:N or tied:N": 1}
    assert scores["score"] == pytest.approx((sum(expected.values()) + ties_expected) / 6, abs=1e-9)
    # bad layouts: dropped and counted by the loader, or counted by the scorer; none is scored
    assert counts == {"rows_read": 22, "kept": 18, "pairs": 49,
                      "dropped": {"empty list": 1, "not a list": 1, "count mismatch": 1, "empty text": 1}}
    assert scores["not_scored"] == {"Coding": 1} and scores["missing_subsets"] == []


def test_v2_missing_subset_and_unscorable_ties_give_no_score():
    _, _, scores = v2_rows(lambda row: row["subset"] != "Focus")
    assert scores["score"] is None and scores["missing_subsets"] == ["Focus"]
    assert "Focus" not in scores["subsets"]
    ties = ties_score([("ref:1", [0.9], [0.1]), ("tied:2", [0.9, 0.8], [0.1])])
    assert ties["score"] is None and ties["why_no_score"] == "no prompt has both a ref and a tied row"
    assert ties["ref_accuracy"] == 1.0 and ties["tied_accuracy"] == 1.0


def test_best_of_k_credit_is_the_chance_a_random_tie_break_ranks_all_chosen_first():
    assert best_of_k([0.5], [0.5, 0.5, 0.1]) == pytest.approx(1 / 3)
    assert best_of_k([0.5, 0.5], [0.5]) == pytest.approx(1 / 3)  # 3 tied: the rejected must come last
    assert best_of_k([0.6, 0.5], [0.5, 0.5]) == pytest.approx(1 / 3)  # C(3, 1)
    assert best_of_k([0.6], [0.5]) == 1.0 and best_of_k([0.4, 0.9], [0.5]) == 0.0


def test_response_lists_strict_names_file_row_and_column():
    with pytest.raises(UserError) as err:
        fixture(V2, "response_lists", strict=True)
    assert str(err.value) == f"{V2}: row 5, column 'chosen': empty list"
    bad = Dataset.from_list([{"prompt": "p", "chosen": ["a"], "rejected": ["b"], "num_correct": 2}])
    with pytest.raises(UserError) as err:
        to_preference(bad, "response_lists", source="x.jsonl", strict=True)
    assert str(err.value) == "x.jsonl: row 0, column 'num_correct': count mismatch"
    with pytest.raises(UserError) as err:
        to_preference(Dataset.from_dict({"prompt": ["p"], "chosen": [["a"]]}), "response_lists", source="x.jsonl")
    assert str(err.value) == "x.jsonl: missing column 'rejected'; columns are prompt, chosen"


def test_response_lists_expand_to_every_chosen_rejected_pair_for_training():
    rows, counts = fixture(V2, "response_lists")
    pairs = as_pairs(rows)
    assert len(pairs) == counts["pairs"] == 49
    math_row = [p for p in pairs if p["prompt"].startswith("Prompt 6 ")]
    assert [(reward(p["chosen"]), reward(p["rejected"])) for p in math_row] == [(0.6, 0.6), (0.6, 0.1),
                                                                                 (0.7, 0.6), (0.7, 0.1)]
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected", "subset"}


# --- through `make eval`, with a real tiny reward model --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """An untrained tiny Qwen2 reward model saved as a `make rm` output would be (no reward stats)."""
    from aplot.data import world
    from aplot.reward_model import build_reward_model

    path = tmp_path_factory.mktemp("rm") / "tiny"
    torch.manual_seed(0)
    tokenizer = world.build_tokenizer()
    build_reward_model("recipes/models/tiny-qwen2", tokenizer, fresh=True).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_eval(tmp_path, rm, name, *extra):
    from pipelines import eval as stage

    no_reasoning = tmp_path / "no_reasoning.jsonl"
    no_reasoning.write_text("".join(line for line in open(V1) if '"hep-' not in line and '"math-prm"' not in line))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "reward_models": [str(rm)], "output_dir": str(tmp_path / name), "eval_splits": [], "batch_size": 8,
        "eval_datasets": [{"name": "rb1", "path": V1, "format": "explicit"},
                          {"name": "rb1_no_reasoning", "path": str(no_reasoning), "format": "explicit"},
                          {"name": "rb2", "path": V2, "format": "response_lists"}]}))
    return stage.main(["--config", str(recipe), *extra])


def test_make_eval_reports_rewardbench_scores_from_the_shared_scorer(tmp_path, tiny_rm, capsys):
    from aplot.reward_model import RewardScorer, load_reward_model

    metrics = run_eval(tmp_path, tiny_rm, "out")
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    rb1 = metrics["models"]["tiny"]["rb1"]
    # the sections are the count-weighted per-subset accuracies the table reports (math-prm as the code)
    acc = {name: (m["n"], m["accuracy"]) for name, m in rb1["subsets"].items()}
    for section, names in V1_SECTIONS.items():
        weights = {n: acc[n][0] for n in names}
        if section == "Reasoning":
            weights["math-prm"] = sum(w for n, w in weights.items() if n.startswith("hep-"))
        value = sum(weights[n] * acc[n][1] for n in names) / sum(weights.values())
        assert rb1["rewardbench"]["sections"][section] == pytest.approx(value, abs=1e-12)
    assert rb1["rewardbench"]["score"] == pytest.approx(sum(rb1["rewardbench"]["sections"].values()) / 4)
    missing = metrics["models"]["tiny"]["rb1_no_reasoning"]["rewardbench"]
    assert missing["score"] is None and missing["sections"]["Reasoning"] is None
    assert "tiny | rb1_no_reasoning: subsets missing from the data: math-prm, hep-cpp" in printed
    assert re.search(r"tiny  rb1_no_reasoning(\s+\d\.\d{3}){3}\s+missing\s+missing", printed)

    # RewardBench 2 from each row's responses scored one at a time, compared by hand
    model, tokenizer = load_reward_model(str(tiny_rm), device="cpu")
    scorer = RewardScorer(model, tokenizer, batch_size=1)
    rows, counts = fixture(V2, "response_lists")
    by_subset = {}
    for row in rows:
        chosen = scorer.score([row["prompt"]] * len(row["chosen"]), row["chosen"]).tolist()
        rejected = scorer.score([row["prompt"]] * len(row["rejected"]), row["rejected"]).tolist()
        by_subset.setdefault(row["subset"], []).append(float(min(chosen) > max(rejected)))
    rb2 = metrics["models"]["tiny"]["rb2"]
    for name in ("Factuality", "Precise IF", "Math", "Safety", "Focus"):
        assert rb2["rewardbench2"]["subsets"][name]["accuracy"] == pytest.approx(
            sum(by_subset[name]) / len(by_subset[name])), name
    assert rb2["n"] == counts["pairs"] and metrics["data"]["rb2"] == counts
    assert rb2["rewardbench2"]["not_scored"] == {"Coding": 1}
    assert "rows of subsets the scorer does not know, not scored: Coding (1)" in printed
    assert "Ties rows not scored (tied row with one chosen): 1" in printed


def test_normalized_rewards_use_the_stats_in_config_and_old_models_refuse_in_one_line(tmp_path, tiny_rm, capsys):
    import shutil

    with pytest.raises(UserError) as err:
        run_eval(tmp_path, tiny_rm, "refused", "--normalize_rewards", "true")
    assert str(err.value) == (f"{tiny_rm}: normalize_rewards is on but its config.json has no reward_stats (saved "
                              "before they were recorded): retrain it with make rm, or set normalize_rewards: false")
    assert not (tmp_path / "refused").exists()
    stats_rm = tmp_path / "tiny"
    shutil.copytree(tiny_rm, stats_rm)
    config = json.loads((stats_rm / "config.json").read_text())
    (stats_rm / "config.json").write_text(json.dumps({**config, "reward_stats": {"mean": 0.25, "std": 4.0}}))
    raw = run_eval(tmp_path, stats_rm, "raw")["models"]["tiny"]["rb1"]
    normalized = run_eval(tmp_path, stats_rm, "normalized", "--normalize_rewards", "true")["models"]["tiny"]["rb1"]
    assert normalized["mean_reward_margin"] == pytest.approx(raw["mean_reward_margin"] / 4.0, rel=1e-5)
    assert normalized["wasserstein"] == pytest.approx(raw["wasserstein"] / 4.0, rel=1e-5)
    assert normalized["accuracy"] == raw["accuracy"] and normalized["rewardbench"] == raw["rewardbench"]
