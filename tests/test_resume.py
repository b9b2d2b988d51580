"""Crash safety: every stage killed with SIGKILL mid-run reruns to the result of an uninterrupted run,
outputs are written atomically, and partial leftovers are discarded on rerun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from aplot import outputs
from aplot.errors import UserError

pytestmark = pytest.mark.core

# Two shared cores: torch's default threads oversubscribe them and make a step ~30x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# A resumed run restores the RNG states and skips the batches it had seen, so it repeats the
# uninterrupted run; measured here with one thread: identical losses and metrics. Threaded kernels on
# other CPUs may differ in float rounding, hence the stated tolerances: per logged training loss, and
# per eval accuracy.
LOSS_TOL, ACCURACY_TOL = 2e-3, 0.05


def rm_argv(out, *extra):
    return ["--config", "recipes/rm/embedded.yaml", "--output_dir", str(out), "--init_from", "scratch",
            "--lineage_dir", os.path.join(os.path.dirname(str(out)), "lineage"), "--n_train", "480", "--n_eval", "64",
            "--max_steps", "60", "--save_steps", "20", "--warmup_steps", "10", "--logging_steps", "5",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64", "--eval_strategy", "no",
            "--disable_tqdm", "true", *extra]


def run_rm(out, *extra):
    done = subprocess.run([sys.executable, "-m", "pipelines.rm", *rm_argv(out, *extra)], capture_output=True,
                          text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def kill_when(cmd, ready, timeout=240):
    """Start `cmd`, SIGKILL its process group as soon as `ready()` holds; fail if it finished first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=ENV)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the stage ended before the kill: the test proves nothing"


def train_losses(out):
    return {r["step"]: r["loss"] for r in json.loads((out / "log_history.json").read_text()) if "loss" in r}


