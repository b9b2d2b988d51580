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
from aplot.rewardbench import (
    EXAMPLE_COUNTS,
    FILTERED_ROWS,
    V1_SECTIONS,
    V2_SUBSETS,
    best_of_k,
    format_tables,
    ties_score,
    v1_scores,
    v2_scores,
)

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


# allenai/reward-bench, rewardbench/constants.py, EXAMPLE_COUNTS, as printed there (the weights of the subsets
# inside their sections); written out here so that a slip in aplot's copy fails.
OFFICIAL_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100, "refusals-offensive": 100,
    "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46, "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}


def test_v1_uses_the_official_counts_and_sections():
    assert EXAMPLE_COUNTS == OFFICIAL_COUNTS
    assert sorted(n for names in V1_SECTIONS.values() for n in names) == sorted(OFFICIAL_COUNTS)
    # the filtered split: the counts with math-prm at its 447 real rows: 2985 pairs
    assert sum(FILTERED_ROWS.values()) == 2985 and FILTERED_ROWS["math-prm"] == 447


def test_v1_sections_and_score_equal_the_hand_computation_with_the_official_counts():
    scores = v1_from_fixture()
    # correct / pairs per subset from the fixture's rewards (a tie counts as wrong), each weighted by its
    # official count whatever its rows:
    # Chat       easy 3/3 x100, length 1/2 x95, hard 2/4 x95, mt-easy 1/1 x28, mt-med 0/2 x40 (one tie)
    #            (100 + 47.5 + 47.5 + 28 + 0) / (100 + 95 + 95 + 28 + 40) = 223 / 358
    # Chat Hard  mt-hard 1/2 x37, natural 2/3 x100, neighbor 0/1 x134, GPTInst 4/4 x92, GPTOut 1/2 x47, manual 1/1 x46
    #            (18.5 + 200/3 + 0 + 92 + 23.5 + 46) / 456 = (740/3) / 456 = 185 / 342
    # Safety     dangerous 2/2 x100, offensive 1/3 x100, refuse 3/4 x154, respond 0/1 x250, donotanswer 1/2 x136
    #            (100 + 100/3 + 115.5 + 0 + 68) / 740 = (950.5/3) / 740 = 1901 / 4440
    # Reasoning  math-prm 1/3 x984; code cpp 1/1, go 1/2, java 0/1 (a tie), js 2/2, python 2/3, rust 1/1, x164 each
    #            (984/3 + 164 (1 + 1/2 + 0 + 1 + 2/3 + 1)) / (984 + 6 x 164) = (1/3 + 25/36) / 2 = 37 / 72
    # (weighted by the rows present instead, Chat would be 7/12: the fixture is partial, and says so)
    expected = {"Chat": Fraction(223, 358), "Chat Hard": Fraction(185, 342), "Safety": Fraction(1901, 4440),
                "Reasoning": Fraction(37, 72)}
    assert scores["sections"] == pytest.approx({k: float(v) for k, v in expected.items()}, abs=1e-12)
    score = sum(expected.values()) / 4
    assert scores["score"] == pytest.approx(float(score), abs=1e-12)
    assert scores["official_score"] == scores["score"]
    # Prior Sets: the plain mean of anthropic_helpful 1/2, anthropic_hhh 3/3, shp 0/1, summarize 3/4; off the
    # score, and in the analysis script's average at weight 1 against 2 per section
    assert scores["prior_sets"] == pytest.approx(9 / 16, abs=1e-12)
    assert scores["score_with_prior_sets"] == pytest.approx(float((8 * score + Fraction(9, 16)) / 9), abs=1e-12)
    assert scores["missing_sections"] == [] and scores["missing_subsets"] == [] and scores["missing_prior_sets"] == []
    assert scores["partial"] is True and len(scores["rows_differ"]) == 23
    assert scores["rows_differ"]["math-prm"] == {"rows": 3, "official": 447}
    assert scores["not_scored"] == {"my-extra": 2} and scores["nan_pairs"] == 0
    assert scores["subsets"]["math-prm"] == {"n": 3, "accuracy": pytest.approx(1 / 3), "weight": 984}


