"""Shared test set-up: run from the repository root, offline, with a tiny-run recipe helper."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    return ROOT


def tiny_rm_argv(output_dir, *extra):
    """A few steps of `make rm` on a small slice of the embedded world."""
    return ["--config", "recipes/rm/embedded.yaml", "--output_dir", str(output_dir),
            "--n_train", "48", "--n_eval", "40", "--curve_eval_pairs", "16", "--max_steps", "3",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
            "--logging_steps", "1", "--eval_steps", "3", "--save_strategy", "no",
            "--disable_tqdm", "true", *extra]


@pytest.fixture(scope="session")
def embedded_rms(tmp_path_factory):
    """Two tiny reward models trained for a few steps (bt and aplot) and a small policy, shared by the
    Best-of-N and PPO tests."""
    from aplot.policy import ensure_embedded_policy
    from pipelines import rm

    root = tmp_path_factory.mktemp("stages")
    paths = []
    for loss_type in ("bt", "aplot"):
        rm.main(tiny_rm_argv(root / loss_type, "--loss_type", loss_type, "--eval_strategy", "no"))
        paths.append(str(root / loss_type))
    policy = ensure_embedded_policy(str(root / "policy"), n_examples=512, batch_size=32)
    return paths, policy
