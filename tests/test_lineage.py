"""The model lineage: a preset becomes tokenizer -> base LM -> SFT policy, built once, reused, never
silently replaced, resumable after a kill, and the reward model starts from the SFT checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aplot import lineage
from aplot.errors import UserError
from tests.conftest import FAST_PRESET, ROOT, make_preset, tiny_rm_argv

pytestmark = pytest.mark.core


def test_each_artefact_is_built_once_and_the_same_from_the_same_preset(tmp_path):
    preset = make_preset(tmp_path)
    torch.manual_seed(1234)  # whatever ran before in the process must not matter
    sft = lineage.policy_path(preset, str(tmp_path / "a"))
    root = Path(sft).parent
    assert [p.name for p in sorted(root.iterdir())] == ["base", "sft", "tokenizer"]
    assert all((root / stage / lineage.MARKER).exists() for stage in lineage.STAGES)
    assert not list(root.glob("*/checkpoint-*"))  # a finished artefact keeps no checkpoints
    base, tuned = load_file(root / "base" / "model.safetensors"), load_file(Path(sft) / "model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)  # SFT trained the base further
    stamp = (Path(sft) / "model.safetensors").stat().st_mtime_ns
    assert lineage.policy_path(preset, str(tmp_path / "a")) == sft  # reused, not rebuilt
    assert (Path(sft) / "model.safetensors").stat().st_mtime_ns == stamp
    torch.rand(7)
    again = load_file(Path(lineage.policy_path(preset, str(tmp_path / "b"))) / "model.safetensors")
    assert all(torch.equal(tuned[k], again[k]) for k in tuned)  # Best-of-N and PPO numbers repeat


def test_an_artefact_made_with_other_settings_is_refused_not_reused(tmp_path):
    preset = make_preset(tmp_path)
    lineage.policy_path(preset, str(tmp_path / "lin"))
    (Path(preset) / "preset.yaml").write_text(FAST_PRESET.replace("examples: 512", "examples: 256"))
    sft = tmp_path / "lin" / "tiny-fast" / "sft"
    with pytest.raises(UserError, match=f"^{sft}: built from other preset settings \\(sft changed in {preset}\\); "
                                        f"remove {sft.parent} to rebuild it, or set another lineage_dir$"):
        lineage.policy_path(preset, str(tmp_path / "lin"))
    assert lineage.model_path(preset, "base", str(tmp_path / "lin"))  # the stages before it still serve


def test_bad_presets_fail_in_one_line_naming_the_file(tmp_path):
    preset = make_preset(tmp_path, preset=FAST_PRESET + "tokeniser: {}\n")
    with pytest.raises(UserError, match=f"^{preset}/preset.yaml: unknown key 'tokeniser'"):
        lineage.policy_path(preset, str(tmp_path / "lin"))
    preset = make_preset(tmp_path, "other", preset=FAST_PRESET.replace("save_steps: 1000", "save_stepz: 1000"))
    with pytest.raises(UserError, match=f"^{preset}/preset.yaml: base: .*save_stepz"):
        lineage.policy_path(preset, str(tmp_path / "lin"))
    with pytest.raises(UserError, match="^init_from 'sf' is not one of sft, base, scratch"):
        lineage.model_path(preset, "sf")


def test_reward_model_starts_from_the_sft_checkpoint_with_a_new_score_head(tmp_path):
    from pipelines import rm

    preset = make_preset(tmp_path)
    lin = str(tmp_path / "lin")
    metrics = rm.main(tiny_rm_argv(tmp_path / "rm", "--model_name_or_path", preset, "--init_from", "sft",
                                   "--lineage_dir", lin, "--eval_strategy", "no", "--learning_rate", "0"))
    sft = load_file(Path(lin) / "tiny-fast" / "sft" / "model.safetensors")
    trained = load_file(tmp_path / "rm" / "model.safetensors")
    # learning rate 0: the backbone is the SFT policy's, the score head is new
    assert all(torch.equal(trained[k], sft[k]) for k in trained if k in sft)
    assert "score.weight" in trained and "score.weight" not in sft and "lm_head.weight" not in trained
    assert metrics["train_steps"] == 3
    assert json.loads((tmp_path / "rm" / "run_settings.json").read_text())["init_from"] == "sft"


@pytest.mark.slow
def test_a_killed_build_resumes_from_its_newest_checkpoint(tmp_path):
    preset = make_preset(tmp_path, preset=FAST_PRESET.replace("documents: 256", "documents: 2048")
                         .replace("save_steps: 1000, logging_steps: 10}", "save_steps: 8, logging_steps: 10}", 1))
    base = tmp_path / "lin" / "tiny-fast" / "base"
    cmd = [sys.executable, "-m", "aplot.lineage", preset, "base", str(tmp_path / "lin")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(base.glob(".aplot-run/checkpoint-*/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (base / lineage.MARKER).exists()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and (base / lineage.MARKER).exists()
    assert done.stdout.strip().splitlines()[-1] == str(base)
