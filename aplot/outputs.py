"""Output directories that survive a crash: files written atomically, a trained model published
weights-last, partial leftovers discarded on rerun, and the checkpoint a killed training run resumes from.

A stage may be SIGKILLed at any moment. What a rerun can then find, and what happens to it:

- `.NAME.XXXX.tmp` files and `.model.tmp/` staging directories (a write cut short): removed;
- `checkpoint-N/` without a readable `trainer_state.json` (Trainer writes it last; a run killed while
  saving): removed, and the newest complete checkpoint is resumed;
- a model directory: its weight file appears last (`publish_model`), so weights mean the tokenizer and
  config beside them are complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from aplot.errors import UserError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# The files whose presence says "a finished model is here" (see aplot.reward_model.has_weights); they
# are moved into place last.
WEIGHT_MARKERS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json", "adapter_model.safetensors")
STAGING = ".model.tmp"


def write_atomic(path, write) -> None:
    """Write through a temporary file in the same directory and rename it into place, so a crash
    never leaves a half-written file where a finished one is expected."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    write_atomic(path, write)


def check_output_dir(out) -> None:
    """Fail before any work, in one line, when `out` cannot become a writable directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir is a file, not a directory: {out}")
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise UserError(f"output_dir cannot be created: {out} ({existing} is not a directory)")
    # as root os.access says yes to everything but a read-only file system: the best check there is
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output directory is not writable: {out}")


def discard_partial(out) -> list[str]:
    """Remove what a killed run left half-written in `out` (temporary files, a staging directory);
    returns their names."""
    out = Path(out)
    if not out.is_dir():
        return []
    removed = []
    for path in sorted(out.glob(".*.tmp")):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(path.name)
    if removed:
        print(f"discarded what a killed run left half-written in {out}: {', '.join(removed)}")
    return removed


def publish_model(staging, out) -> None:
    """Move a model saved into `staging` into `out`, the weight files last: a kill part-way leaves
    no weights (the model is not there) or complete ones (everything else already is)."""
    staging, out = Path(staging), Path(out)
    names = sorted(os.listdir(staging), key=lambda n: (n in WEIGHT_MARKERS, n.endswith(".index.json"), n))
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def is_complete_checkpoint(path: Path, marker: str = "trainer_state.json") -> bool:
    """Trainer writes `trainer_state.json` after the weights, optimizer and RNG states of a checkpoint;
    a stage that adds files after it names its own last file as the `marker`."""
    try:
        json.loads((path / marker).read_text())
    except (OSError, ValueError):
        return False
    return any((path / name).exists() for name in WEIGHT_MARKERS)


def checkpoints(out, marker: str = "trainer_state.json") -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) `checkpoint-N` directories of `out`, each oldest first."""
    out = Path(out)
    found = sorted((p for p in out.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step) \
        if out.is_dir() else []
    complete = [p for p in found if is_complete_checkpoint(p, marker)]
    return complete, [p for p in found if p not in complete]


RUN_SETTINGS = "run_settings.json"


class RunPlan:
    """Where a training run in `out` starts: a fresh start, or the newest complete checkpoint.

    Decided before any work (read-only, so a refusal leaves `out` untouched); `prepare()` then, right
    before training, discards partial leftovers, and on a fresh start the earlier run's checkpoints and
    results, so two runs never mix in one directory. `settings` (JSON-able) are recorded in
    `run_settings.json`; resuming a checkpoint made with other settings is refused.
    """

    def __init__(self, out, resume: bool, settings: dict, checkpoint: str | None = None, results=(),
                 marker: str = "trainer_state.json"):
        self.out, self.resume, self.results = Path(out), resume, tuple(results)
        self.settings = json.loads(json.dumps(settings, default=str))
        complete, self.incomplete = checkpoints(self.out, marker)
        if checkpoint:  # an explicit `resume_from_checkpoint`
            path = Path(checkpoint)
            if not is_complete_checkpoint(path, marker):
                raise UserError(f"resume_from_checkpoint: not a complete checkpoint: {checkpoint}")
            self.checkpoint = path
        else:
            self.checkpoint = complete[-1] if resume and complete else None
        self.stale = [p for p in complete if p != self.checkpoint] if self.checkpoint is None else []
        recorded_path = self.out / RUN_SETTINGS
        if self.checkpoint is not None and not checkpoint and recorded_path.exists():
            try:
                recorded = json.loads(recorded_path.read_text())
            except ValueError:
                recorded = None  # unreadable: written by nothing of ours; the checkpoint decides
            if isinstance(recorded, dict) and recorded != self.settings:
                changed = sorted(k for k in set(recorded) | set(self.settings)
                                 if recorded.get(k) != self.settings.get(k))
                raise UserError(f"{self.out}: {self.checkpoint.name} was trained with other settings "
                                f"({', '.join(changed)}); rerun the same recipe, set resume: false to start "
                                "over, or use another output_dir")

    def prepare(self) -> None:
        """Make `out` hold this run only (call on the main process, before training)."""
        self.out.mkdir(parents=True, exist_ok=True)
        discard_partial(self.out)
        for path in self.incomplete:
            print(f"discarding {path.name}: incomplete (the run was killed while saving it)")
            shutil.rmtree(path)
        if self.checkpoint is None:
            old = self.stale + [self.out / n for n in self.results + WEIGHT_MARKERS
                                              if (self.out / n).exists()]
            if old:
                why = "resume is off" if not self.resume else "no checkpoint to resume"
                print(f"{why}: starting over, removing the earlier run's {', '.join(p.name for p in old)} "
                      f"from {self.out}")
            for path in old:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            write_json(self.out / RUN_SETTINGS, self.settings)
        else:
            print(f"resuming from {self.checkpoint}")