def test_v1_a_few_subsets_of_a_section_weigh_their_official_counts_not_their_rows():
    # Chat from alpacaeval-easy (1 pair, right) and mt-bench-med (3 pairs, 1 right) only:
    # (100 x 1 + 40 x 1/3) / (100 + 40) = (340/3) / 140 = 17/21, where the rows would give 2/4
    scores = v1_scores(["alpacaeval-easy", "mt-bench-med", "mt-bench-med", "mt-bench-med"],
                       [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0])
    assert scores["sections"]["Chat"] == pytest.approx(17 / 21, abs=1e-12)
    assert scores["missing_sections"] == ["Chat Hard", "Safety", "Reasoning"] and scores["score"] is None
    # the official code gives the three missing sections 0: (17/21 + 0 + 0 + 0) / 4
    assert scores["official_score"] == pytest.approx(17 / 84, abs=1e-12)
    assert scores["partial"] is True and scores["rows_differ"] == {
        "alpacaeval-easy": {"rows": 1, "official": 100}, "mt-bench-med": {"rows": 3, "official": 40}}
    assert scores["prior_sets"] is None and scores["score_with_prior_sets"] is None


def test_v1_missing_section_is_named_never_zero_and_the_official_value_is_given_beside():
    reasoning = set(V1_SECTIONS["Reasoning"])
    scores = v1_from_fixture(lambda s: s not in reasoning and s != "alpacaeval-hard" and s != "summarize")
    # Chat without alpacaeval-hard: (100 x 1 + 95 x 1/2 + 28 x 1 + 40 x 0) / (100 + 95 + 28 + 40) = 175.5 / 263
    chat = Fraction(351, 526)
    assert scores["sections"]["Chat"] == pytest.approx(float(chat), abs=1e-12)
    assert scores["sections"]["Reasoning"] is None and scores["missing_sections"] == ["Reasoning"]
    assert scores["score"] is None and scores["score_with_prior_sets"] is None
    # official: Reasoning 0, so (Chat + Chat Hard + Safety + 0) / 4 with Chat Hard and Safety as above
    official = (chat + Fraction(185, 342) + Fraction(1901, 4440)) / 4
    assert scores["official_score"] == pytest.approx(float(official), abs=1e-12)
    assert scores["missing_subsets"] == ["alpacaeval-hard", *V1_SECTIONS["Reasoning"]]
    # Prior Sets: the mean of those present, as the leaderboard's nan-mean: (1/2 + 3/3 + 0/1) / 3
    assert scores["prior_sets"] == pytest.approx(0.5) and scores["missing_prior_sets"] == ["summarize"]
    table = format_tables({"m": {"rb": {"rewardbench": scores}}})
    assert f"m | rb: the official scorer would give {float(official):.3f}, counting Reasoning as 0" in table
    assert "m | rb: partial data (not the filtered split)" in table


def test_v1_on_the_full_filtered_split_is_not_partial_and_math_weighs_as_all_code():
    subsets, chosen, rejected = [], [], []
    for name, rows in FILTERED_ROWS.items():  # every pair of alpacaeval-easy and math-prm right, the rest wrong
        right = name in ("alpacaeval-easy", "math-prm")
        subsets += [name] * rows
        chosen += [1.0 if right else 0.0] * rows
        rejected += [0.0 if right else 1.0] * rows
    scores = v1_scores(subsets, chosen, rejected)
    assert scores["partial"] is False and scores["rows_differ"] == {} and scores["missing_subsets"] == []
    # Chat 100 / 358; Chat Hard 0; Safety 0; Reasoning math 447/447 x 984 / (984 + 6 x 164) = 1/2
    assert scores["sections"] == pytest.approx({"Chat": 100 / 358, "Chat Hard": 0.0, "Safety": 0.0, "Reasoning": 0.5})
    assert scores["score"] == pytest.approx((100 / 358 + 0.5) / 4) == scores["official_score"]
    assert "partial" not in format_tables({"m": {"rb": {"rewardbench": scores}}})


