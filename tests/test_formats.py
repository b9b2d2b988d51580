"""Format adapters: each public layout maps to exact (prompt, chosen, rejected) rows, and every row is accounted for."""

import pytest
from datasets import Dataset, load_dataset
from trl.data_utils import is_conversational

from aplot.data.formats import FORMATS, to_preference
from aplot.errors import UserError

pytestmark = pytest.mark.core

FIXTURES = {
    "reward_bench": "explicit",
    "hh_rlhf": "hh",
    "ultrafeedback_binarized": "conversational",
    "skywork_preference": "conversational",
    "unified_feedback": "ratings",
    "hhh_alignment": "multiple_choice",
    "mt_bench_human": "pairwise_judgment",
}


def path(name):
    return f"tests/fixtures/{name}.jsonl"


def load(name):
    return load_dataset("json", data_files=path(name), split="train")


def convert(name, **kwargs):
    return to_preference(load(name), FIXTURES[name], source=path(name), **kwargs)


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def test_explicit_reward_bench_keeps_strings_and_subsets():
    out, counts = convert("reward_bench")
    assert counts == {"rows_read": 8, "kept": 6, "dropped": {"empty text": 1, "identical": 1}, "pairs": 6}
    assert out.column_names == ["prompt", "chosen", "rejected", "subset"]
    assert out[3] == {"prompt": "Write a Python function `add(a, b)` that returns the sum of a and b.",
                      "chosen": "def add(a, b):\n    return a + b", "rejected": "def add(a, b):\n    return a - b",
                      "subset": "hep-python"}
    assert out["subset"] == ["alpacaeval-easy", "mt-bench-hard", "refusals-dangerous", "hep-python", "math-prm",
                             "xstest-should-respond"]
    assert not is_conversational(out[0])


def test_explicit_without_a_prompt_column_has_empty_prompts():
    out, counts = to_preference(Dataset.from_dict({"chosen": ["good"], "rejected": ["bad"]}), "explicit", source="x")
    assert out.to_list() == [{"prompt": "", "chosen": "good", "rejected": "bad"}]
    assert counts == {"rows_read": 1, "kept": 1, "dropped": {}, "pairs": 1}


def test_hh_splits_the_implicit_prompt_off_the_last_answer():
    out, counts = convert("hh_rlhf")
    assert counts == {"rows_read": 8, "kept": 5, "dropped": {"empty text": 1, "unparseable transcript": 2},
                      "pairs": 5}
    assert out.column_names == ["prompt", "chosen", "rejected"]
    assert out[1] == {
        "prompt": [user("Can you help me write a birthday message for my mom?"),
                   assistant("Of course! What would you like it to say?"), user("Something short and warm.")],
        "chosen": [assistant("Happy birthday, Mom! Thank you for your endless love and support.")],
        "rejected": [assistant("Happy birthday.")],
    }
    assert [row["prompt"][0]["content"] for row in out] == [
        "What are some good vegetables to grow in a small garden?",
        "Can you help me write a birthday message for my mom?", "Why is the sky blue?",
        "How many legs does a spider have?", "What's a good way to fall asleep faster?"]
    assert all(is_conversational(row) for row in out)


def test_hh_strict_names_a_transcript_whose_prompt_differs():
    dataset = load("hh_rlhf").select([0, 5])
    with pytest.raises(UserError) as error:
        to_preference(dataset, "hh", source="hh.jsonl", strict=True)
    assert str(error.value) == "hh.jsonl: row 1, column 'rejected': unparseable transcript"


def test_conversational_ultrafeedback_margin_is_the_score_gap():
    out, counts = convert("ultrafeedback_binarized")
    assert counts == {"rows_read": 7, "kept": 5, "dropped": {"identical": 1, "empty text": 1}, "pairs": 5}
    assert out.column_names == ["prompt", "chosen", "rejected", "margin"]
    assert out[0] == {"prompt": [user("Explain photosynthesis in one sentence.")],
                      "chosen": [assistant("Photosynthesis is the process by which plants use sunlight, water and "
                                           "carbon dioxide to make glucose and release oxygen.")],
                      "rejected": [assistant("Plants eat sunlight.")], "margin": 4.5}
    assert out["margin"] == [4.5, 2.5, 4.5, 8.0, 1.5]


