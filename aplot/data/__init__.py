"""Preference data: the one loader every stage uses, returning (prompt, chosen, rejected[, ...]) splits."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset

from aplot.errors import UserError

REQUIRED_COLUMNS = ("chosen", "rejected")
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_preference_splits(data_cfg, splits) -> dict[str, Dataset]:
    """The requested splits of the recipe's dataset, each with `chosen`, `rejected` (and `prompt`)."""
    if data_cfg.dataset_name == "embedded":
        return {split: embedded_split(data_cfg, split) for split in splits}
    return {split: load_split(data_cfg.dataset_name, data_cfg.dataset_config, split) for split in splits}


def embedded_split(data_cfg, split: str) -> Dataset:
    from aplot.data import world

    if split not in world.SPLITS:
        raise UserError(f"the embedded world has no split {split!r}; it has {', '.join(world.SPLITS)}")
    train = split == "train"
    rows = world.generate_split(split, data_cfg.n_train if train else data_cfg.n_eval, data_cfg.world_seed,
                                data_cfg.hard_fraction, data_cfg.label_noise if train else 0.0)
    return Dataset.from_list(rows)


def load_split(name: str, config: str | None, split: str) -> Dataset:
    path = Path(name)
    if path.suffix in FILE_FORMATS:
        if not path.is_file():
            raise UserError(f"dataset file does not exist: {name}")
        dataset = load_dataset(FILE_FORMATS[path.suffix], data_files={split: str(path)}, split=split)
    elif path.is_dir():
        dataset = load_dataset(str(path), config, split=split)
    elif name.startswith((".", "/", "~")) or path.suffix:
        raise UserError(f"dataset path does not exist: {name}")
    else:
        dataset = load_dataset(name, config, split=split)
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise UserError(f"{name}: missing column {missing[0]!r}; columns are {', '.join(dataset.column_names)}")
    return dataset