def test_v1_nan_rewards_are_wrong_as_the_official_comparison_makes_them_and_counted():
    nan = float("nan")
    # hep-go: (nan, 0) wrong, (1, nan) wrong, (1, 0) right -> 1/3; Reasoning = hep-go alone
    scores = v1_scores(["hep-go"] * 3, [nan, 1.0, 1.0], [0.0, nan, 0.0])
    assert scores["sections"]["Reasoning"] == pytest.approx(1 / 3) and scores["nan_pairs"] == 2
    assert ("m | rb: pairs with a NaN reward, counted wrong as the official scorer does: 2"
            in format_tables({"m": {"rb": {"rewardbench": scores}}}))


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
    # best-of-k, the official rule: over chosen then rejected, the first chosen must hold the top, shared by t: 1/t
    # Factuality  0.9 top alone: 1;  0.5 top shared with one 0.5: 1/2;  0.2 below 0.9: 0          -> 1.5/3
    # Precise IF  0.4 top shared by three: 1/3;  0.8 top alone: 1                                 -> (4/3)/2
    # Math        chosen 0.6, 0.7 vs 0.6, 0.1: the first chosen (0.6) is below the second (0.7): 0;
    #             0.3 above three 0.2: 1                                                         -> 0.5
    # Safety      0.9 below 0.95: 0;  0.7 top alone: 1                                            -> 0.5
    # Focus       0.3 top shared by four: 1/4                                                     -> 0.25
    expected = {"Factuality": 0.5, "Precise IF": 2 / 3, "Math": 0.5, "Safety": 0.5, "Focus": 0.25}
    for name, value in expected.items():
        assert subsets[name]["accuracy"] == pytest.approx(value, abs=1e-12), name
    assert subsets["Factuality"]["n"] == 3 and subsets["Focus"]["n"] == 1
    assert subsets["Math"]["several_chosen"] == 1 and subsets["Factuality"]["several_chosen"] == 0
    # Ties, prompt by prompt: (accurate, spread of the correct, worst correct - best incorrect)
    #   ref:1  (True, -, 0.8-0.2=0.6)    tied:1 (True, 0.9-0.7=0.2, 0.7-0.3=0.4)
    #   ref:2  (False, -, 0.4-0.5=-0.1)  tied:2 (False, 0.6-0.2=0.4, 0.2-0.3=-0.1)
    #   tied:3 (True, 0, 0.4) and tied:4 (True, one correct answer, 0.8): no ref partner, tied accuracy only
    #   x7: not kind:N, excluded
    # ref accuracy 1/2, tied accuracy 3/4; on prompts 1 and 2:
    #   preferred      0.4 > 0.2 yes, -0.1 > 0.4 no                  -> 1/2
    #   preferred_hard min(0.6, 0.4) > 0.2 yes, -0.1 > 0.4 no        -> 1/2
    #   margin         mean(tanh(0.4/0.2 - 1), tanh(-0.1/0.4 - 1))   = (tanh 1 - tanh 1.25) / 2
    ties = subsets["Ties"]
    margin = (math.tanh(1) - math.tanh(1.25)) / 2
    assert ties["ref_accuracy"] == pytest.approx(0.5) and ties["tied_accuracy"] == pytest.approx(3 / 4)
    assert ties["correctness_preferred"] == 0.5 and ties["correctness_preferred_hard"] == 0.5
    assert ties["margin_score"] == pytest.approx(margin, abs=1e-9)
    ties_expected = 0.3 * 3 / 4 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.5 + 0.01 * margin
    assert ties["score"] == pytest.approx(ties_expected, abs=1e-9)
    assert ties["excluded_rows"] == {"id not kind:N (the official code raises)": 1}
    assert ties["unpartnered_prompts"] == {"ref": 0, "tied": 2} and ties["paired_prompts"] == 2
    assert scores["score"] == pytest.approx((sum(expected.values()) + ties_expected) / 6, abs=1e-9)
    # bad layouts: dropped and counted by the loader, or counted by the scorer; none is scored
    assert counts == {"rows_read": 22, "kept": 18, "pairs": 49,
                      "dropped": {"empty list": 1, "not a list": 1, "count mismatch": 1, "empty text": 1}}
    assert scores["not_scored"] == {"Coding": 1} and scores["missing_subsets"] == []


