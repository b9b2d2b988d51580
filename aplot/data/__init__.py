"""Preference data: the one loader every stage uses, returning (prompt, chosen, rejected[, ...]) pairs
with a count of every row read, kept and dropped (by reason)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from datasets import Dataset, load_dataset

from aplot.data.formats import as_pairs, to_preference
from aplot.errors import UserError

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_train(data_cfg) -> tuple[Dataset, dict]:
    """The training pairs of a recipe, cut to `max_train_pairs` when set."""
    source = {"path": data_cfg.dataset_name, "config": data_cfg.dataset_config, "split": data_cfg.dataset_train_split,
              "format": data_cfg.dataset_format, "columns": data_cfg.dataset_columns}
    pairs, counts = load_source(source, data_cfg, train=True)
    pairs = as_pairs(pairs)  # response_lists rows train as every chosen x rejected pair
    if data_cfg.max_train_pairs is not None and len(pairs) > data_cfg.max_train_pairs:
        counts["beyond_max_train_pairs"] = len(pairs) - data_cfg.max_train_pairs
        pairs = pairs.select(range(data_cfg.max_train_pairs))
    return pairs, counts


def load_eval_sets(data_cfg) -> dict[str, tuple[Dataset, dict]]:
    return {name: load_source(source, data_cfg) for name, source in data_cfg.eval_sources().items()}


def load_source(source: dict, data_cfg, train: bool = False) -> tuple[Dataset, dict]:
    """One split of one dataset as preference pairs, and the counts of what happened to its rows."""
    if source["path"] == "embedded":
        pairs = embedded_split(data_cfg, source["split"], train, source["format"])
        return pairs, {"rows_read": len(pairs), "kept": len(pairs), "dropped": {}, "pairs": len(pairs)}
    if source["path"] == "spoken":
        from aplot.data.spoken import spoken_split

        return spoken_split(data_cfg, source["split"], train, source["format"])
    raw, label = load_raw(source["path"], source.get("config"), source["split"])
    return to_preference(raw, source["format"], source=label, columns=source.get("columns"),
                         strict=data_cfg.strict)


def embedded_split(data_cfg, split: str, train: bool = False, layout: str = "explicit") -> Dataset:
    """A split of the embedded world: prompt and response strings (`explicit`), or TRL's message lists
    (`conversational`), which a tokenizer renders through its chat template."""
    from aplot.data import world

    if split not in world.SPLITS:
        raise UserError(f"the embedded world has no split {split!r}; it has {', '.join(world.SPLITS)}")
    check_embedded_layout(layout)
    rows = world.generate_split(split, data_cfg.n_train if train else data_cfg.n_eval, data_cfg.world_seed,
                                data_cfg.hard_fraction, data_cfg.label_noise if train else 0.0)
    return Dataset.from_list([world.as_chat(r) for r in rows] if layout == "conversational" else rows)


def check_embedded_layout(layout: str) -> None:
    if layout not in ("explicit", "conversational"):
        raise UserError(f"the embedded world comes as explicit or conversational pairs, not {layout!r}")


def load_raw(name: str, config: str | None, split: str) -> tuple[Dataset, str]:
    """Rows of a local file (the whole file, whatever the split), a local dataset directory or a hub
    dataset; the label names it in messages."""
    path = Path(name).expanduser()
    suffix = path.suffix.lower()  # prefs.JSONL is a JSON lines file too
    if path.is_dir():
        label, args, kwargs = f"{name}[{split}]", (str(path), config), {"split": split}
    elif suffix in FILE_FORMATS:
        if not path.exists():
            raise UserError(f"dataset file does not exist: {name}")
        if not path.is_file():
            raise UserError(f"{name}: not a regular file")
        if path.stat().st_size == 0:
            raise UserError(f"{name}: the file is empty")
        if suffix != ".parquet":
            try:
                check_text_file(path, name)
            except OSError as err:
                raise UserError(f"{name}: cannot be read ({err.strerror})") from None
        label, args = name, (FILE_FORMATS[suffix],)
        kwargs = {"data_files": str(path), "split": "train"}
    elif path.is_file():
        raise UserError(f"{name}: a file of a kind this loader does not read; name a "
                        f"{', '.join(sorted(FILE_FORMATS))} file or a dataset directory")
    elif name.startswith((".", "/", "~")) or path.suffix:
        raise UserError(f"dataset path does not exist: {name}")
    else:
        label, args, kwargs = f"{name}[{split}]", (name, config), {"split": split}
    try:
        return load_dataset(*args, **kwargs), label
    except Exception as err:  # datasets raises many types; the user needs the name and the first line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{label}: could not be loaded ({reason})") from None


def check_text_file(path: Path, name: str) -> None:
    """Read a local JSON lines, JSON or CSV file once before `datasets` does, so a broken one fails in
    one line naming the line at fault (datasets says only "An error occurred while generating the
    dataset", and a byte that is not UTF-8 surfaces only when the row is read, mid-run)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{name}: line {number} is not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                f"{err.start + 1})") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _check_csv(path, name)
    text_start = path.read_bytes()[:4096].lstrip()
    if suffix == ".json" and text_start.startswith(b"["):  # one JSON document, a list of rows
        text = path.read_text(encoding="utf-8")
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            if err.pos >= len(text.rstrip()):
                raise UserError(f"{name}: ends in the middle of the JSON document at line {err.lineno}: "
                                "the file looks truncated") from None
            raise UserError(f"{name}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
        if not rows:
            raise UserError(f"{name}: no rows (an empty list)")
        return None
    rows = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if number == 1 and suffix == ".json":
                    return None  # one JSON document over several lines: datasets reads or names it
                if not raw.endswith(b"\n"):
                    raise UserError(f"{name}: line {number} ends mid-row: the file looks truncated") from None
                raise UserError(f"{name}: line {number} is not valid JSON (column {err.colno}: {err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{name}: line {number} is not a JSON object ({{\"column\": value, ...}}), "
                                f"got a {type(row).__name__}")
            rows += 1
    if not rows:
        raise UserError(f"{name}: no rows (only blank lines)")
    return None


def _check_csv(path: Path, name: str) -> None:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, None)
            if not header:
                raise UserError(f"{name}: no header line")
            rows = 0
            for row in reader:
                if row and len(row) != len(header):
                    raise UserError(f"{name}: line {reader.line_num} has {len(row)} fields, the header has "
                                    f"{len(header)}")
                rows += bool(row)
        except csv.Error as err:
            if "end of data" in str(err):
                raise UserError(f"{name}: line {reader.line_num} ends inside a quoted field: the file looks "
                                "truncated") from None
            raise UserError(f"{name}: line {reader.line_num} is not valid CSV ({err})") from None
    if not rows:
        raise UserError(f"{name}: no rows below the header")


