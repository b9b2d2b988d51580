"""Output directories: one run at a time in each, results replaced only by a finished run's, and only
a run's own files touched; every file written atomically and a model published weights-last, so a
killed run resumes from its newest complete checkpoint.

Every stage (rm, eval, bon, ppo) and the lineage build goes through here:

- `lock(out)`: one run per directory. An advisory `flock` on `out/.aplot.lock`, which names the holder's
  pid and command for the refusal; the kernel drops it when the holder dies, so a killed run's lock is
  free by construction and the next run takes it over. Under a launcher the main process holds it and
  every rank fails alike.
- `RunPlan`: the checks before anything is touched (the directory is the stage's own or empty, it is
  not and does not hold an input model, a resumed checkpoint has the same settings), then a run that
  works aside in `out/.aplot-run/` (its checkpoints too, where the next run of the same command resumes
  them) and `publish()`, which swaps the finished run's files in at the end. Whatever fails before,
  the earlier run's files in `out` stay byte-identical.
- `out/.aplot.json` marks a directory aplot made: the stage and the files its run published (the
  files of earlier aplot runs without it, `run_settings.json`, `lineage.json`, ..., count as aplot's).

A stage may be SIGKILLed at any moment. What a rerun can then find, and what happens to it:

- `.NAME.XXXX.tmp` files and `.model.tmp/` staging directories (a write cut short): removed;
- `checkpoint-N/` without a readable `trainer_state.json` (Trainer writes it last; a run killed while
  saving): removed, and the newest complete checkpoint is resumed;
- `.aplot-run/` holding its manifest (a run killed while publishing): the publish is finished first;
- a model directory: its weight file appears last (`publish_model`), so weights mean the tokenizer and
  config beside them are complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from aplot.errors import UserError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# The files whose presence says "a finished model is here" (see aplot.reward_model.has_weights); they
# are moved into place last.
WEIGHT_MARKERS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json", "adapter_model.safetensors")
STAGING = ".model.tmp"
LOCK = ".aplot.lock"
OWNER = ".aplot.json"  # {"stage": ..., "files": [...]}: who made the directory and which files are its
WORK = ".aplot-run"  # the run in progress; not `.tmp`: discard_partial must never take its checkpoints
RUN_SETTINGS = "run_settings.json"
STAGES = {"rm": "a reward model (make rm)", "eval": "an evaluation (make eval)", "bon": "a Best-of-N run (make bon)",
          "ppo": "a PPO policy (make ppo)", "rloo": "an RLOO policy (make rloo)", "lineage": "a lineage artefact"}


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


# ---- one run per directory ---------------------------------------------------------------------------

_held: dict[str, int] = {}  # directories whose lock this process holds, and how often it took each


def _command() -> str:
    try:  # the command as typed (python -m pipelines.rm ...), not sys.argv's script path
        words = [a.decode(errors="replace") for a in Path("/proc/self/cmdline").read_bytes().split(b"\0")]
    except OSError:
        words = [sys.executable, *sys.argv]
    return " ".join(" ".join(words).split())[:500]  # one line in the refusal, however it was typed


def _holder(fd) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 65536) or b"{}")
    except ValueError:
        return {}


def _acquire(out: Path) -> tuple[int, list[Path]]:
    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = (f"pid {holder['pid']}: {holder.get('command', '?')}" if "pid" in holder
                   else "a process that is just starting")
            raise UserError(f"{out}: another run is writing there ({who}); wait for it to end, "
                            "or use another output_dir") from None
        try:  # a holder that released it in between removed the file: lock the new one instead
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    stale = _holder(fd)
    if "pid" in stale:
        print(f"{out}: taking over the lock of pid {stale['pid']} ({stale.get('command', '?')}), "
              "which ended without releasing it")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps({"pid": os.getpid(), "command": _command()}).encode())
    os.fsync(fd)
    return fd, created


def _agree(error: str | None) -> str | None:
    """The main process's verdict on every rank, so that all fail alike (a no-op without a launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return error


def _is_main() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0  # launched, no process group yet: the launcher's rank


@contextlib.contextmanager
def lock(out):
    """Hold `out` for this run: a second run into it fails in one line naming this one's pid and
    command. Re-entrant within a process; a publish a killed run left half-done is finished first.
    Call it on every rank: the main process holds the lock, the others fail with it."""
    out = Path(out).absolute()
    key = os.path.realpath(out)
    if key in _held or not _is_main():
        fd, created, error = None, [], None
    else:
        check_output_dir(out)
        try:
            fd, created = _acquire(out)
            error = None
        except UserError as err:
            fd, created, error = None, [], str(err)
    error = _agree(error)
    if error:
        raise UserError(error)
    if fd is not None:
        _held[key] = fd
        try:
            if (out / WORK / OWNER).exists():
                print(f"{out}: finishing the publish of a run killed while its files were moved in")
                finish_publish(out)
        except BaseException:
            _release(key, out, created)
            raise
    try:
        yield out
    finally:
        if fd is not None:
            _release(key, out, created)