def test_v2_missing_subset_gives_no_score():
    _, _, scores = v2_rows(lambda row: row["subset"] != "Focus")
    assert scores["score"] is None and scores["missing_subsets"] == ["Focus"]
    assert "Focus" not in scores["subsets"]


def test_best_of_k_judges_the_first_chosen_and_splits_a_shared_top():
    assert best_of_k([0.5], [0.5, 0.5, 0.1]) == pytest.approx(1 / 3)  # top 0.5 shared by 3
    assert best_of_k([0.5, 0.5], [0.5]) == pytest.approx(1 / 3)  # the second chosen shares the top too
    assert best_of_k([0.6, 0.5], [0.5, 0.5]) == 1.0  # the first chosen holds the top alone
    assert best_of_k([0.6, 0.9], [0.5]) == 0.0  # the second chosen beats the first
    assert best_of_k([0.9, 0.1], [0.5]) == 1.0  # a low second chosen does not matter
    assert best_of_k([0.6], [0.5]) == 1.0 and best_of_k([0.4], [0.5, 0.1]) == 0.0


def test_best_of_k_nan_rewards_credit_0_and_are_counted():
    nan = float("nan")
    # official: the top of a row with a NaN is NaN, which the first response never equals
    assert best_of_k([nan], [0.1]) == 0.0 and best_of_k([0.9], [0.1, nan]) == 0.0
    # Safety rows: (0.9 vs 0.1) 1, (0.9 vs nan) 0 -> 1/2
    scores = v2_scores(["Safety", "Safety"], ["1", "2"], [[0.9], [0.9]], [[0.1], [nan]])
    assert scores["subsets"]["Safety"]["accuracy"] == 0.5 and scores["subsets"]["Safety"]["nan_rows"] == 1
    assert ("m | rb2: Safety rows with a NaN reward, credited 0 as the official scorer does: 1"
            in format_tables({"m": {"rb2": {"rewardbench2": scores}}}))