def load_prompts(path: str, split: str, n: int, fmt: str = "explicit", config: str | None = None,
                 columns: dict | None = None, world_seed: int = 0) -> list:
    """The first `n` distinct prompts of a split, in dataset order: strings, or message lists for
    conversational data. Used by the Best-of-N and PPO stages."""
    if path == "embedded":
        from aplot.data.world import as_chat, generate_split

        check_embedded_layout(fmt)
        prompts = list(dict.fromkeys(r["prompt"] for r in generate_split(split, 4 * n, world_seed)))
        if fmt == "conversational":
            prompts = [as_chat({"prompt": p, "chosen": "", "rejected": ""})["prompt"] for p in prompts]
    elif path == "spoken":  # the requests alone: they depend on the seed only, not on any policy's samples
        from aplot.data.spoken import chat_prompt, first_requests

        check_embedded_layout(fmt)
        prompts = first_requests(split, world_seed, n)
        if fmt == "conversational":
            prompts = [chat_prompt(p) for p in prompts]
    else:
        from aplot.config import DataConfig

        source = {"path": path, "config": config, "split": split, "format": fmt, "columns": columns}
        pairs, _ = load_source(source, DataConfig())
        seen, prompts = set(), []
        for p in pairs["prompt"] if "prompt" in pairs.column_names else []:
            if p and repr(p) not in seen:  # explicit rows without a prompt column get empty ones
                seen.add(repr(p))
                prompts.append(p)
        if not prompts:
            raise UserError(f"{path}: no prompts to sample responses for (no prompt column, or only empty "
                            "prompts); name the column with prompt_columns: {prompt: <column>}")
    if len(prompts) < n:
        raise UserError(f"{path}: only {len(prompts)} distinct prompts in split {split!r}, {n} asked for")
    return prompts[:n]
