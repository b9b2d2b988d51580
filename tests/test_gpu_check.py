"""`make gpu-check` on CPU: the Qwen2.5-shaped preset at 2 layers through rm (APLOTRewardTrainer under the
ZeRO-2 config), Best-of-N sampling and scoring, and PPO, with what it measures and no MFU on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_gpu_check_runs_the_three_stages_on_cpu(tmp_path):
    results_file = tmp_path / "results.json"
    # Its own process: the check sets up a one-rank process group for DeepSpeed.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "pipelines.gpu_check", "--out", str(tmp_path / "work"),
                           "--json", str(results_file)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(results_file.read_text())
    assert r["device"] == "cpu" and r["layers"] == 2 and r["dtype"] == "float32"
    assert r["peak_bf16_flops"] is None
    rm, bon, ppo = r["rm"], r["bon"], r["ppo"]
    assert rm["zero_stage"] == 2  # the reward models really trained under DeepSpeed's ZeRO-2
    assert rm["steps"] == 3 and rm["tokens_per_step"] == 2 * 4 * 32
    for key in ("bt_tokens_per_s", "aplot_tokens_per_s", "aplot_over_bt"):
        assert rm[key] > 0
    assert rm["aplot_over_bt"] == rm["aplot_step_s"] / rm["bt_step_s"]
    assert rm["bt_mfu"] is None and rm["bt_peak_gib"] is None  # no MFU or GPU memory on CPU
    assert bon["transformers_tokens_per_s"] > 0 and bon["score_tokens_per_s"] > 0
    assert bon["samples"] == 2 * 4 and "not run" in bon["vllm"]
    assert ppo["updates"] == 1 and ppo["episodes_per_update"] == 4 and ppo["generated_tokens_per_s"] > 0
    table = done.stdout
    assert "APLOT/BT step-time ratio" in table and "MFU: not reported (CPU)" in table
    assert (tmp_path / "work" / "ppo" / "model.safetensors").exists()  # PPO ran to the end of the real stage
