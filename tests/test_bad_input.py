"""Bad input, through the stages' real entry points: each malformed recipe, dataset, model directory or
output directory fails with the one line the user sees (asserted word for word), before any work, and
leaves what an earlier run wrote in the output directory untouched."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from aplot.errors import UserError
from tests.conftest import snapshot

pytestmark = pytest.mark.core

# A few steps on a slice of the embedded world: the cases must fail long before these matter.
RM_BASE = {**yaml.safe_load(Path("recipes/rm/embedded.yaml").read_text()),
           "n_train": 48, "n_eval": 16, "max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1,
           "eval_strategy": "no", "save_strategy": "no", "disable_tqdm": True, "init_from": "scratch",
           "lineage_dir": str(Path(tempfile.gettempdir()) / "aplot-tests-lineage")}
ROW = '{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}\n'


@pytest.fixture
def data(tmp_path):
    """One file per way a dataset file can be broken."""
    root = tmp_path / "data"
    root.mkdir()
    files = {
        "empty.jsonl": b"",
        "blank.jsonl": b"\n\n",
        "truncated.jsonl": (ROW * 2 + '{"prompt": "Say hi.", "chosen": "Hi!", "rej').encode(),
        "latin1.jsonl": (ROW + '{"prompt": "Caf\xe9?", "chosen": "Oui.", "rejected": "Non."}\n').encode("latin-1"),
        "no_rejected.jsonl": b'{"prompt": "Say hi.", "chosen": "Hi!"}\n',
        "bad_json.jsonl": (ROW + '{"prompt": "Say hi." "chosen": "Hi!"}\n' + ROW).encode(),
        "not_object.jsonl": (ROW + '["Say hi.", "Hi!", "No."]\n').encode(),
        "empty_chosen.jsonl": (ROW + '{"prompt": "Say hi.", "chosen": " ", "rejected": "No."}\n').encode(),
        "truncated.csv": b'prompt,chosen,rejected\nSay hi.,Hi!,No.\n"Say hi.,Hi',
        "short_row.csv": b"prompt,chosen,rejected\nSay hi.,Hi!,No.\nSay hi.,Hi!\n",
        "good.jsonl": (ROW * 4).encode(),
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    return root


def earlier_run(out):
    """What an earlier run left in `out`: the case must not touch it."""
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (out / "metrics.json").write_text('{"from": "an earlier run"}\n')
    return snapshot(out)


def fails_with(main, argv, expected, out):
    before = earlier_run(out) if out is not None else None
    with pytest.raises(UserError) as err:
        main(argv)
    assert str(err.value) == expected
    if out is not None:
        assert snapshot(out) == before


# (case, recipe text appended to the tiny recipe (the keys it sets taken out of it first: a key given twice is
# refused), command-line flags, message)
RM_CASES = [
    ("unknown key", "gama: 0.2\n", [],
     "{recipe}: unknown key 'gama' (did you mean: gamma, adam_beta2, adam_beta1?)"),
    ("unknown command-line key", "", ["--epsilonn", "0.1"],
     "command line: unknown key 'epsilonn' (did you mean: epsilon, adam_epsilon, hub_revision?)"),
    ("string for a number", "gamma: abc\n", [], "{recipe}: argument --gamma: invalid float value: 'abc'"),
    ("float for an integer", "n_train: 4.5\n", [], "{recipe}: n_train must be an integer, got 4.5"),
    ("string for a list", "eval_splits: test_id\n", [],
     "{recipe}: eval_splits must be a list of strings, got 'test_id'"),
    ("number for a string", "loss_type: 3\n", [], "{recipe}: loss_type must be a string, got 3"),
    ("zero batch size", "per_device_train_batch_size: 0\n", [],
     "{recipe}: per_device_train_batch_size must be >= 1, got 0"),
    ("negative size", "n_train: -5\n", [], "{recipe}: n_train must be >= 1, got -5"),
    ("zero max_length", "max_length: 0\n", [], "{recipe}: max_length must be > 0, got 0"),
    ("zero max_steps", "max_steps: 0\n", [],
     "{recipe}: max_steps must be >= 1 (or -1: num_train_epochs decides), got 0"),
    ("epsilon 0", "epsilon: 0\n", [], "{recipe}: epsilon must be > 0.0, got 0"),
    ("gamma above 1", "gamma: 1.5\n", [], "{recipe}: gamma must be <= 1.0, got 1.5"),
    ("gamma below 0", "", ["--gamma", "-0.1"], "{recipe}: gamma must be >= 0.0, got -0.1"),
    ("gamma not finite", "gamma: .nan\n", [], "{recipe}: gamma must be a finite number, got nan"),
    ("YAML syntax", "gamma: 0.1\n  epsilon: : 2\n", [],
     "{recipe}: not valid YAML (line {line2}, column 10: mapping values are not allowed here)"),
    ("python object tag", "gamma: !!python/object/apply:os.system ['touch {tmp}/pwned']\n", [],
     "{recipe}: line {line1}, column 8: the tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed "
     "(recipes are plain YAML, read with a safe loader)"),
    ("dataset missing", "dataset_name: {data}/nope.jsonl\neval_splits: []\n", [],
     "dataset file does not exist: {data}/nope.jsonl"),
    ("dataset empty", "dataset_name: {data}/empty.jsonl\neval_splits: []\n", [],
     "{data}/empty.jsonl: the file is empty"),
    ("dataset of blank lines", "dataset_name: {data}/blank.jsonl\neval_splits: []\n", [],
     "{data}/blank.jsonl: no rows (only blank lines)"),
    ("dataset truncated mid-line", "dataset_name: {data}/truncated.jsonl\neval_splits: []\n", [],
     "{data}/truncated.jsonl: line 3 ends mid-row: the file looks truncated"),
    ("dataset not UTF-8", "dataset_name: {data}/latin1.jsonl\neval_splits: []\n", [],
     "{data}/latin1.jsonl: line 2 is not UTF-8 (byte 0xe9 at column 16)"),
    ("dataset line not JSON", "dataset_name: {data}/bad_json.jsonl\neval_splits: []\n", [],
     "{data}/bad_json.jsonl: line 2 is not valid JSON (column 22: Expecting ',' delimiter)"),
    ("dataset line not an object", "dataset_name: {data}/not_object.jsonl\neval_splits: []\n", [],
     '{data}/not_object.jsonl: line 2 is not a JSON object ({{"column": value, ...}}), got a list'),
    ("dataset missing a column", "dataset_name: {data}/no_rejected.jsonl\neval_splits: []\n", [],
     "{data}/no_rejected.jsonl: missing column 'rejected'; columns are prompt, chosen"),
    ("mapped column missing", "dataset_name: {data}/good.jsonl\neval_splits: []\n"
     "dataset_columns: {{chosen: good}}\n", [],
     "{data}/good.jsonl: missing column 'good'; columns are prompt, chosen, rejected"),
    ("CSV truncated in a quoted field", "dataset_name: {data}/truncated.csv\neval_splits: []\n", [],
     "{data}/truncated.csv: line 3 ends inside a quoted field: the file looks truncated"),
    ("CSV row short of fields", "dataset_name: {data}/short_row.csv\neval_splits: []\n", [],
     "{data}/short_row.csv: line 3 has 2 fields, the header has 3"),
    ("strict: a bad row", "dataset_name: {data}/empty_chosen.jsonl\neval_splits: []\nstrict: true\n", [],
     "{data}/empty_chosen.jsonl: row 1, column 'chosen': empty text"),
    ("eval set missing", "eval_datasets: [{{name: mine, path: {data}/nope.jsonl}}]\n", [],
     "dataset file does not exist: {data}/nope.jsonl"),
    ("no such embedded split", "eval_splits: [test]\n", [],
     "the embedded world has no split 'test'; it has train, test_id, test_ood"),
    ("model directory without a tokenizer", "model_name_or_path: {tmp}/no_tokenizer\ntokenizer_name_or_path: null\n",
     [], "{tmp}/no_tokenizer: no tokenizer in this directory (no tokenizer.json or tokenizer_config.json)"),
    ("model directory missing", "model_name_or_path: ./no/such/model\n", [],
     "model path does not exist: ./no/such/model"),
    ("output under a regular file", "output_dir: {tmp}/a_file/out\n", [],
     "output_dir cannot be created: {tmp}/a_file/out ({tmp}/a_file is not a directory)"),
    ("output is a regular file", "output_dir: {tmp}/a_file\n", [],
     "output_dir is a file, not a directory: {tmp}/a_file"),
    ("hub token in the recipe", "hub_token: hf_SECRETtokenVALUE123\n", [],
     "{recipe}: hub_token would be saved in training_args.bin of every checkpoint; "
     "set the HF_TOKEN environment variable instead"),
]


@pytest.mark.parametrize("case,text,flags,expected", RM_CASES, ids=[c[0] for c in RM_CASES])
def test_rm_refuses_bad_input_in_one_line(tmp_path, data, case, text, flags, expected):
    from pipelines import rm

    (tmp_path / "no_tokenizer").mkdir()
    shutil.copy("recipes/models/tiny-qwen2/config.json", tmp_path / "no_tokenizer")
    (tmp_path / "a_file").write_text("not a directory")
    out = tmp_path / "out"
    given = set(re.findall(r"^(\w+):", text, re.M))
    base = yaml.safe_dump({k: v for k, v in {**RM_BASE, "output_dir": str(out)}.items() if k not in given})
    fields = {"tmp": tmp_path, "data": data, "line1": base.count("\n") + 1, "line2": base.count("\n") + 2}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(base + text.format(**fields))
    fields["recipe"] = recipe
    fails_with(rm.main, ["--config", str(recipe), *flags], expected.format(**fields),
               out if "output" not in case else None)
    assert not (tmp_path / "pwned").exists()  # the python tag was never run


def test_recipe_not_utf8_and_missing_recipe(tmp_path):
    from pipelines import rm

    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"gamma: 0.1\n# caf\xe9\n")
    fails_with(rm.main, ["--config", str(recipe)], f"{recipe}: line 2 is not UTF-8 (byte 0xe9)", None)
    fails_with(rm.main, ["--config", str(tmp_path / "nope.yaml")], f"recipe file does not exist: {tmp_path}/nope.yaml",
               None)


@pytest.fixture
def bad_models(tmp_path, embedded_rms):
    """Directories that are not reward models: no tokenizer, no score head (the policy, a language
    model), no weights (a config only), weights only as a pickle."""
    rm_dir = Path(embedded_rms[0][0])
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(rm_dir / name, no_tokenizer)
    pickled = tmp_path / "pickled"
    shutil.copytree(rm_dir, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    return {"rm": str(rm_dir), "no_tokenizer": str(no_tokenizer), "policy": embedded_rms[1],
            "config_only": "recipes/models/tiny-qwen2", "pickled": str(pickled)}


EVAL_CASES = [
    ("no score head", ["--reward_models", "{policy}"],
     "{policy}: no trained score head in model.safetensors (no score, classifier, v_head weights): a language "
     "model, not a reward model"),
    ("no tokenizer", ["--reward_models", "{rm}", "{no_tokenizer}"],
     "{no_tokenizer}: no tokenizer in this directory (no tokenizer.json or tokenizer_config.json)"),
    ("no weights", ["--reward_models", "{config_only}"],
     "{config_only}: no model weights (model.safetensors) in this directory"),
    ("pickled weights", ["--reward_models", "{pickled}"],
     "{pickled}: weights only as pytorch_model.bin, a pickle, which is not loaded (loading one can run code): "
     "save them as safetensors"),
    ("zero batch size", ["--reward_models", "{rm}", "--batch_size", "0"],
     "recipes/eval/embedded.yaml: batch_size must be >= 1, got 0"),
    ("unknown key", ["--reward_models", "{rm}", "--batchsize", "8"],
     "command line: unknown key 'batchsize' (did you mean: batch_size, dataset_name, as_chat?)"),
    ("output under a regular file", ["--reward_models", "{rm}", "--output_dir", "{tmp}/a_file/out"],
     "output_dir cannot be created: {tmp}/a_file/out ({tmp}/a_file is not a directory)"),
]


@pytest.mark.parametrize("case,flags,expected", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_refuses_bad_input_in_one_line(tmp_path, bad_models, case, flags, expected):
    from pipelines import eval as stage

    (tmp_path / "a_file").write_text("not a directory")
    out = tmp_path / "out"
    fields = {**bad_models, "tmp": tmp_path}
    argv = ["--config", "recipes/eval/embedded.yaml", "--n_eval", "8", "--output_dir", str(out),
            *[flag.format(**fields) for flag in flags]]
    fails_with(stage.main, argv, expected.format(**fields), out if "output" not in case else None)


BON_CASES = [
    ("no score head", {"reward_models": ["{policy}"]},
     "{policy}: no trained score head in model.safetensors (no score, classifier, v_head weights): a language "
     "model, not a reward model"),
    ("gold without a tokenizer", {"gold": "{no_tokenizer}"},
     "{no_tokenizer}: no tokenizer in this directory (no tokenizer.json or tokenizer_config.json)"),
    ("n_samples not a power of two", {"n_samples": 3},
     "{recipe}: n_samples must be a power of two (the table reports n = 1, 2, 4, ...), got 3"),
    ("zero prompts", {"n_prompts": 0}, "{recipe}: n_prompts must be >= 1, got 0"),
    ("prompt file truncated", {"prompt_dataset": "{data}/truncated.jsonl", "prompt_split": "train"},
     "{data}/truncated.jsonl: line 3 ends mid-row: the file looks truncated"),
    ("output under a regular file", {"output_dir": "{tmp}/a_file/out"},
     "output_dir cannot be created: {tmp}/a_file/out ({tmp}/a_file is not a directory)"),
]


@pytest.mark.parametrize("case,keys,expected", BON_CASES, ids=[c[0] for c in BON_CASES])
def test_bon_refuses_bad_input_before_sampling(tmp_path, bad_models, data, case, keys, expected):
    """Sampling can take hours: a scorer that would fail after it must fail before it."""
    from pipelines import bon as stage

    (tmp_path / "a_file").write_text("not a directory")
    out = tmp_path / "out"
    fields = {**bad_models, "tmp": tmp_path, "data": data}
    recipe = {"policy_name_or_path": bad_models["policy"], "reward_models": [bad_models["rm"]], "gold": "embedded",
              "n_prompts": 2, "n_samples": 4, "backend": "transformers", "output_dir": str(out)}
    for key, value in keys.items():
        recipe[key] = [v.format(**fields) for v in value] if isinstance(value, list) else \
            value.format(**fields) if isinstance(value, str) else value
    path = tmp_path / "bon.yaml"
    path.write_text(yaml.safe_dump(recipe))
    fields["recipe"] = path
    fails_with(stage.main, ["--config", str(path)], expected.format(**fields), out if "output" not in case else None)
    assert not (out / "samples.jsonl").exists()


def test_read_only_output_directory_is_refused():
    """Refused in one line, the earlier run untouched. As root (CI), os.access grants everything: the check runs
    with an unprivileged real uid (os.access asks as the real uid; files still open as root)."""
    from pipelines import rm

    parent = Path(tempfile.mkdtemp())
    parent.chmod(0o755)  # reachable by any user, so what is refused is `out` itself
    out = parent / "out"
    before = earlier_run(out)
    out.chmod(0o555)
    root = os.geteuid() == 0
    try:
        if root:
            os.setresuid(65534, 0, 0)  # nobody, effective root kept so that imports and reads still work
        with pytest.raises(UserError, match=f"^output directory is not writable: {out}$"):
            rm.main(["--config", "recipes/rm/embedded.yaml", "--output_dir", str(out)])
    finally:
        if root:
            os.setresuid(0, 0, 0)
        out.chmod(0o755)
    assert snapshot(out) == before
    shutil.rmtree(parent)


@pytest.mark.slow
def test_command_line_and_make_print_one_error_line_and_exit_2(tmp_path, bad_models, data):
    """What a user at a terminal sees: one `error:` line, no traceback, exit status 2 (make: its own 2)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "pipelines.eval", "--config", "recipes/eval/embedded.yaml",
                           "--reward_models", bad_models["policy"], "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {bad_models['policy']}: no trained score head in model.safetensors (no score, classifier, v_head "
        "weights): a language model, not a reward model")

    done = subprocess.run([sys.executable, "-m", "pipelines.rm", "--config", "recipes/rm/embedded.yaml",
                           "--dataset_name", f"{data}/latin1.jsonl", "--eval_splits", "test_id",
                           "--output_dir", str(tmp_path / "rm")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        f"error: {data}/latin1.jsonl: line 2 is not UTF-8 (byte 0xe9 at column 16)"
    assert not (tmp_path / "rm").exists()

    done = subprocess.run(["make", "-s", "eval", f"ARGS=--reward_models {bad_models['rm']} --n_eval 0"],
                          capture_output=True, text=True, env=env)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert errors == ["error: recipes/eval/embedded.yaml: n_eval must be >= 1, got 0"]


@pytest.mark.ppo
def test_safe_defaults():
    """trust_remote_code is off in every recipe class; wandb stays offline; the safe YAML loader is used."""
    import dataclasses

    from trl import ModelConfig

    from aplot.config import APLOTConfig
    from aplot.ppo import APLOTPPOConfig
    from pipelines.bon import BonConfig
    from pipelines.eval import EvalConfig

    for cls in (APLOTConfig, ModelConfig, EvalConfig, BonConfig, APLOTPPOConfig):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        assert defaults.get("trust_remote_code", False) is False, cls
    assert {f.name: f.default for f in dataclasses.fields(APLOTConfig)}["resume"] is True


@pytest.mark.slow
def test_no_secret_reaches_logs_metrics_or_outputs(tmp_path):
    """Tokens in the environment (hub, wandb) appear in nothing the stage prints or writes; weights
    are safetensors."""
    secrets = {"HF_TOKEN": "hf_SECRETtokenVALUE123", "WANDB_API_KEY": "wandbSECRETkey0123456789abcdef"}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pipelines.rm", "--config", "recipes/rm/embedded.yaml",
                           "--output_dir", str(out), "--init_from", "scratch", "--lineage_dir", str(tmp_path / "lin"),
                           "--n_train", "48", "--n_eval", "16", "--max_steps", "2",
                           "--per_device_train_batch_size", "8", "--save_steps", "1", "--eval_strategy", "no",
                           "--logging_steps", "1", "--loss_type", "bt"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **secrets})
    assert done.returncode == 0, done.stderr[-2000:]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "model.safetensors").exists() and (out / "checkpoint-2" / "model.safetensors").exists()
    assert not [p for p in written if p.name.endswith(("pytorch_model.bin", ".pt.bin"))]
    for secret in secrets.values():
        assert secret not in done.stdout + done.stderr
        assert not [p for p in written if secret.encode() in p.read_bytes()]
