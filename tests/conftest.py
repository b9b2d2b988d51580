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


def snapshot(root):
    """Every path under `root` with its bytes (None for a directory): equal snapshots before and after a
    case mean it left an earlier run's files byte-identical."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def tiny_rm_argv(output_dir, *extra):
    """A few steps of `make rm` on a small slice of the embedded world, from scratch (the preset's
    tokenizer is built beside `output_dir`; the lineage's models are not needed)."""
    return ["--config", "recipes/rm/embedded.yaml", "--output_dir", str(output_dir),
            "--init_from", "scratch", "--lineage_dir", str(Path(output_dir).parent / "lineage"),
            "--n_train", "48", "--n_eval", "40", "--curve_eval_pairs", "16", "--max_steps", "3",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
            "--logging_steps", "1", "--eval_steps", "3", "--save_strategy", "no",
            "--disable_tqdm", "true", *extra]


FAST_PRESET = """seed: 0
tokenizer: {vocab_size: 512}
base: {documents: 256, per_device_train_batch_size: 32, save_steps: 1000, logging_steps: 10}
sft: {examples: 512, per_device_train_batch_size: 32, save_steps: 1000, logging_steps: 10}
"""


def make_preset(root, name="tiny-fast", preset=FAST_PRESET, config="recipes/models/tiny-qwen2/config.json") -> str:
    """A model preset directory: the tiny-qwen2 architecture with a lineage trained in seconds."""
    import shutil

    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / config, path / "config.json")
    (path / "preset.yaml").write_text(preset)
    return str(path)


@pytest.fixture(scope="session")
def embedded_rms(tmp_path_factory):
    """Two tiny reward models trained for a few steps (bt and aplot) and a small SFT policy of the same
    preset (so the same tokenizer), shared by the Best-of-N and PPO tests."""
    from aplot.lineage import policy_path
    from pipelines import rm

    root = tmp_path_factory.mktemp("stages")
    preset = make_preset(root)
    paths = []
    for loss_type in ("bt", "aplot"):
        rm.main(tiny_rm_argv(root / loss_type, "--loss_type", loss_type, "--eval_strategy", "no",
                             "--model_name_or_path", preset))
        paths.append(str(root / loss_type))
    return paths, policy_path(preset, str(root / "lineage"))
