"""Hostile input (issue 22, classes 4-7), through the stages' real entry points: nothing is lost silently
(a key given twice, an eval set or a model that would replace another), one loading policy for weights and
code, bounds on what sizes work, and one line for every bad input, asserted word for word, before any
work, with an earlier run's files left byte-identical; `make plan` refuses what its stage refuses."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from aplot.errors import UserError
from aplot.outputs import WORK
from tests.conftest import snapshot
from tests.test_bad_input import RM_BASE, bad_models, data, earlier_run, fails_with  # noqa: F401 (fixtures)


def rm_recipe(tmp_path, out, text="", override=True):
    """The tiny rm recipe with `text` appended; `override`: the keys `text` sets are taken out of the base
    first (else they appear twice)."""
    given = set(re.findall(r"^(\w+):", text, re.M)) if override else set()
    base = yaml.safe_dump({k: v for k, v in {**RM_BASE, "output_dir": str(out)}.items() if k not in given})
    path = tmp_path / "recipe.yaml"
    path.write_text(base + text)
    return path, base


def line_of(text, key) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(f"{key}:"))


CUSTOM_MODEL = '''from transformers import Qwen2ForSequenceClassification


class TinyForSequenceClassification(Qwen2ForSequenceClassification):
    pass
'''


@pytest.fixture
def models(tmp_path, embedded_rms, bad_models):  # noqa: F811
    """Reward-model and policy directories that are broken in one way each."""
    rm_dir, policy = Path(embedded_rms[0][0]), Path(embedded_rms[1])
    made = {"rm": str(rm_dir), "policy": str(policy), "pickled": bad_models["pickled"]}

    def variant(name, source=rm_dir):
        path = tmp_path / name
        shutil.copytree(source, path)
        return path

    no_weights = variant("no_weights")  # config and tokenizer, no weights
    (no_weights / "model.safetensors").unlink()
    truncated = variant("truncated")
    weights = truncated / "model.safetensors"
    made["full_size"] = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:made["full_size"] // 2])
    pickled_policy = variant("pickled_policy", policy)
    from safetensors.torch import load_file

    torch.save(load_file(pickled_policy / "model.safetensors"), pickled_policy / "pytorch_model.bin")
    (pickled_policy / "model.safetensors").unlink()
    custom = variant("custom_code")  # a model whose config names code of its own
    (custom / "modeling_tiny.py").write_text(CUSTOM_MODEL)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_tiny.TinyForSequenceClassification"}
    (custom / "config.json").write_text(json.dumps(config))
    preset = tmp_path / "broken_preset"  # a preset whose config.json is cut short
    preset.mkdir()
    (preset / "preset.yaml").write_text("seed: 0\n")
    (preset / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 64,')
    twice = tmp_path / "twice_preset"  # a preset.yaml with a key given twice
    twice.mkdir()
    shutil.copy("recipes/models/tiny-qwen2/config.json", twice)
    (twice / "preset.yaml").write_text("seed: 0\ntokenizer: {vocab_size: 512}\nseed: 1\n")
    huge = tmp_path / "huge_preset"  # a preset whose lineage would train on 10^10 documents
    huge.mkdir()
    shutil.copy("recipes/models/tiny-qwen2/config.json", huge)
    (huge / "preset.yaml").write_text("seed: 0\nbase: {documents: 10000000000}\n")
    made["huge_preset"] = str(huge)
    code_preset = tmp_path / "code_preset"  # a preset whose config.json would import code
    code_preset.mkdir()
    (code_preset / "preset.yaml").write_text("seed: 0\n")
    config = json.loads(Path("recipes/models/tiny-qwen2/config.json").read_text())
    (code_preset / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "evil.Config"}}))
    made["code_preset"] = str(code_preset)
    return {**made, "no_weights": str(no_weights), "truncated": str(truncated), "pickled_policy": str(pickled_policy),
            "custom": str(custom), "broken_preset": str(preset), "twice_preset": str(twice)}


# (case, text appended to the tiny rm recipe, whether its keys replace the base's, flags, expected line)
RM_CASES = [
    # 4. nothing lost silently
    ("key given twice", "gamma: 0.2\n", False, [],
     "{recipe}: line {last}, column 1: duplicate key 'gamma' (first at line {gamma}): YAML would keep only the last "
     "value"),
    ("key given twice inside a mapping", "dataset_columns: {{prompt: q, prompt: question}}\n", True, [],
     "{recipe}: line {last}, column 30: duplicate key 'prompt' (first at line {last}): YAML would keep only the last "
     "value"),
    ("eval set named like a split", "eval_datasets: [{{name: test_id, path: {data}/good.jsonl}}]\n", True, [],
     "{recipe}: eval_datasets[0]: name 'test_id' is one of eval_splits, the dataset's own split it would replace; "
     "give each eval set its own name"),
    ("two eval sets of one name", "eval_datasets: [{{name: mine, path: {data}/good.jsonl}}, "
     "{{name: mine, path: {data}/good.jsonl}}]\n", True, [],
     "{recipe}: eval_datasets[1]: name 'mine' is also the name of eval_datasets[0]; give each eval set its own name"),
    ("split listed twice", "eval_splits: [test_id, test_ood, test_id]\n", True, [],
     "{recipe}: eval_splits: 'test_id' is listed twice"),
    ("eval set named train", "eval_datasets: [{{name: train, path: {data}/good.jsonl}}]\n", True, [],
     "{recipe}: eval_datasets[0]: the name 'train' is taken by the training data's counts in metrics.json; "
     "choose another"),
    ("model directory without weights", "model_name_or_path: {no_weights}\ninit_from: sft\n", True, [],
     "{no_weights}: no model weights (model.safetensors) in this directory; init_from: scratch builds fresh "
     "weights from its config.json"),
    # 5. one policy for weights and code
    ("pickle-only model", "model_name_or_path: {pickled}\ninit_from: sft\n", True, [],
     "{pickled}: weights only as pytorch_model.bin, a pickle, which is not loaded (loading one can run code): save "
     "them as safetensors"),
    ("truncated weights", "model_name_or_path: {truncated}\ninit_from: sft\n", True, [],
     "{truncated}/model.safetensors: truncated ({half:,} bytes, its header lists {full:,}): copy or save it again"),
    ("custom code without trust_remote_code", "model_name_or_path: {custom}\ninit_from: sft\n", True, [],
     "{custom}: its config names code of its own (modeling_tiny.py) that loading would run; "
     "set trust_remote_code: true to allow it"),
    ("custom code with init_from scratch", "model_name_or_path: {custom}\n", True, [],
     "{custom}: its config names code of its own (modeling_tiny.py) that loading would run; "
     "set trust_remote_code: true to allow it"),
    # 6. bounds
    ("sinkhorn_iters unbounded", "sinkhorn_iters: 1099511627776\n", True, [],
     "{recipe}: sinkhorn_iters must be <= 100000, got 1099511627776"),
    ("max_length unbounded", "", True, ["--max_length", "1073741824"],
     "{recipe}: max_length must be <= 1048576, got 1073741824"),
    ("n_train unbounded", "n_train: 100000000000\n", True, [],
     "{recipe}: n_train must be <= 10000000, got 100000000000"),
    ("batch size unbounded", "per_device_train_batch_size: 16777216\n", True, [],
     "{recipe}: per_device_train_batch_size must be <= 65536, got 16777216"),
    ("alias bomb under env", "env:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n  b: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
     "  c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n  d: &d [*c, *c, *c, *c, *c, *c, *c, *c]\n"
     "  e: &e [*d, *d, *d, *d, *d, *d, *d, *d]\n  f: [*e, *e, *e, *e, *e, *e, *e, *e]\n", True, [],
     "{recipe}: its aliases expand to more than 100,000 values (a recipe holds a few hundred): refused before "
     "expanding them"),
    ("recursive alias", "eval_splits: &s [test_id, *s]\n", True, [],
     "{recipe}: line {last}, column 14: an alias refers to the anchor it is inside of (a recursive structure)"),
    # 7. one line for every bad input
    ("key not a string", "1: one\n", True, [], "{recipe}: line {last}, column 1: key 1 is not a string (quote it)"),
    ("unquoted no", "eval_strategy: no\n", True, [],
     "{recipe}: eval_strategy must be one of no, steps, epoch, got false (YAML reads unquoted yes, no, on and off "
     "as true or false: quote the word)"),
    ("misspelt strategy", "eval_strategy: stepz\n", True, [],
     "{recipe}: eval_strategy must be one of no, steps, epoch, got 'stepz' (did you mean: steps, epoch, no?)"),
    ("dtype float8", "dtype: float8\n", True, [],
     "{recipe}: dtype must be one of auto, bfloat16, float16, float32, got 'float8' (did you mean: float32, "
     "float16, bfloat16?)"),
    ("eval set name a list", "eval_datasets: [{{name: [a, b], path: {data}/good.jsonl}}]\n", True, [],
     "{recipe}: eval_datasets[0]: name must be a non-empty string, got ['a', 'b']"),
    ("eval set columns a string", "eval_datasets: [{{name: mine, path: {data}/good.jsonl, columns: prompt}}]\n", True,
     [], "{recipe}: eval_datasets[0]: columns must be a mapping of column names ({{prompt: question, ...}}), got "
     "'prompt'"),
    ("preset with a broken config.json", "model_name_or_path: {broken_preset}\n", True, [],
     "{broken_preset}/config.json: not valid JSON (line 1, column 43: Expecting property name enclosed in double "
     "quotes)"),
    ("preset.yaml with a key twice", "model_name_or_path: {twice_preset}\n", True, [],
     "{twice_preset}/preset.yaml: line 3, column 1: duplicate key 'seed' (first at line 1): YAML would keep only "
     "the last value"),
    ("no eval set but eval_strategy steps", "dataset_name: {data}/good.jsonl\neval_splits: []\n"
     "eval_strategy: steps\n", True, [],
     "{recipe}: eval_strategy is 'steps' but there is no eval set (eval_splits is empty, no eval_datasets): name "
     "one, or set eval_strategy: 'no'"),
    ("upper-case suffix is read", "dataset_name: {data}/prefs.JSONL\neval_splits: []\n", True, [],
     "{data}/prefs.JSONL: line 3 ends mid-row: the file looks truncated"),
    ("file of another kind", "dataset_name: {data}/prefs.txt\neval_splits: []\n", True, [],
     "{data}/prefs.txt: a file of a kind this loader does not read; name a .csv, .json, .jsonl, .parquet file or "
     "a dataset directory"),
    ("negative seed", "seed: -1\n", True, [], "{recipe}: seed must be >= 0, got -1"),
    ("data workers unbounded", "dataloader_num_workers: 100000\n", True, [],
     "{recipe}: dataloader_num_workers must be <= 256, got 100000"),
    ("preset sized beyond bounds", "model_name_or_path: {huge_preset}\n", True, [],
     "{huge_preset}/preset.yaml: base: documents must be <= 10000000, got 10000000000"),
    ("preset naming code", "model_name_or_path: {code_preset}\n", True, [],
     "{code_preset}/config.json: names code to import (auto_map); a preset is data: an architecture transformers "
     "knows"),
    ("empty dataset_name", "dataset_name: ''\n", True, [], "{recipe}: dataset_name is empty"),
    ("deepspeed config missing", "deepspeed: {tmp}/nope.json\n", True, [],
     "deepspeed config does not exist: {tmp}/nope.json"),
    ("deepspeed config broken", "", True, ["--deepspeed", "{tmp}/broken.json"],
     "{tmp}/broken.json: not valid JSON (line 2, column 1: Expecting value)"),
    ("--config twice", "", True, ["--config", "{recipe}"], "command line: --config is given twice (one recipe a run)"),
]


@pytest.mark.parametrize("case,text,override,flags,expected", RM_CASES, ids=[c[0] for c in RM_CASES])
def test_rm_refuses_hostile_input_in_one_line(tmp_path, data, models, case, text, override, flags,  # noqa: F811
                                              expected):
    from pipelines import rm

    shutil.copy(data / "truncated.jsonl", data / "prefs.JSONL")
    (data / "prefs.txt").write_text("prompt,chosen,rejected\n")
    (tmp_path / "broken.json").write_text('{"train_batch_size": \n')
    out = tmp_path / "out"
    fields = {**models, "tmp": tmp_path, "data": data, "half": models["full_size"] // 2, "full": models["full_size"]}
    recipe, base = rm_recipe(tmp_path, out, text.format(**fields), override)
    fields.update(recipe=recipe, last=base.count("\n") + text.count("\n"), gamma=line_of(base, "gamma"))
    fails_with(rm.main, ["--config", str(recipe), *[f.format(**fields) for f in flags]], expected.format(**fields),
               out)


def test_rm_refuses_a_pickle_only_checkpoint_to_resume(tmp_path, models):
    """A checkpoint whose weights are only a pickle counts as complete for the Trainer: resuming it is refused."""
    from pipelines import rm

    out = tmp_path / "out"
    checkpoint = out / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(Path(models["pickled"]) / name, checkpoint)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    (out / ".aplot.json").write_text('{"stage": "rm", "files": []}')  # an earlier rm run's directory
    before = snapshot(out)
    recipe, _ = rm_recipe(tmp_path, out)
    with pytest.raises(UserError) as err:
        rm.main(["--config", str(recipe)])
    assert str(err.value) == (f"{checkpoint}: weights only as pytorch_model.bin, a pickle, which is not loaded "
                              "(loading one can run code): save them as safetensors")
    assert snapshot(out) == before


def test_rm_refuses_a_checkpoint_state_that_is_more_than_tensors(tmp_path, models):
    """The Trainer reads a resumed checkpoint's optimizer state with torch's restricted unpickler: one that
    holds other objects is named before any work, not met as an UnpicklingError traceback."""
    from pipelines import rm

    out = tmp_path / "out"
    checkpoint = out / "checkpoint-2"
    shutil.copytree(models["rm"], checkpoint)
    torch.save({"state": {}, "param_groups": [], "path": Path("anything")}, checkpoint / "optimizer.pt")
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    (out / ".aplot.json").write_text('{"stage": "rm", "files": []}')  # an earlier rm run's directory
    before = snapshot(out)
    recipe, _ = rm_recipe(tmp_path, out)
    with pytest.raises(UserError) as err:
        rm.main(["--config", str(recipe)])
    assert str(err.value) == (f"{checkpoint}/optimizer.pt: holds objects other than tensors and plain values, which "
                              "loading could run as code, so it is not loaded: resume from another checkpoint, or "
                              "resume: false")
    assert snapshot(out) == before


def test_recipe_that_is_a_directory_or_missing(tmp_path):
    from pipelines import rm

    for argv, expected in ((["--config", str(tmp_path)], f"recipe is a directory, not a YAML file: {tmp_path}"),
                           (["--config", "/dev/null"], "recipe is not a regular file: /dev/null"),
                           (["--config"], "command line: --config needs a recipe file after it"),
                           (["--config", "--gamma", "0.2"], "command line: --config needs a recipe file after it")):
        with pytest.raises(UserError) as err:
            rm.main(argv)
        assert str(err.value) == expected


def test_trust_remote_code_is_announced_and_threaded_through(tmp_path, models, capsys):
    """With trust_remote_code the directory's own code runs, announced in one line; the fresh-weights path
    (init_from: scratch, `from_config`) gets it too, so transformers never asks on stdin."""
    from pipelines import rm

    out = tmp_path / "out"
    recipe, _ = rm_recipe(tmp_path, out, f"model_name_or_path: {models['custom']}\ntrust_remote_code: true\n")
    rm.main(["--config", str(recipe)])
    printed = capsys.readouterr().out
    announced = f"trust_remote_code: code from {models['custom']} will run (modeling_tiny.py)"
    assert printed.count(announced) == 1
    assert json.loads((out / "config.json").read_text())["architectures"] == ["TinyForSequenceClassification"]
    assert (out / "model.safetensors").exists()


def eval_argv(out, *flags):
    return ["--config", "recipes/eval/embedded.yaml", "--n_eval", "8", "--output_dir", str(out), *map(str, flags)]


def test_eval_names_models_of_one_basename_apart(tmp_path, models):
    """`a/rm` and `b/rm` are two rows, not one."""
    from pipelines import eval as stage

    for parent in ("a", "b"):
        shutil.copytree(models["rm"], tmp_path / parent / "rm")
    metrics = stage.main(eval_argv(tmp_path / "out", "--reward_models", tmp_path / "a" / "rm", tmp_path / "b" / "rm"))
    assert sorted(metrics["models"]) == ["a/rm", "b/rm"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["models"].keys() == {"a/rm", "b/rm"}


EVAL_CASES = [
    ("model listed twice", ["{rm}", "{rm}"], "recipes/eval/embedded.yaml: reward_models: {rm} is listed twice"),
    ("truncated weights", ["{truncated}"],
     "{truncated}/model.safetensors: truncated ({half:,} bytes, its header lists {full:,}): copy or save it again"),
    ("custom code without trust_remote_code", ["{custom}"],
     "{custom}: its config names code of its own (modeling_tiny.py) that loading would run; "
     "set trust_remote_code: true to allow it"),
    ("dtype float8", ["{rm}", "--dtype", "float8"],
     "recipes/eval/embedded.yaml: dtype must be one of auto, bfloat16, float16, float32, got 'float8' (did you "
     "mean: float32, float16, bfloat16?)"),
]


@pytest.mark.parametrize("case,models_and_flags,expected", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_refuses_hostile_input_in_one_line(tmp_path, models, case, models_and_flags, expected):
    from pipelines import eval as stage

    fields = {**models, "half": models["full_size"] // 2, "full": models["full_size"]}
    out = tmp_path / "out"
    fails_with(stage.main, eval_argv(out, "--reward_models", *[f.format(**fields) for f in models_and_flags]),
               expected.format(**fields), out)


def bon_recipe(tmp_path, models, **keys):
    recipe = {"policy_name_or_path": models["policy"], "reward_models": [models["rm"]], "gold": "embedded",
              "n_prompts": 2, "n_samples": 4, "backend": "transformers", "output_dir": str(tmp_path / "out"),
              "max_new_tokens": 8, **keys}
    path = tmp_path / "bon.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


BON_CASES = [
    ("n_samples unbounded", {"n_samples": 2**40}, "{recipe}: n_samples must be <= 65536, got 1099511627776"),
    ("n_prompts unbounded", {"n_prompts": 10**9}, "{recipe}: n_prompts must be <= 10000000, got 1000000000"),
    ("model listed twice", {"reward_models": ["{rm}", "{rm}"]}, "{recipe}: reward_models: {rm} is listed twice"),
    ("pickle-only policy", {"policy_name_or_path": "{pickled_policy}"},
     "{pickled_policy}: weights only as pytorch_model.bin, a pickle, which is not loaded (loading one can run "
     "code): save them as safetensors"),
    ("truncated proxy", {"reward_models": ["{truncated}"]},
     "{truncated}/model.safetensors: truncated ({half:,} bytes, its header lists {full:,}): copy or save it again"),
    ("prompt file without a prompt column", {"prompt_dataset": "{tmp}/no_prompt.jsonl", "prompt_split": "train"},
     "{tmp}/no_prompt.jsonl: no prompts to sample responses for (no prompt column, or only empty prompts); name "
     "the column with prompt_columns: {{prompt: <column>}}"),
    ("dtype float8", {"dtype": "float8"},
     "{recipe}: dtype must be one of auto, bfloat16, float16, float32, got 'float8' (did you mean: float32, "
     "float16, bfloat16?)"),
]


@pytest.mark.parametrize("case,keys,expected", BON_CASES, ids=[c[0] for c in BON_CASES])
def test_bon_refuses_hostile_input_before_sampling(tmp_path, models, case, keys, expected):
    from pipelines import bon as stage

    (tmp_path / "no_prompt.jsonl").write_text('{"chosen": "Hi!", "rejected": "No."}\n' * 4)
    fields = {**models, "tmp": tmp_path, "half": models["full_size"] // 2, "full": models["full_size"]}
    keys = {k: [x.format(**fields) for x in v] if isinstance(v, list) else v.format(**fields) if isinstance(v, str)
            else v for k, v in keys.items()}
    path = bon_recipe(tmp_path, models, **keys)
    fails_with(stage.main, ["--config", str(path)], expected.format(**fields, recipe=path), tmp_path / "out")
    assert not (tmp_path / "out" / "samples.jsonl").exists()


def test_bon_names_proxies_apart_and_from_the_gold(tmp_path, models):
    """Proxies `a/rm` and `b/rm` stay two, and one in a directory named `gold` is not the gold reward."""
    from pipelines import bon as stage

    proxies = [tmp_path / "a" / "rm", tmp_path / "b" / "rm", tmp_path / "gold"]
    for path in proxies:
        shutil.copytree(models["rm"], path)
    metrics = stage.main(["--config", str(bon_recipe(tmp_path, models, reward_models=[str(p) for p in proxies]))])
    assert sorted(metrics["gold_at_n"]) == ["a/rm", "b/rm", f"{tmp_path.name}/gold"]
    assert all(metrics["gold_at_n"][name] for name in metrics["gold_at_n"])


def ppo_argv(tmp_path, models, **keys):
    keys = {"sft_model_path": models["policy"], "reward_model_path": models["rm"], "output_dir": tmp_path / "out",
            "n_prompts": 64, "n_eval_prompts": 4, **keys}
    return ["--config", "recipes/ppo/embedded.yaml", *[str(w) for k, v in keys.items() for w in (f"--{k}", v)]]


def test_ppo_refuses_a_pickle_only_policy_and_checkpoint(tmp_path, models):
    from pipelines import ppo

    fails_with(ppo.main, ppo_argv(tmp_path, models, sft_model_path=models["pickled_policy"]),
               f"{models['pickled_policy']}: weights only as pytorch_model.bin, a pickle, which is not loaded (loading "
               "one can run code): save them as safetensors", tmp_path / "out")
    shutil.rmtree(tmp_path / "out")
    fails_with(ppo.main, ppo_argv(tmp_path, models, response_length=2**30),
               "recipes/ppo/embedded.yaml: response_length must be <= 1048576, got 1073741824", tmp_path / "out")
    out = tmp_path / "resumed"
    checkpoint = out / "checkpoint-8"
    shutil.copytree(models["pickled_policy"], checkpoint)
    shutil.copytree(models["rm"], checkpoint / "value_model")
    (checkpoint / "trainer_state.json").write_text('{"global_step": 8}')
    (checkpoint / "gold_history.json").write_text("[]")
    (out / ".aplot.json").write_text('{"stage": "ppo", "files": []}')  # an earlier ppo run's directory
    before = snapshot(out)
    with pytest.raises(UserError) as err:
        ppo.main(ppo_argv(tmp_path, models, output_dir=out))
    assert str(err.value) == (f"{checkpoint}: weights only as pytorch_model.bin, a pickle, which is not loaded "
                              "(loading one can run code): save them as safetensors")
    assert snapshot(out) == before


def test_plan_refuses_what_the_stages_refuse(tmp_path, models):
    """`make plan` parses with the stages' parsers: the same recipe, the same line."""
    from pipelines import plan

    out = tmp_path / "out"
    recipe, base = rm_recipe(tmp_path, out, "gamma: 0.2\n", override=False)
    for text, expected in [
        (None, f"{recipe}: line {base.count(chr(10)) + 1}, column 1: duplicate key 'gamma' (first at line "
               f"{line_of(base, 'gamma')}): YAML would keep only the last value"),
        ("sinkhorn_iters: 1000000\n", f"{recipe}: sinkhorn_iters must be <= 100000, got 1000000"),
        (f"eval_datasets: [{{name: test_ood, path: {tmp_path}/x.jsonl}}]\n",
         f"{recipe}: eval_datasets[0]: name 'test_ood' is one of eval_splits, the dataset's own split it would "
         "replace; give each eval set its own name"),
        (f"model_name_or_path: {models['no_weights']}\ninit_from: sft\n",
         f"{models['no_weights']}: no model weights (model.safetensors) in this directory; init_from: scratch builds "
         "fresh weights from its config.json"),
    ]:
        if text is not None:
            recipe, _ = rm_recipe(tmp_path, out, text)
        with pytest.raises(UserError) as err:
            plan.main(["--config", str(recipe)])
        assert str(err.value) == expected
    path = bon_recipe(tmp_path, models, reward_models=[models["rm"], models["rm"]])
    with pytest.raises(UserError) as err:
        plan.main(["--config", str(path)])
    assert str(err.value) == f"{path}: reward_models: {models['rm']} is listed twice"
    assert not out.exists()