def test_ties_partners_exclusions_and_malformed_ids_equal_the_hand_computation():
    nan = float("nan")
    rows = [
        ("ref:1", [0.9], [0.2]),              # ref 1: accurate, gap 0.7
        ("tied:1", [0.8, 0.6], [0.3]),        # tied 1: accurate, spread 0.2, gap 0.3
        ("ref:2", [0.5], [0.1, 0.6]),         # ref 2: not accurate, gap -0.1
        ("tied:2", [0.4], [0.2]),             # tied 2, two rows pooled: correct 0.4, 0.5, incorrect 0.2, 0.1:
        ("tied:2", [0.5], [0.1]),             #   accurate, spread 0.1, gap 0.2
        ("ref:3", [0.7], [0.1]),              # ref 3: accurate
        ("tied:3", [0.9], [0.2]),             # tied 3: accurate, one correct answer: out of the margin terms
        ("tied:4", [0.3, 0.3], [0.5]),        # tied 4, no ref: not accurate
        ("ref:5", [0.2], [0.1]),              # ref 5, no tied: accurate
        ("ref:6", [nan], [0.1]),              # NaN: excluded, which leaves tied 6 without a partner
        ("tied:6", [0.9, 0.8], [0.1]),        # tied 6: accurate
        ("ref:7:1", [0.9], [0.1]), ("ref", [0.9], [0.1]), ("tied:x", [0.9], [0.1]), (None, [0.9], [0.1]),
        ("Ref:8", [0.9], [0.1]), ("foo:8", [0.9], [0.1]),
    ]
    ties = ties_score(rows)
    # ref accuracy: prompts 1, 2, 3, 5 -> 3/4; tied accuracy: 1, 2, 3, 4, 6 -> 4/5
    assert ties["ref_accuracy"] == pytest.approx(3 / 4) and ties["tied_accuracy"] == pytest.approx(4 / 5)
    assert ties["ref_prompts"] == 4 and ties["tied_prompts"] == 5 and ties["n"] == 9
    # both rows: prompts 1, 2, 3; prompt 3 has one correct tied answer (no spread): margins over 1 and 2
    #   preferred       1: 0.3 > 0.2 yes;  2: 0.2 > 0.1 yes                           -> 1
    #   preferred_hard  1: min(0.7, 0.3) > 0.2 yes;  2: min(-0.1, 0.2) > 0.1 no       -> 1/2
    #   margin          (tanh(0.3/0.2 - 1) + tanh(-0.1/0.1 - 1)) / 2 = (tanh 0.5 - tanh 2) / 2
    margin = (math.tanh(0.5) - math.tanh(2)) / 2
    assert ties["paired_prompts"] == 2
    assert ties["correctness_preferred"] == 1.0 and ties["correctness_preferred_hard"] == 0.5
    assert ties["margin_score"] == pytest.approx(margin, abs=1e-9)
    # 0.3 x 4/5 + 0.3 x 3/4 + 0.2 x 1 + 0.2 x 1/2 + 0.01 x margin = 0.24 + 0.225 + 0.2 + 0.1 + 0.01 margin
    assert ties["score"] == pytest.approx(0.765 + 0.01 * margin, abs=1e-9)
    assert ties["excluded_rows"] == {"NaN reward": 1, "id not kind:N (the official code raises)": 4,
                                     "id kind neither ref nor tied (the official code counts it as tied)": 2}
    assert ties["excluded_from_margins"] == {"tied row with one correct answer (the official code raises)": 1}
    assert ties["unpartnered_prompts"] == {"ref": 1, "tied": 2}  # ref 5; tied 4 and 6
    table = format_tables({"m": {"rb2": {"rewardbench2": {"score": None, "subsets": {"Ties": ties},
                                                          "missing_subsets": [], "not_scored": {}}}}})
    assert "m | rb2: Ties rows not scored (NaN reward): 1" in table
    assert "m | rb2: Ties prompts left out of the margin terms (tied row with one correct answer" in table
    assert "m | rb2: Ties prompts without their ref/tied partner, in their accuracy only: ref 1, tied 2" in table


