"""`make rm` end to end on a slice of the embedded world: every loss type through one trainer."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import aplot
from aplot.config import APLOTConfig
from aplot.data import world
from aplot.errors import UserError
from aplot.reward_model import build_reward_model
from aplot.trainer import APLOTRewardTrainer, NonFiniteRewardError
from pipelines import rm
from tests.conftest import tiny_rm_argv

pytestmark = pytest.mark.core


@pytest.mark.parametrize("loss_type", aplot.LOSS_TYPES)
def test_every_loss_type_trains_saves_and_evaluates(tmp_path, loss_type):
    extra = ["--margin_value", "0.5"] if loss_type == "margin" else []
    metrics = rm.main(tiny_rm_argv(tmp_path, "--loss_type", loss_type, *extra))

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_labels == 1 and (tmp_path / "model.safetensors").exists()
    assert tok.pad_token == "<|pad|>"

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["loss_type"] == loss_type and saved["train_steps"] == 3 and saved["train_seconds"] > 0
    for split in ("test_id", "test_ood"):
        m = saved["eval"][split]
        assert m["n"] == 40 and 0 <= m["accuracy"] <= 1
        assert m["hard"]["n"] + m["easy"]["n"] == 40
    assert (tmp_path / "training_curve.png").stat().st_size > 1000

    logs = json.loads((tmp_path / "log_history.json").read_text())
    train_logs = [r for r in logs if "loss" in r]
    assert len(train_logs) == 3 and any("eval_accuracy" in r for r in logs)
    assert ("loss_margin_mean" in train_logs[0]) == (loss_type in ("margin", "point", "aplot"))
    assert ("ot_solve_ms" in train_logs[0]) == (loss_type in ("point", "aplot"))
    if loss_type == "margin":
        assert train_logs[0]["loss_margin_mean"] == pytest.approx(0.5)


def test_margin_loss_without_margin_fails_before_training(tmp_path):
    with pytest.raises(UserError, match="loss_type=margin needs margin_value"):
        rm.main(tiny_rm_argv(tmp_path / "out", "--loss_type", "margin"))
    assert not (tmp_path / "out").exists()


def make_trainer(tmp_path, loss_type="aplot", **kwargs):
    tok = world.build_tokenizer()
    torch.manual_seed(0)
    model = build_reward_model("recipes/models/tiny-qwen2", tok, fresh=True)
    args = APLOTConfig(output_dir=str(tmp_path), loss_type=loss_type, per_device_train_batch_size=8,
                       report_to="none", bf16=False, max_steps=2, disable_tqdm=True, **kwargs)
    data = Dataset.from_list(world.generate_split("train", 16, seed=0))
    return APLOTRewardTrainer(model, args, train_dataset=data, processing_class=tok)


def test_aplot_loss_is_the_method_on_the_forward_the_trainer_ran(tmp_path):
    trainer = make_trainer(tmp_path, gamma=0.3, epsilon=0.05)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, dict(batch))

    # Independently: rewards, and the final hidden state at each sequence's last real token.
    with torch.no_grad():
        out = trainer.model(**batch, output_hidden_states=True)
    last = batch["attention_mask"].sum(1) - 1
    hidden = out.hidden_states[-1][torch.arange(len(last)), last]
    rc, rr = out.logits[:, 0].chunk(2)
    hc, hr = hidden.chunk(2)
    margin = aplot.ot_margin(rc, rr, hc, hr, gamma=0.3, epsilon=0.05)
    torch.testing.assert_close(loss, -F.logsigmoid(rc - rr - margin).mean(), atol=1e-5, rtol=1e-5)
    assert loss.requires_grad


def test_non_finite_reward_stops_training_naming_the_step(tmp_path):
    trainer = make_trainer(tmp_path, loss_type="bt")
    with torch.no_grad():
        trainer.model.score.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteRewardError, match="non-finite reward at train step 0"):
        trainer.train()


@pytest.mark.slow
def test_wandb_logs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    rm.main(tiny_rm_argv(tmp_path / "out", "--report_to", "wandb", "--loss_type", "bt"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_make_rm_runs_a_recipe_with_overrides_and_reports_bad_keys_in_one_line(tmp_path):
    argv = tiny_rm_argv(tmp_path / "out", "--loss_type", "point")[2:]  # the Makefile passes --config
    done = subprocess.run(["make", "-s", "rm", f"ARGS={' '.join(argv)}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["loss_type"] == "point"

    bad = subprocess.run(["make", "-s", "rm", "ARGS=--gama 0.2"], capture_output=True, text=True)
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown key 'gama'" in errors[0] and "gamma" in errors[0]


def test_pipeline_reports_user_errors_as_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipelines.rm", "--config", "recipes/rm/embedded.yaml",
                           "--model_name_or_path", "./missing/model", "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: model path does not exist: ./missing/model"


def test_curve_train_pairs_logs_the_fit_to_the_training_labels_beside_held_out_accuracy(tmp_path):
    from aplot.config import parse_rm_recipe
    from aplot.data import load_train
    from aplot.evaluation import eval_curves
    from aplot.reward_model import RewardScorer, tokenize_pairs

    argv = tiny_rm_argv(tmp_path, "--loss_type", "bt", "--label_noise", "0.25", "--curve_train_pairs", "16")
    rm.main(argv)
    curves = eval_curves(json.loads((tmp_path / "log_history.json").read_text()))
    assert set(curves) == {"test_id", "train"} and [s for s, _ in curves["train"]] == [3]
    # the training curve is the model's accuracy on the first 16 pairs as trained on, flipped labels included
    data_cfg, _, _ = parse_rm_recipe(argv)
    pairs, _ = tokenize_pairs(load_train(data_cfg)[0].select(range(16)), AutoTokenizer.from_pretrained(tmp_path), 128)
    scorer = RewardScorer(AutoModelForSequenceClassification.from_pretrained(tmp_path).eval(),
                          AutoTokenizer.from_pretrained(tmp_path), batch_size=16)
    fit = (scorer.score_ids(pairs["chosen_ids"]) > scorer.score_ids(pairs["rejected_ids"])).float().mean().item()
    assert curves["train"][-1][1] == pytest.approx(fit)


def test_curve_train_pairs_must_not_be_negative(tmp_path):
    with pytest.raises(UserError, match="curve_train_pairs must be >= 0, got -1"):
        rm.main(tiny_rm_argv(tmp_path, "--curve_train_pairs", "-1"))