def wait_for(predicate, process, seconds=300):
    end = time.monotonic() + seconds
    while not predicate():
        assert process.poll() is None, "the stage ended before it could be interrupted"
        assert time.monotonic() < end, "the stage did not get there in time"
        time.sleep(0.5)


@pytest.mark.slow
def test_command_line_duplicate_key_and_ctrl_c(tmp_path):
    """For real, through `python -m pipelines.rm`: a key given twice is one `error:` line and exit 2; Ctrl-C
    is one line naming the command that continues (exit 130), and that command does continue."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "out"
    recipe, base = rm_recipe(tmp_path, out, "gamma: 0.2\n", override=False)
    done = subprocess.run([sys.executable, "-m", "pipelines.rm", "--config", str(recipe)], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {recipe}: line {base.count(chr(10)) + 1}, column 1: duplicate key 'gamma' (first at line "
        f"{line_of(base, 'gamma')}): YAML would keep only the last value"]
    assert not out.exists()

    recipe, _ = rm_recipe(tmp_path, out, "max_steps: 100000\nsave_strategy: steps\nsave_steps: 1\n"
                                                   "save_total_limit: 1\n")
    args = ["--config", str(recipe), "--resume", "false"]
    expected = (f"interrupted; to continue where it stopped, rerun: python -m pipelines.rm --config {recipe} "
                "--resume true")
    for attempt, argv in enumerate((args, shlex.split(expected.split(": ", 1)[1])[3:])):
        log = tmp_path / f"stdout{attempt}"
        with open(log, "w") as stdout:
            # as at a terminal, even when this test runs in the background (whose children ignore SIGINT)
            process = subprocess.Popen([sys.executable, "-m", "pipelines.rm", *argv], stdout=stdout,
                                       stderr=subprocess.PIPE, text=True, env=env,
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            try:
                if attempt == 0:
                    # a run works aside (aplot.outputs.WORK) until it publishes: its checkpoints are there
                    wait_for(lambda: any((out / WORK).glob("checkpoint-*/trainer_state.json")), process)
                else:  # the printed command continues the interrupted run
                    wait_for(lambda log=log: "resuming from" in log.read_text(), process)
                time.sleep(1)
                process.send_signal(signal.SIGINT)
                _, stderr = process.communicate(timeout=120)
            finally:
                if process.poll() is None:  # never leave a 100,000-step run behind
                    process.kill()
                    process.wait()
        assert process.returncode == 130, stderr[-2000:]
        assert "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == expected