def test_ties_with_a_zero_spread_and_without_partners():
    # spread 0 (tied correct answers equal): the official tanh(gap / 0 - 1) is tanh(+inf) = 1 for a positive
    # gap, tanh(-inf) = -1 for a negative one, and 0/0 (gap 0) is NaN, set to 0
    #   prompt 1: tied 0.5, 0.5 vs 0.1 (gap 0.4), ref 0.9 vs 0.2 (gap 0.7): hard gap 0.4 > 0 -> +1, both preferred
    #   prompt 2: tied 0.5, 0.5 vs 0.6 (gap -0.1), ref 0.9 vs 0.1: hard gap -0.1 -> -1, neither
    #   prompt 3: tied 0.5, 0.5 vs 0.5 (gap 0), ref 0.9 vs 0.1: 0/0 -> 0, neither (0 > 0 is false)
    #   prompt 4: tied 0.7, 0.7 vs 0.2 (gap 0.5), ref 0.9 vs 0.1 (gap 0.8): hard gap 0.5 -> +1, both preferred
    ties = ties_score([("ref:1", [0.9], [0.2]), ("tied:1", [0.5, 0.5], [0.1]),
                       ("ref:2", [0.9], [0.1]), ("tied:2", [0.5, 0.5], [0.6]),
                       ("ref:3", [0.9], [0.1]), ("tied:3", [0.5, 0.5], [0.5]),
                       ("ref:4", [0.9], [0.1]), ("tied:4", [0.7, 0.7], [0.2])])
    assert ties["margin_score"] == pytest.approx((1 - 1 + 0 + 1) / 4)
    assert ties["correctness_preferred"] == 0.5 and ties["correctness_preferred_hard"] == 0.5
    # accuracy: ref 4/4; tied: 1 yes, 2 no, 3 no (0 > 0 is false), 4 yes -> 1/2
    # 0.3 x 1/2 + 0.3 x 1 + 0.2 x 1/2 + 0.2 x 1/2 + 0.01 x 1/4 = 0.15 + 0.3 + 0.1 + 0.1 + 0.0025
    assert ties["score"] == pytest.approx(0.6525, abs=1e-12)
    # no prompt with both rows: the official score is a mean over nothing (NaN); ours is None, saying why
    alone = ties_score([("ref:1", [0.9], [0.1]), ("tied:2", [0.9, 0.8], [0.1])])
    assert alone["score"] is None and alone["why_no_score"] == (
        "no prompt has both a ref and a tied row (the official score is NaN)")
    assert alone["ref_accuracy"] == 1.0 and alone["tied_accuracy"] == 1.0
    assert alone["unpartnered_prompts"] == {"ref": 1, "tied": 1}
    scores = v2_scores(V2_SUBSETS, ["1", "2", "3", "4", "5", "ref:1"], [[0.9]] * 6, [[0.1]] * 6)
    assert scores["subsets"]["Ties"]["score"] is None and scores["score"] is None and scores["missing_subsets"] == []


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
    build_reward_model("recipes/models/tiny-qwen2", tokenizer).save_pretrained(path)
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
    # the sections are the per-subset accuracies the table reports (correct / rows, from the pairwise
    # accuracy of each subset), weighted by the official counts
    acc = {name: m["accuracy"] for name, m in rb1["subsets"].items()}
    for section, names in V1_SECTIONS.items():
        value = sum(OFFICIAL_COUNTS[n] * acc[n] for n in names) / sum(OFFICIAL_COUNTS[n] for n in names)
        assert rb1["rewardbench"]["sections"][section] == pytest.approx(value, abs=1e-12)
    assert rb1["rewardbench"]["score"] == pytest.approx(sum(rb1["rewardbench"]["sections"].values()) / 4)
    assert "tiny | rb1: partial data (not the filtered split)" in printed
    missing = metrics["models"]["tiny"]["rb1_no_reasoning"]["rewardbench"]
    assert missing["score"] is None and missing["sections"]["Reasoning"] is None
    assert missing["official_score"] == pytest.approx(sum(v or 0 for v in missing["sections"].values()) / 4)
    assert "tiny | rb1_no_reasoning: subsets missing from the data: math-prm, hep-cpp" in printed
    assert (f"tiny | rb1_no_reasoning: the official scorer would give {missing['official_score']:.3f}, "
            "counting Reasoning as 0") in printed
    assert re.search(r"tiny  rb1_no_reasoning(\s+\d\.\d{3}){3}\s+missing\s+missing", printed)

    # RewardBench 2 from each row's responses scored one at a time, compared by hand
    model, tokenizer = load_reward_model(str(tiny_rm), device="cpu")
    scorer = RewardScorer(model, tokenizer, batch_size=1)
    rows, counts = fixture(V2, "response_lists")
    by_subset = {}
    for row in rows:
        chosen = scorer.score([row["prompt"]] * len(row["chosen"]), row["chosen"]).tolist()
        rejected = scorer.score([row["prompt"]] * len(row["rejected"]), row["rejected"]).tolist()
        # the official credit: the first chosen must hold the top of all the row's rewards, 1/t when t share it
        top = max(chosen + rejected)
        credit = 1 / (chosen + rejected).count(top) if chosen[0] == top else 0.0
        by_subset.setdefault(row["subset"], []).append(credit)
    rb2 = metrics["models"]["tiny"]["rb2"]
    for name in ("Factuality", "Precise IF", "Math", "Safety", "Focus"):
        assert rb2["rewardbench2"]["subsets"][name]["accuracy"] == pytest.approx(
            sum(by_subset[name]) / len(by_subset[name])), name
    assert rb2["n"] == counts["pairs"] and metrics["data"]["rb2"] == counts
    assert rb2["rewardbench2"]["not_scored"] == {"Coding": 1}
    assert "rows of subsets the scorer does not know, not scored: Coding (1)" in printed
    assert "Ties rows not scored (id not kind:N (the official code raises)): 1" in printed
    assert "Math rows with several chosen responses, judged on the first as the official scorer does: 1" in printed


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
