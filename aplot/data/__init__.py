"""Preference data: the one loader every stage uses, returning (prompt, chosen, rejected[, ...]) pairs
with a count of every row read, kept and dropped (by reason)."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset

from aplot.data.formats import to_preference
from aplot.errors import UserError

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_train(data_cfg) -> tuple[Dataset, dict]:
    """The training pairs of a recipe, cut to `max_train_pairs` when set."""
    source = {"path": data_cfg.dataset_name, "config": data_cfg.dataset_config, "split": data_cfg.dataset_train_split,
              "format": data_cfg.dataset_format, "columns": data_cfg.dataset_columns}
    pairs, counts = load_source(source, data_cfg, train=True)
    if data_cfg.max_train_pairs is not None and len(pairs) > data_cfg.max_train_pairs:
        counts["beyond_max_train_pairs"] = len(pairs) - data_cfg.max_train_pairs
        pairs = pairs.select(range(data_cfg.max_train_pairs))
    return pairs, counts


def load_eval_sets(data_cfg) -> dict[str, tuple[Dataset, dict]]:
    return {name: load_source(source, data_cfg) for name, source in data_cfg.eval_sources().items()}


def load_source(source: dict, data_cfg, train: bool = False) -> tuple[Dataset, dict]:
    """One split of one dataset as preference pairs, and the counts of what happened to its rows."""
    if source["path"] == "embedded":
        pairs = embedded_split(data_cfg, source["split"], train)
        return pairs, {"rows_read": len(pairs), "kept": len(pairs), "dropped": {}, "pairs": len(pairs)}
    raw, label = load_raw(source["path"], source.get("config"), source["split"])
    return to_preference(raw, source["format"], source=label, columns=source.get("columns"),
                         strict=data_cfg.strict)


def embedded_split(data_cfg, split: str, train: bool = False) -> Dataset:
    from aplot.data import world

    if split not in world.SPLITS:
        raise UserError(f"the embedded world has no split {split!r}; it has {', '.join(world.SPLITS)}")
    rows = world.generate_split(split, data_cfg.n_train if train else data_cfg.n_eval, data_cfg.world_seed,
                                data_cfg.hard_fraction, data_cfg.label_noise if train else 0.0)
    return Dataset.from_list(rows)


def load_raw(name: str, config: str | None, split: str) -> tuple[Dataset, str]:
    """Rows of a local file (the whole file, whatever the split), a local dataset directory or a hub
    dataset; the label names it in messages."""
    path = Path(name).expanduser()
    if path.suffix in FILE_FORMATS:
        if not path.is_file():
            raise UserError(f"dataset file does not exist: {name}")
        if path.stat().st_size == 0:
            raise UserError(f"{name}: the file is empty")
        label, args = name, (FILE_FORMATS[path.suffix],)
        kwargs = {"data_files": str(path), "split": "train"}
    elif path.is_dir():
        label, args, kwargs = f"{name}[{split}]", (str(path), config), {"split": split}
    elif name.startswith((".", "/", "~")) or path.suffix:
        raise UserError(f"dataset path does not exist: {name}")
    else:
        label, args, kwargs = f"{name}[{split}]", (name, config), {"split": split}
    try:
        return load_dataset(*args, **kwargs), label
    except Exception as err:  # datasets raises many types; the user needs the name and the first line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{label}: could not be loaded ({reason})") from None


def load_prompts(path: str, split: str, n: int, fmt: str = "explicit", config: str | None = None,
                 columns: dict | None = None, world_seed: int = 0) -> list:
    """The first `n` distinct prompts of a split, in dataset order: strings, or message lists for
    conversational data. Used by the Best-of-N and PPO stages."""
    if path == "embedded":
        from aplot.data.world import generate_split

        prompts = list(dict.fromkeys(r["prompt"] for r in generate_split(split, 4 * n, world_seed)))
    else:
        from aplot.config import DataConfig

        source = {"path": path, "config": config, "split": split, "format": fmt, "columns": columns}
        pairs, _ = load_source(source, DataConfig())
        seen, prompts = set(), []
        for p in pairs["prompt"]:
            if repr(p) not in seen:
                seen.add(repr(p))
                prompts.append(p)
    if len(prompts) < n:
        raise UserError(f"{path}: only {len(prompts)} distinct prompts in split {split!r}, {n} asked for")
    return prompts[:n]
