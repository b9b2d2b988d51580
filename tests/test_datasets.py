"""Real dataset formats through recipes: train and evaluate on each fixture, recipes map onto them,
every row is accounted for, and `make eval` compares models side by side."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from aplot.config import DataConfig, parse_rm_recipe
from aplot.data import load_raw, load_source
from aplot.errors import UserError
from aplot.evaluation import auc, expected_calibration_error, summarize
from pipelines import eval as eval_pipeline
from pipelines import rm

pytestmark = pytest.mark.core

FIXTURES = {  # fixture -> (format, column mapping), as a user's recipe would say it
    "reward_bench": ("explicit", None),
    "hh_rlhf": ("hh", None),
    "ultrafeedback_binarized": ("conversational", None),
    "skywork_preference": ("conversational", {"subset": "source"}),
    "unified_feedback": ("ratings", None),
    "hhh_alignment": ("multiple_choice", None),
    "mt_bench_human": ("pairwise_judgment", None),
}
HUB_FIXTURES = {  # the public dataset each fixture mimics
    "allenai/reward-bench": "reward_bench",
    "Anthropic/hh-rlhf": "hh_rlhf",
    "Skywork/Skywork-Reward-Preference-80K-v0.2": "skywork_preference",
    "llm-blender/Unified-Feedback": "unified_feedback",
    "HuggingFaceH4/hhh_alignment": "hhh_alignment",
    "lmsys/mt_bench_human_judgments": "mt_bench_human",
}
# The hub recipes (the embedded world's own, embedded.yaml and qwen2.5-shaped.yaml, are tested elsewhere).
# The recipes on hub data sets (the built-in worlds, embedded and spoken, are tested on their own).
REAL_RECIPES = sorted(p for p in Path("recipes/rm").glob("*.yaml")
                      if not any(f"dataset_name: {w}" in p.read_text() for w in ("embedded", "spoken")))


def fixture(name):
    return f"tests/fixtures/{name}.jsonl"


def write_recipe(path, **keys):
    base = yaml.safe_load(Path("recipes/rm/embedded.yaml").read_text())
    base.update({"n_train": 48, "max_steps": 2, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4,
                 "logging_steps": 1, "eval_steps": 2, "curve_eval_pairs": 4, "save_strategy": "no",
                 "disable_tqdm": True, "init_from": "scratch", "lineage_dir": str(path.parent / "lineage")}, **keys)
    path.write_text(yaml.safe_dump(base))
    return str(path)


@pytest.mark.parametrize("name", FIXTURES)
def test_each_format_trains_and_evaluates_from_a_recipe(tmp_path, name):
    fmt, columns = FIXTURES[name]
    recipe = write_recipe(
        tmp_path / "recipe.yaml", dataset_name=fixture(name), dataset_format=fmt, dataset_columns=columns,
        eval_splits=[], eval_datasets=[{"name": name, "path": fixture(name), "format": fmt, "columns": columns}],
        output_dir=str(tmp_path / "out"), max_length=40, loss_type="aplot")
    metrics = rm.main(["--config", recipe])

    counts = metrics["data"]["train"]
    assert counts["kept"] + sum(counts["dropped"].values()) == counts["rows_read"]
    assert counts["kept"] > 0 and counts["dropped"]  # every fixture holds bad rows
    assert 0 <= counts["truncated"] <= counts["pairs"]
    m = metrics["eval"][name]
    assert m["n"] == counts["pairs"] and m["truncated"] == counts["truncated"]
    assert {"accuracy", "auc", "wasserstein", "ece", "mean_reward_margin", "hard"} <= m.keys()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["data"][name] == metrics["data"][name]
    assert (tmp_path / "out" / "reward_distributions.png").stat().st_size > 1000


def test_long_rows_are_truncated_and_counted_not_dropped(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "out"), max_length=12, n_eval=8,
                          eval_splits=["test_id"])
    metrics = rm.main(["--config", recipe])
    assert metrics["data"]["train"]["truncated"] == 48 and metrics["train_pairs"] == 48
    assert metrics["eval"]["test_id"]["truncated"] == 8 and metrics["eval"]["test_id"]["n"] == 8


@pytest.mark.parametrize("recipe", REAL_RECIPES, ids=lambda p: p.stem)
def test_real_recipes_parse_and_map_onto_the_fixture_of_each_dataset(recipe):
    data, args, model = parse_rm_recipe(["--config", str(recipe), "--bf16", "false"])  # bf16 needs a GPU
    assert model.model_name_or_path.startswith(("Qwen/Qwen2.5-", "google/gemma-"))
    assert args.deepspeed and Path(args.deepspeed).is_file() and args.gradient_checkpointing
    sources = {"train": {"path": data.dataset_name, "split": data.dataset_train_split, "format": data.dataset_format,
                         "columns": data.dataset_columns}, **data.eval_sources()}
    for name, source in sources.items():
        local = {**source, "path": fixture(HUB_FIXTURES[source["path"]]), "config": None}
        pairs, counts = load_source(local, data)
        assert len(pairs) > 0, (recipe, name)
        assert {"prompt", "chosen", "rejected"} <= set(pairs.column_names)


def test_missing_column_names_file_column_and_existing_columns(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "answer": "a"}\n')
    recipe = write_recipe(tmp_path / "r.yaml", dataset_name=str(bad), eval_splits=[], eval_strategy="no",
                          output_dir=str(tmp_path / "o"))
    with pytest.raises(UserError) as err:
        rm.main(["--config", recipe])
    assert str(err.value) == f"{bad}: missing column 'chosen'; columns are prompt, answer"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,message", [
    (None, "dataset file does not exist: {path}"),
    ("", "{path}: the file is empty"),
    ('{"chosen": "a", "rejected": "b"}\n{"chosen": "c", "rej', "{path}: line 2 ends mid-row: the file looks truncated"),
])
def test_unreadable_dataset_files_are_named(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message.format(path=path).replace("(", r"\(")):
        load_raw(str(path), None, "train")


def test_strict_mode_fails_on_the_first_bad_row():
    cfg = DataConfig(strict=True)
    with pytest.raises(UserError, match=r"tests/fixtures/reward_bench.jsonl: row \d+, column '\w+': "):
        load_source({"path": fixture("reward_bench"), "split": "train", "format": "explicit"}, cfg)


def test_separation_and_calibration_metrics():
    chosen, rejected = torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0.0, 2.5, -1.0])
    assert auc(chosen, rejected) == pytest.approx(7 / 9)  # 2.0 and 1.0 lose to 2.5
    # all pairs right with sigmoid(d) near 1: calibrated; a wrong pair at high confidence is not
    assert expected_calibration_error(torch.tensor([20.0, 30.0])) == pytest.approx(0.0, abs=1e-8)
    assert expected_calibration_error(torch.tensor([-20.0])) == pytest.approx(1.0, abs=1e-8)
    m = summarize(chosen, rejected)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["mean_reward_margin"] == pytest.approx((3 - 0.5 + 2) / 3)
    assert m["wasserstein"] == pytest.approx((2 + 2 + 0.5) / 3)  # sorted: (1, -1), (2, 0), (3, 2.5)


def test_make_eval_compares_models_side_by_side(tmp_path, capsys):
    outs = []
    for loss_type in ("bt", "aplot"):
        out = tmp_path / loss_type
        rm.main(["--config", write_recipe(tmp_path / f"{loss_type}.yaml", output_dir=str(out), loss_type=loss_type,
                                          eval_splits=[], eval_strategy="no")])
        outs.append(str(out))
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({
        "reward_models": outs, "output_dir": str(tmp_path / "eval"), "dataset_name": "embedded", "n_eval": 24,
        "eval_splits": ["test_id"],
        "eval_datasets": [{"name": "hhh", "path": fixture("hhh_alignment"), "format": "multiple_choice"}]}))
    metrics = eval_pipeline.main(["--config", str(recipe)])

    assert list(metrics["models"]) == ["bt", "aplot"]
    assert set(metrics["models"]["bt"]) == {"test_id", "hhh"}
    assert metrics["models"]["aplot"]["hhh"]["hard_pairs"].startswith("top quartile")
    assert metrics["data"]["hhh"]["pairs"] == metrics["models"]["bt"]["hhh"]["n"]
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["models"]["bt"]["test_id"]["accuracy"] == metrics["models"]["bt"]["test_id"]["accuracy"]
    assert (tmp_path / "eval" / "reward_distributions.png").stat().st_size > 1000
    table = capsys.readouterr().out.splitlines()
    header = next(line for line in table if line.startswith("model"))
    assert header.split() == ["model", "eval", "set", "pairs", "acc", "hard", "margin", "AUC", "W1", "ECE"]
    rows = [line.split()[:2] for line in table]
    assert all([model, split] in rows for model in ("bt", "aplot") for split in ("test_id", "hhh"))


def test_make_eval_names_a_missing_model(tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({"reward_models": [str(tmp_path / "nope")], "eval_splits": ["test_id"]}))
    with pytest.raises(UserError, match=f"reward model path does not exist: {tmp_path}/nope"):
        eval_pipeline.main(["--config", str(recipe)])
