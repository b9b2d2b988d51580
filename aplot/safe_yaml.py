"""Reading a recipe or preset YAML file safely: plain YAML only, every way it can be unreadable one line.

Used by the recipe parser (`aplot.config`) and the model lineage (`preset.yaml`, `aplot.lineage`), so
neither needs the other. Beyond PyYAML's safe loader it refuses what would otherwise be lost or run away
silently: a key given twice (PyYAML keeps the last), a key that is not a string, and aliases that expand
to more values than any recipe holds (a "billion laughs" document is small but expands without end).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from aplot.errors import UserError

# A recipe holds a few hundred values; a preset fewer. Far above that, the document is not a recipe.
MAX_BYTES = 1 << 20
MAX_VALUES = 100_000
MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    def __init__(self, mark, message):
        super().__init__(message)
        self.mark, self.message = mark, message


def yaml_repr(value) -> str:
    """A value as YAML writes it (`false`, `null`), so a message shows what the file said."""
    return {True: "true", False: "false", None: "null"}.get(value, repr(value)) \
        if isinstance(value, (bool, type(None))) else repr(value)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a repeated key and a key that is not a string."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # `<<: *base`: explicit keys beside it override it, as YAML says
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                hint = " (quote it)" if isinstance(key, (bool, int, float)) or key is None else ""
                raise _Refused(key_node.start_mark, f"key {yaml_repr(key)} is not a string{hint}")
            if key in first:
                raise _Refused(key_node.start_mark, f"duplicate key {key!r} (first at line {first[key]}): "
                                                    "YAML would keep only the last value")
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _expanded_size(node, memo: dict, active: set) -> int:
    """How many values `node` stands for once every alias in it is expanded (shared nodes counted each
    time they are reached, as the loaded data would hold them)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in active:
        raise _Refused(node.start_mark, "an alias refers to the anchor it is inside of (a recursive structure)")
    active.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            size += _expanded_size(child, memo, active)
            if size > MAX_VALUES:
                break
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            size += _expanded_size(key, memo, active) + _expanded_size(value, memo, active)
            if size > MAX_VALUES:
                break
    active.discard(id(node))
    memo[id(node)] = size
    return size


def read_recipe(path: str, what: str = "recipe") -> dict:
    """The YAML mapping in `path`, read with the safe loader; every way it can be unreadable is one line."""
    if os.path.isdir(path):
        raise UserError(f"{what} is a directory, not a YAML file: {path}")
    if not os.path.exists(path):
        raise UserError(f"{what} file does not exist: {path}")
    if not os.path.isfile(path):
        raise UserError(f"{what} is not a regular file: {path}")
    if os.path.getsize(path) > MAX_BYTES:
        raise UserError(f"{path}: {os.path.getsize(path):,} bytes, more than a {what} holds "
                        f"(at most {MAX_BYTES:,})")
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8 (byte 0x{data[err.start]:02x})") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()  # the graph, aliases still shared: small even for an alias bomb
        if node is not None and _expanded_size(node, {}, set()) > MAX_VALUES:
            raise UserError(f"{path}: its aliases expand to more than {MAX_VALUES:,} values (a {what} holds a "
                            "few hundred): refused before expanding them")
        config = loader.construct_document(node) if node is not None else None
    except _Refused as err:
        raise UserError(f"{path}: line {err.mark.line + 1}, column {err.mark.column + 1}: {err.message}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a {what}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        if "constructor for the tag" in problem:  # !!python/object and friends: never executed
            tag = problem.split("tag ")[-1]
            raise UserError(f"{path}: {at}the tag {tag} is not allowed ({what}s are plain YAML, read with "
                            "a safe loader)") from None
        raise UserError(f"{path}: not valid YAML ({at}{problem})") from None
    finally:
        loader.dispose()
    if config is None:
        raise UserError(f"{path}: the {what} is empty")
    if not isinstance(config, dict):
        raise UserError(f"{path}: a {what} is a mapping of keys to values, not a {type(config).__name__}")
    return config