def _release(key, out: Path, created: list[Path]) -> None:
    fd = _held.pop(key)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / LOCK)  # before unlocking: a run waiting on this file retries on a new one
    os.close(fd)
    for path in created:  # a run that failed before writing anything leaves no directory behind
        with contextlib.suppress(OSError):
            path.rmdir()


# ---- whose directory it is -------------------------------------------------------------------------

def made_by(out) -> str | None:
    """The stage whose run made `out` (its `.aplot.json`, or the files of an earlier aplot run), or None."""
    out = Path(out)

    def read(name):
        try:
            return json.loads((out / name).read_text())
        except (OSError, ValueError):
            return None

    owner = read(OWNER)
    if isinstance(owner, dict) and owner.get("stage") in STAGES:
        return owner["stage"]
    settings = read(RUN_SETTINGS)
    if isinstance(settings, dict):
        return "ppo" if "sft_model_path" in settings else "lineage" if "stage" in settings else "rm"
    if (out / "lineage.json").is_file():
        return "lineage"
    if (out / "samples.settings.json").is_file() or (out / "scores.settings.json").is_file():
        return "bon"
    metrics = read("metrics.json")
    if isinstance(metrics, dict) and {"models", "reward_models"} <= set(metrics):
        return "eval"
    return None


def _entries(out: Path) -> list[str]:
    """What `out` holds besides aplot's own bookkeeping and half-written leftovers."""
    if not out.is_dir():
        return []
    return sorted(n for n in os.listdir(out)
                  if n not in (LOCK, OWNER, WORK) and not (n.startswith(".") and n.endswith(".tmp")))


def check_claim(out, stage: str, inputs: dict | None = None, overwrite: bool = False) -> str | None:
    """Refuse, in one line, an `out` that is or holds one of the run's `inputs` (key -> path), that
    another stage made, or that holds files no aplot run made (unless `overwrite`). Returns the stage
    that made `out` (`stage`, or None for a new, empty or overwritten directory). Reads only."""
    out = Path(out)
    check_output_dir(out)
    real = out.resolve()
    for key, paths in (inputs or {}).items():
        for path in [paths] if isinstance(paths, str) else paths or ():
            if not path or not Path(path).exists():
                continue  # a hub id, or a path the stage itself refuses
            resolved = Path(path).resolve()
            if resolved == real:
                raise UserError(f"output_dir {out} is {key}: the run would overwrite its own input; "
                                "use another output_dir")
            if real in resolved.parents:
                raise UserError(f"output_dir {out} holds {key} ({path}): the run would replace its own input; "
                                "use another output_dir")
    maker = made_by(out)
    if maker is not None and maker != stage:
        raise UserError(f"output_dir {out} holds {STAGES[maker]}: {STAGES[stage]} would overwrite its files; "
                        "use another output_dir")
    names = _entries(out)
    if maker is None and names and not overwrite:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(f"output_dir {out} is not empty ({shown}) and no aplot run made it; use another "
                        "output_dir, or set overwrite_output_dir: true to write there (files of the same "
                        "names are replaced, the others kept)")
    return maker


# ---- checkpoints -----------------------------------------------------------------------------------

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


def _weights_last(names) -> list[str]:
    return sorted(names, key=lambda n: (n == OWNER, n in WEIGHT_MARKERS, n.endswith(".index.json"), n))


def _move_into(staging: Path, out: Path, names) -> None:
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)


def publish_model(staging, out) -> None:
    """Move a model saved into `staging` into `out`, the weight files last: a kill part-way leaves
    no weights (the model is not there) or complete ones (everything else already is)."""
    staging, out = Path(staging), Path(out)
    _move_into(staging, out, _weights_last(os.listdir(staging)))
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


# ---- a run: where it starts, where it works, how it is published ------------------------------------

def finish_publish(out) -> None:
    """Finish the publish of a run killed while its files were being swapped into `out` (its manifest
    in `.aplot-run/` says the run was complete); nothing when there is none."""
    out = Path(out)
    work, manifest = out / WORK, out / WORK / OWNER
    try:
        record = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return
    for name in sorted(set(record.get("replaces", ())) - set(record["files"])):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    _move_into(work, out, _weights_last(os.listdir(work)))  # .aplot.json last: the swap is then done
    work.rmdir()