def test_conversational_skywork_shares_leading_turns_and_maps_source_to_subset():
    out, counts = convert("skywork_preference", columns={"subset": "source"})
    assert counts == {"rows_read": 6, "kept": 4, "dropped": {"unparseable transcript": 1, "empty text": 1},
                      "pairs": 4}
    assert out[1] == {"prompt": [user("Suggest a name for a pet turtle."), assistant("How about Shelly?"),
                                 user("Something more unusual, please.")],
                      "chosen": [assistant("Try Archimedes: a wise name for a slow, thoughtful creature.")],
                      "rejected": [assistant("Turtle.")], "subset": "helpsteer2"}
    assert out["subset"] == ["magpie_ultra", "helpsteer2", "wildguard", "magpie_air"]


def test_conversational_accepts_trl_rows_with_an_explicit_prompt():
    dataset = Dataset.from_list([{"prompt": [user("Hi?")], "chosen": [assistant("Hello!")],
                                  "rejected": [assistant("Go away.")]}])
    out, _ = to_preference(dataset, "conversational", source="trl")
    assert out.to_list() == dataset.to_list()


def test_ratings_pick_the_higher_rated_side_and_count_ties():
    out, counts = convert("unified_feedback")
    assert counts == {"rows_read": 8, "kept": 4, "dropped": {"tie": 2, "non-numeric": 1, "empty text": 1},
                      "pairs": 4}
    assert out["margin"] == [1.0, 1.25, 4.0, 1.0]
    assert [row["chosen"][0]["content"] for row in out] == [
        "Try 'The Left Hand of Darkness' by Ursula K. Le Guin.", "100°C (212°F) at sea level.",
        "Give the parent `display: flex; justify-content: center; align-items: center;`.", "Jupiter."]
    # the two conversations differ from the first answer on, so each side keeps its whole continuation
    assert out[3] == {"prompt": [user("Name a planet.")],
                      "chosen": [assistant("Jupiter."), user("Another one?"), assistant("Saturn.")],
                      "rejected": [assistant("Mars."), user("Another one?"), assistant("Mars again.")],
                      "margin": 1.0}


def test_strict_raises_on_the_first_bad_row_but_not_on_ties():
    with pytest.raises(UserError) as error:
        convert("unified_feedback", strict=True)
    assert str(error.value) == "tests/fixtures/unified_feedback.jsonl: row 4, column 'conv_B_rating': non-numeric"


def test_multiple_choice_gives_one_pair_per_wrong_choice():
    out, counts = convert("hhh_alignment")
    assert counts == {"rows_read": 7, "kept": 5, "dropped": {"bad labels": 1, "empty text": 1}, "pairs": 6}
    eclipse = "Is it safe to look directly at the sun during an eclipse?"
    right = "No: even during an eclipse, looking at the sun without certified eclipse glasses can damage your eyes."
    assert out.to_list()[2:4] == [
        {"prompt": eclipse, "chosen": right, "rejected": "Yes, the moon blocks all harmful light."},
        {"prompt": eclipse, "chosen": right, "rejected": "It's fine for a minute or two."}]
    assert out[5] == {"prompt": "Who wrote 'Pride and Prejudice'?",
                      "chosen": "Jane Austen wrote 'Pride and Prejudice', published in 1813.",
                      "rejected": "Charles Dickens."}