@pytest.mark.slow
def test_killed_rm_resumes_from_its_last_checkpoint_to_the_uninterrupted_result(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    work = killed / outputs.WORK  # where a run works until it publishes, its checkpoints too
    run_rm(whole)

    kill_when([sys.executable, "-m", "pipelines.rm", *rm_argv(killed)],
              lambda: outputs.is_complete_checkpoint(work / "checkpoint-20"))
    complete, _ = outputs.checkpoints(work)
    assert complete and not (killed / "metrics.json").exists() and not (killed / "model.safetensors").exists()
    last = complete[-1]
    last_step = outputs.checkpoint_step(last)
    # What a kill at another moment leaves: a checkpoint half saved, a file half written.
    partial = work / f"checkpoint-{last_step + 20}"
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(last, partial)
    (partial / "trainer_state.json").unlink()
    (partial / "model.safetensors").write_bytes((last / "model.safetensors").read_bytes()[:1000])
    (killed / ".metrics.json.abc123.tmp").write_text('{"eval": {"test_id": {"accu')

    log = run_rm(killed)
    assert f"resuming from {last}" in log
    # Continued, not restarted: this process trained (and printed the losses of) the remaining steps only.
    printed = [line for line in log.splitlines() if line.startswith("{'loss'")]
    assert len(printed) == (60 - last_step) // 5
    assert f"discarding {partial.name}: incomplete" in log and ".metrics.json.abc123.tmp" in log
    assert not list(killed.glob(".*.tmp")) and not work.exists()  # published: the run's files are in killed/
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["train_steps"] == 60
    # The run's log holds each step once: the checkpoint's steps, then the new ones.
    resumed, uninterrupted = train_losses(killed), train_losses(whole)
    assert list(resumed) == list(range(5, 65, 5)) == list(uninterrupted)
    assert all(abs(resumed[s] - uninterrupted[s]) <= LOSS_TOL for s in resumed), (resumed, uninterrupted)
    reference = json.loads((whole / "metrics.json").read_text())
    for split in ("test_id", "test_ood"):
        assert abs(metrics["eval"][split]["accuracy"] - reference["eval"][split]["accuracy"]) <= ACCURACY_TOL
    # The saved model is whole: safetensors weights beside their tokenizer, nothing pickled.
    assert (killed / "model.safetensors").exists() and (killed / "tokenizer.json").exists()
    assert not list(killed.rglob("*.bin")) or {p.name for p in killed.rglob("*.bin")} == {"training_args.bin"}


def test_resuming_with_other_settings_is_refused_before_any_work(tmp_path):
    from pipelines import rm

    out = tmp_path / "out"
    fake_checkpoint(out / "checkpoint-20")
    outputs.write_json(out / "run_settings.json", {"gamma": 0.1})
    before = snapshot(out)
    with pytest.raises(UserError) as err:
        rm.main(rm_argv(out, "--gamma", "0.3"))
    message = str(err.value)
    assert message.startswith(f"{out}: checkpoint-20 was trained with other settings (") and "gamma" in message
    assert message.endswith("rerun the same recipe, set resume: false to start over, or use another output_dir")
    assert snapshot(out) == before


def fake_checkpoint(path, complete=True):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        (path / "trainer_state.json").write_text('{"global_step": 1}')


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_start_over_replaces_the_earlier_run_at_the_publish_and_resume_picks_the_newest_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    for step, complete in ((10, True), (20, True), (30, False)):
        fake_checkpoint(out / f"checkpoint-{step}", complete)
    (out / "run_settings.json").write_text('{"a": 1}')  # an earlier run's, from before the .aplot.json marker
    (out / "metrics.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"old")
    (out / "notes.txt").write_text("the user's own file")
    (out / ".log_history.json.x.tmp").write_text("[")

    plan = outputs.RunPlan(out, resume=True, settings={"a": 1})
    assert plan.checkpoint == out / "checkpoint-20"

    fresh = outputs.RunPlan(out, resume=False, settings={"a": 2}, results=("metrics.json",))
    assert fresh.checkpoint is None
    before = snapshot(out)
    work = fresh.prepare()
    # Starting over works aside: the earlier run stays whole (a half-written leftover aside) until the publish.
    assert snapshot(out) == {k: v for k, v in before.items() if not k.endswith(".tmp")} | snapshot_of(out, work)
    assert "starting over in" in capsys.readouterr().out
    (work / "metrics.json").write_text('{"new": 1}')
    fresh.publish()
    assert sorted(p.name for p in out.iterdir()) == [outputs.OWNER, "metrics.json", "notes.txt", "run_settings.json"]
    assert json.loads((out / "run_settings.json").read_text()) == {"a": 2}


def snapshot_of(root, sub):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in [sub, *sorted(sub.rglob("*"))]}


def test_a_model_is_published_weights_last(tmp_path, monkeypatch):
    staging, out = tmp_path / "out" / outputs.STAGING, tmp_path / "out"
    staging.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "training_args.bin"):
        (staging / name).write_text(name)
    moved, replace = [], os.replace
    monkeypatch.setattr(outputs.os, "replace", lambda a, b: (moved.append(os.path.basename(b)), replace(a, b)))
    outputs.publish_model(staging, out)
    assert moved[-1] == "model.safetensors" and len(moved) == 4 and not staging.exists()


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "metrics.json"
    outputs.write_json(path, {"old": 1})

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write('{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outputs.write_atomic(path, crash)
    assert json.loads(path.read_text()) == {"old": 1} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_bon_settings_file_is_written_atomically(tmp_path, monkeypatch):
    from aplot import bon

    written = []
    real = outputs.write_atomic
    monkeypatch.setattr(outputs, "write_atomic", lambda path, write: (written.append(path.name), real(path, write)))
    bon.JsonlCache(tmp_path / "samples.jsonl", ("i",), {"seed": 0})
    assert written == ["samples.settings.json"]


@pytest.mark.slow
def test_bon_killed_while_scoring_resumes_to_the_same_table(tmp_path, embedded_rms):
    from tests.test_bon import bon_recipe

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    killed.mkdir()
    keys = {"n_prompts": 8, "n_samples": 16, "score_batch_size": 4}
    subprocess.run([sys.executable, "-m", "pipelines.bon", "--config", bon_recipe(whole, embedded_rms, **keys)],
                   check=True, capture_output=True, env=ENV)
    recipe = bon_recipe(killed, embedded_rms, **keys)
    scores = killed / "bon" / "scores.jsonl"

    def scoring_started():
        return scores.exists() and scores.stat().st_size > 0

    kill_when([sys.executable, "-m", "pipelines.bon", "--config", recipe], scoring_started)
    n_scores = 3 * 8 * 16
    written = len(scores.read_text().splitlines())
    assert 0 < written < n_scores, "the kill must land during scoring"
    assert not (killed / "bon" / "bon_table.json").exists()
    subprocess.run([sys.executable, "-m", "pipelines.bon", "--config", recipe], check=True, capture_output=True,
                   env=ENV)
    assert (killed / "bon" / "bon_table.json").read_text() == (whole / "bon" / "bon_table.json").read_text()
    assert (killed / "bon" / "bon_table.csv").read_text() == (whole / "bon" / "bon_table.csv").read_text()
    lines = scores.read_text().splitlines()
    assert len(lines) == len(set(lines)) == n_scores