class RunPlan:
    """Where a run in `out` starts, a fresh start or the newest complete checkpoint, and where it works.

    Decided before any work and read-only, so a refusal leaves `out` untouched: `out` must be the
    stage's own (or new, empty, or `overwrite`), neither be nor hold an input model (`inputs`: key ->
    path), and resuming a checkpoint made with other `settings` (JSON-able, recorded in
    `run_settings.json`; None: a stage without any) is refused. `prepare()`, right before the work,
    readies `work` (`out/.aplot-run/`), where the run writes everything (its checkpoints too: the
    next run of the same command resumes them there); `publish()` swaps the finished run's files into
    `out`, replacing the earlier run's own files and no others.
    """

    def __init__(self, out, resume: bool, settings: dict | None, checkpoint: str | None = None, results=(),
                 marker: str = "trainer_state.json", stage: str = "rm", inputs: dict | None = None,
                 overwrite: bool = False):
        self.out, self.resume, self.results, self.stage = Path(out), resume, tuple(results), stage
        self.work = self.out / WORK
        self.settings = None if settings is None else json.loads(json.dumps(settings, default=str))
        self.maker = check_claim(self.out, stage, inputs, overwrite)
        ours = self.maker == stage  # an overwritten directory's checkpoints are not ours to resume
        staged, self.incomplete = checkpoints(self.work, marker)
        published = checkpoints(self.out, marker)[0] if ours else []
        if checkpoint:  # an explicit `resume_from_checkpoint`
            path = Path(checkpoint)
            if not is_complete_checkpoint(path, marker):
                raise UserError(f"resume_from_checkpoint: not a complete checkpoint: {checkpoint}")
            self.checkpoint = path
        else:
            self.checkpoint = (staged or published or [None])[-1] if resume else None
        # Resumed from the published run: its checkpoints are this run's history, kept at the publish.
        self.kept = [p.name for p in published] if self.checkpoint in published else []
        recorded_path = (self.work if self.checkpoint in staged else self.out) / RUN_SETTINGS
        if self.checkpoint is not None and not checkpoint and recorded_path.exists():
            try:
                recorded = json.loads(recorded_path.read_text())
            except ValueError:
                recorded = None  # unreadable: written by nothing of ours; the checkpoint decides
            if isinstance(recorded, dict) and recorded != self.settings:
                changed = sorted(k for k in set(recorded) | set(self.settings or {})
                                 if recorded.get(k) != (self.settings or {}).get(k))
                raise UserError(f"{self.out}: {self.checkpoint.name} was trained with other settings "
                                f"({', '.join(changed)}); rerun the same recipe, set resume: false to start "
                                "over, or use another output_dir")

    def prepare(self) -> Path:
        """Ready `work` for this run (call on the main process, under `lock(out)`, before the work)."""
        discard_partial(self.out)
        if self.work.exists() and (self.checkpoint is None or self.checkpoint.parent != self.work):
            complete = checkpoints(self.work)[0]
            if complete:
                why = "resume is off" if not self.resume else "not resumed"
                print(f"{why}: discarding the unfinished run's {', '.join(p.name for p in complete)} from {self.work}")
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        discard_partial(self.work)
        for path in self.incomplete:
            if path.exists():
                print(f"discarding {path.name}: incomplete (the run was killed while saving it)")
                shutil.rmtree(path)
        if self.maker is None and not (self.out / OWNER).exists():
            write_json(self.out / OWNER, {"stage": self.stage, "files": []})  # a new directory: say whose
        if self.checkpoint is None or self.checkpoint.parent != self.work:
            if self.settings is not None:
                write_json(self.work / RUN_SETTINGS, self.settings)
        if self.checkpoint is not None:
            print(f"resuming from {self.checkpoint}")
        elif self.settings is not None and self.maker == self.stage and _entries(self.out):
            print(f"starting over in {self.work}: the earlier run in {self.out} is replaced only once this one "
                  "has finished")
        return self.work

    def publish(self, keep=()) -> None:
        """Swap the finished run in `work` into `out` (main process): the earlier run's own files that
        this run does not write again are removed, the user's are never touched, the weights come
        last. `keep`: files this run wrote into `out` itself (caches), which stay."""
        files = sorted({*os.listdir(self.work), *keep, *self.kept} - {OWNER})
        write_json(self.work / OWNER, {"stage": self.stage, "files": files, "replaces": self._earlier_files()})
        finish_publish(self.out)  # from here on a killed publish is finished by the next run's lock

    def _earlier_files(self) -> list[str]:
        """The files of the run `out` holds now: its manifest's, or for a run from before manifests
        (or a directory only `overwrite` let in: none) the names such a run writes."""
        try:
            return list(json.loads((self.out / OWNER).read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if self.maker != self.stage:
            return []
        names = {RUN_SETTINGS, *self.results, *WEIGHT_MARKERS}
        return sorted(n for n in _entries(self.out) if n in names or checkpoint_step(self.out / n) is not None)