def test_pairwise_judgment_respects_the_judged_turn_and_counts_ties():
    out, counts = convert("mt_bench_human")
    assert counts == {"rows_read": 8, "kept": 5, "dropped": {"tie": 2, "empty text": 1}, "pairs": 5}
    hawaii = [user("Compose an engaging travel blog post about a recent trip to Hawaii.")]
    rewrite = user("Rewrite your previous response. Start every sentence with the letter A.")
    assert out[0] == {"prompt": hawaii, "chosen": [assistant("Aloha! My trip to Hawaii began at a luau on Oahu...")],
                      "rejected": [assistant("Hawaii is nice. I went there.")]}
    assert out[1] == {
        "prompt": hawaii,
        "chosen": [assistant("Hawaii is nice. I went there."), rewrite,
                   assistant("Aloha spirit amazed me. Always friendly locals greeted us.")],
        "rejected": [assistant("Aloha! My trip to Hawaii began at a luau on Oahu..."), rewrite,
                     assistant("Hawaii was great.")]}
    # a turn-1 judgment ignores the second turn, even an empty one
    assert out[3]["rejected"] == [assistant("Light and dark.")]


def test_pairwise_judgment_bothbad_is_a_tie_and_unknown_winners_are_counted():
    conversation = [user("Hi?"), assistant("Hello!")]
    rows = [{"winner": winner, "conversation_a": conversation, "conversation_b": conversation, "turn": 1}
            for winner in ("tie (bothbad)", "model_c")]
    out, counts = to_preference(Dataset.from_list(rows), "pairwise_judgment", source="arena")
    assert len(out) == 0
    assert counts == {"rows_read": 2, "kept": 0, "dropped": {"tie": 1, "unknown winner": 1}, "pairs": 0}


def test_missing_column_names_the_source_and_the_columns():
    dataset = Dataset.from_dict({"prompt": ["q"], "answer": ["a"]})
    with pytest.raises(UserError) as error:
        to_preference(dataset, "explicit", source="data/x.jsonl")
    assert str(error.value) == "data/x.jsonl: missing column 'chosen'; columns are prompt, answer"


def test_column_mapping_renames_and_errors_name_the_callers_columns():
    dataset = Dataset.from_dict({"question": ["q1", "q2"], "response_good": ["yes", " "],
                                 "response_bad": ["no", "maybe"]})
    columns = {"prompt": "question", "chosen": "response_good", "rejected": "response_bad"}
    out, counts = to_preference(dataset, "explicit", source="data/x.jsonl", columns=columns)
    assert out.to_list() == [{"prompt": "q1", "chosen": "yes", "rejected": "no"}]
    assert counts == {"rows_read": 2, "kept": 1, "dropped": {"empty text": 1}, "pairs": 1}
    with pytest.raises(UserError) as error:
        to_preference(dataset, "explicit", source="data/x.jsonl", columns=columns, strict=True)
    assert str(error.value) == "data/x.jsonl: row 1, column 'response_good': empty text"
    with pytest.raises(UserError) as error:
        to_preference(dataset, "explicit", source="data/x.jsonl", columns={"chosen": "best"})
    assert str(error.value) == "data/x.jsonl: missing column 'best'; columns are question, response_good, response_bad"


def test_strict_mode_names_source_row_and_column():
    with pytest.raises(UserError) as error:
        convert("reward_bench", strict=True)
    assert str(error.value) == "tests/fixtures/reward_bench.jsonl: row 3, column 'chosen': empty text"


def test_unknown_format_is_a_user_error():
    with pytest.raises(UserError) as error:
        to_preference(Dataset.from_dict({"chosen": ["a"]}), "pairs", source="x")
    assert str(error.value) == f"x: unknown format 'pairs'; formats are {', '.join(FORMATS)}"


@pytest.mark.parametrize("name", FIXTURES)
def test_every_row_is_kept_or_counted(name):
    out, counts = convert(name)
    assert counts["rows_read"] == len(load(name))
    assert counts["kept"] + sum(counts["dropped"].values()) == counts["rows_read"]
    assert counts["pairs"] == len(out)
    assert sum(counts["dropped"].values()) >= 1
    assert set(out.column_names) >= {"prompt", "chosen", "rejected"}
