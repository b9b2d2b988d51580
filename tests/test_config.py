"""Recipes: TRL's YAML parsing, one-line errors naming the file and key, overrides."""

import os

import pytest

from aplot.config import APLOTConfig, parse_rm_recipe
from aplot.errors import UserError

pytestmark = pytest.mark.core


def write_recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text("model_name_or_path: recipes/models/tiny-qwen2\noutput_dir: " + str(tmp_path / "out")
                    + "\nbf16: false\n" + text)
    return str(path)


def test_embedded_recipe_parses_with_the_documented_defaults():
    data, args, model = parse_rm_recipe(["--config", "recipes/rm/embedded.yaml"])
    assert isinstance(args, APLOTConfig)
    assert (args.loss_type, args.gamma, args.epsilon, args.sinkhorn_iters, args.margin_scale) == \
        ("aplot", 0.1, 0.1, 50, 1.0)
    assert data.dataset_name == "embedded" and data.eval_splits == ["test_id", "test_ood"]
    assert model.model_name_or_path == "recipes/models/tiny-qwen2"


def test_command_line_overrides_the_recipe():
    _, args, _ = parse_rm_recipe(["--config", "recipes/rm/embedded.yaml", "--gamma", "0.3", "--loss_type", "bt"])
    assert args.gamma == 0.3 and args.loss_type == "bt"


def test_unknown_recipe_key_names_file_key_and_closest_valid_keys(tmp_path):
    recipe = write_recipe(tmp_path, "gama: 0.2\n")
    with pytest.raises(UserError) as err:
        parse_rm_recipe(["--config", recipe])
    message = str(err.value)
    assert message.startswith(recipe) and "'gama'" in message and "gamma" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()  # failed before any work


def test_unknown_command_line_key_is_named():
    with pytest.raises(UserError, match=r"command line: unknown key 'epsilonn' \(did you mean: epsilon"):
        parse_rm_recipe(["--config", "recipes/rm/embedded.yaml", "--epsilonn", "0.1"])


@pytest.mark.parametrize("text,expected", [
    ("gamma: 1.5\n", "gamma must be <= 1.0, got 1.5"),
    ("gamma: -0.1\n", "gamma must be >= 0.0, got -0.1"),
    ("epsilon: 0\n", "epsilon must be > 0.0, got 0"),
    ("sinkhorn_iters: 0\n", "sinkhorn_iters must be >= 1, got 0"),
    ("n_train: -5\n", "n_train must be >= 1, got -5"),
    ("label_noise: 2\n", "label_noise must be <= 1.0, got 2"),
    ("loss_type: aplott\n", "loss_type 'aplott' is not one of bt, margin, label_smoothing, point, aplot "
                            "(did you mean: aplot"),
    ("ot_scope: world\n", "ot_scope 'world' is not one of global, local"),
    ("gamma: abc\n", "argument --gamma: invalid float value: 'abc'"),
    ("margin_scale: [1, 2]\n", "margin_scale must be a number, got [1, 2]"),
])
def test_bad_values_fail_with_one_line_naming_the_recipe(tmp_path, text, expected):
    recipe = write_recipe(tmp_path, text)
    with pytest.raises(UserError) as err:
        parse_rm_recipe(["--config", recipe])
    assert str(err.value).startswith(f"{recipe}: ") and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(UserError, match="recipe file does not exist: .*nope.yaml"):
        parse_rm_recipe(["--config", str(tmp_path / "nope.yaml")])


def test_wandb_is_offline_unless_the_user_opts_in(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    parse_rm_recipe(["--config", "recipes/rm/embedded.yaml", "--report_to", "wandb"])
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    parse_rm_recipe(["--config", "recipes/rm/embedded.yaml", "--report_to", "wandb"])
    assert os.environ["WANDB_MODE"] == "online"
