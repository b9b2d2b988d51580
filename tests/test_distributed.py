"""Data parallelism for real: torchrun with two CPU processes (gloo) against one process, for reward-model
training under DeepSpeed ZeRO-2 and ZeRO-3, the global-batch APLOT margin, and Best-of-N scoring."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, tiny_rm_argv

pytestmark = pytest.mark.core

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(cmd, timeout=300):
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.mark.parametrize("name, processes, machines", [("1x8", 8, 1), ("2x8", 16, 2)])
def test_accelerate_launch_configs_load(name, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
    assert (config.num_processes, config.num_machines, config.distributed_type) == (processes, machines, "MULTI_GPU")


# A plain process that cannot import DeepSpeed: what a user loading the saved model has.
LOAD_WITHOUT_DEEPSPEED = """
import json, sys
sys.modules["deepspeed"] = None  # `import deepspeed` fails, and transformers sees it as not installed
from transformers import AutoModelForSequenceClassification
from transformers.integrations import is_deepspeed_available
from aplot.data import world
from aplot.evaluation import evaluate_pairs
from aplot.reward_model import RewardScorer, load_tokenizer
from datasets import Dataset
assert not is_deepspeed_available()
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
scorer = RewardScorer(model, load_tokenizer(sys.argv[1]), batch_size=16, max_length=128)
pairs = Dataset.from_list(world.generate_split("test_id", 40, 0))
print(json.dumps({"accuracy": evaluate_pairs(scorer, pairs)[0]["accuracy"],
                  "parameters": sum(p.numel() for p in model.parameters())}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_rm_trains_under_deepspeed_in_two_processes_and_saves_a_plain_model(tmp_path, stage):
    out = tmp_path / stage
    run([*TORCHRUN, "-m", "pipelines.rm", *tiny_rm_argv(out, "--deepspeed", f"recipes/deepspeed/{stage}.json")])

    metrics = json.loads((out / "metrics.json").read_text())
    # 48 pairs, 8 a rank: 3 steps in two processes (6 in one), through the DeepSpeed engine.
    assert metrics["processes"] == 2 and metrics["zero_stage"] == int(stage[-1])
    assert metrics["train_steps"] == 3 and metrics["train_pairs"] == 48
    logs = json.loads((out / "log_history.json").read_text())
    assert sum("loss" in r for r in logs) == 3 and all(r["loss"] > 0 for r in logs if "loss" in r)
    assert (out / "model.safetensors").exists() and not list(out.glob("global_step*"))

    loaded = json.loads(run([sys.executable, "-c", LOAD_WITHOUT_DEEPSPEED, str(out)]).stdout.splitlines()[-1])
    # The whole model, not a ZeRO-3 shard, and the one the pipeline evaluated after training.
    assert loaded["parameters"] > 500_000
    assert loaded["accuracy"] == pytest.approx(metrics["eval"]["test_id"]["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_global_batch_margins_in_two_processes_equal_one_process(tmp_path):
    script = "tests/distributed_margins.py"
    run([sys.executable, script, str(tmp_path / "one.json")])
    run([*TORCHRUN, script, str(tmp_path / "two.json")])
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["processes"] == 1 and two["processes"] == 2
    assert len(one["global"]) == len(two["global"]) == 16
    assert max(abs(a - b) for a, b in zip(one["global"], two["global"])) <= 1e-6
    # Per-rank plans (ot_scope: local) solve two 8-pair problems instead: visibly other margins.
    assert max(abs(a - b) for a, b in zip(one["global"], two["local"])) > 1e-4


@pytest.mark.slow
def test_best_of_n_scoring_in_two_processes_equals_one_process(tmp_path, embedded_rms):
    from pipelines import bon as stage

    rms, policy = embedded_rms
    recipe = {"policy_name_or_path": policy, "reward_models": rms, "gold": "embedded", "n_prompts": 5,
              "n_samples": 8, "max_new_tokens": 12, "backend": "transformers", "chunk_prompts": 5,
              "score_batch_size": 16}
    for name in ("one", "two"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**recipe, "output_dir": str(tmp_path / name)}))
    one_metrics = stage.main(["--config", str(tmp_path / "one.yaml")])
    # The same samples (sampling is rank 0's alone); the scores are computed again, split over ranks.
    (tmp_path / "two").mkdir()
    for name in ("samples.jsonl", "samples.settings.json"):
        shutil.copy(tmp_path / "one" / name, tmp_path / "two" / name)
    run([*TORCHRUN, "-m", "pipelines.bon", "--config", str(tmp_path / "two.yaml")])

    one, two = ([json.loads(line) for line in (tmp_path / n / "scores.jsonl").read_text().splitlines()]
                for n in ("one", "two"))
    assert len(one) == len(two) == 3 * 5 * 8
    key = ("scorer", "prompt_index", "sample_index")
    assert [tuple(r[k] for k in key) for r in two] == [tuple(r[k] for k in key) for r in one]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(one, two)) <= 1e-5
    assert len({r["score"] for r in two if r["scorer"] == "aplot"}) > 10  # real, distinct rewards
    two_metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one_metrics["processes"] == 1 and two_metrics["processes"] == 2
    for proxy, by_n in json.loads(json.dumps(one_metrics["gold_at_n"])).items():
        assert two_metrics["gold_at_n"][proxy] == pytest.approx(by_n, abs=1e-5)
