"""Output directories (issue 22): one run per directory (a second run fails in one line naming the first's
pid; a killed holder's lock is taken over), results replaced only by a finished run's (whatever fails,
late or early, the earlier run stays byte-identical), and only a run's own files (no input model, no
other stage's directory, no user's files unless overwrite_output_dir), through the stages' real entry
points: each case asserts the exit status 2 and the one `error:` line of `run_pipeline`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from aplot import outputs
from aplot.errors import UserError, run_pipeline
from tests.conftest import ROOT, make_preset, snapshot, tiny_rm_argv

pytestmark = pytest.mark.core  # run on the newest line too (make test-latest)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ROW = '{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}\n'
# A process that holds a directory's lock until it is killed, as a run would.
HOLD = "import sys, time\nfrom aplot.outputs import lock\nwith lock(sys.argv[1]):\n    print('held', flush=True)\n" \
       "    time.sleep(600)\n"


def fails(main, argv, capsys) -> str:
    """Run a stage as its command line does: exit status 2 and exactly one `error:` line, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        run_pipeline(lambda: main(argv))
    assert done.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def published(out):
    """What `out` holds besides a run in progress (`.aplot-run/`, where a failed run's work stays)."""
    return {k: v for k, v in snapshot(out).items() if not k.startswith(outputs.WORK)}


def with_recipe(tmp_path, text, argv):
    """`argv` with the embedded recipe plus `text` (keys a command line cannot give, such as an empty list)."""
    import yaml

    recipe = tmp_path / "recipe.yaml"  # keys given twice are refused: `text` replaces the recipe's own
    keys = {**yaml.safe_load(Path("recipes/rm/embedded.yaml").read_text()), **yaml.safe_load(text)}
    recipe.write_text(yaml.safe_dump(keys))
    return [str(recipe) if a == "recipes/rm/embedded.yaml" else a for a in argv]


@contextmanager
def held(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=ENV)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """Two completed tiny `make rm` runs (bt, aplot), copied by each case that needs an earlier run."""
    from pipelines import rm

    root = tmp_path_factory.mktemp("earlier")
    for loss_type in ("bt", "aplot"):
        rm.main(tiny_rm_argv(root / loss_type, "--loss_type", loss_type))
    return root


def copy_run(earlier, tmp_path, name="bt") -> Path:
    out = tmp_path / name
    shutil.copytree(earlier / name, out)
    return out


# ---- one run per directory -------------------------------------------------------------------------

@pytest.mark.slow
def test_two_rm_runs_at_once_the_second_fails_naming_the_first_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "rm"
    cmd = [sys.executable, "-m", "pipelines.rm", *tiny_rm_argv(out, "--eval_strategy", "no")]
    first = subprocess.Popen([*cmd, "--max_steps", "100000"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and first.poll() is None:
            try:
                if json.loads((out / outputs.LOCK).read_text())["pid"] == first.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
        second = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        assert errors[0].startswith(f"error: {out}: another run is writing there (pid {first.pid}: ")
        assert "-m pipelines.rm --config recipes/rm/embedded.yaml" in errors[0]
        assert errors[0].endswith("); wait for it to end, or use another output_dir")
        assert first.poll() is None  # the first run was not disturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # Killed: its lock file stays, naming it, but the kernel released the lock; the next run takes it over.
    assert json.loads((out / outputs.LOCK).read_text())["pid"] == first.pid
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{out}: taking over the lock of pid {first.pid} (" in done.stdout
    assert (out / "model.safetensors").exists() and not (out / outputs.LOCK).exists()


@pytest.mark.slow
def test_under_torchrun_every_rank_fails_alike_when_the_directory_is_held(tmp_path):
    out = tmp_path / "rm"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    with held(out) as holder:
        done = subprocess.run([*torchrun, "-m", "pipelines.rm", *tiny_rm_argv(out)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**ENV, "PYTHONPATH": str(ROOT)})
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], done.stderr[-3000:]
    assert errors[0].startswith(f"error: {out}: another run is writing there (pid {holder.pid}: ")
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("stage", ["rm", "eval", "bon", pytest.param("ppo", marks=pytest.mark.ppo)])
def test_every_stage_refuses_a_directory_another_process_holds(tmp_path, capsys, stage):
    import importlib

    out = tmp_path / "out"
    (out / "metrics.json").parent.mkdir()
    (out / "metrics.json").write_text('{"from": "the run that holds it"}\n')
    argv = tiny_rm_argv(out) if stage == "rm" else ["--config", f"recipes/{stage}/embedded.yaml", "--output_dir",
                                                    str(out)]
    with held(out) as holder:
        before = snapshot(out)
        line = fails(importlib.import_module(f"pipelines.{stage}").main, argv, capsys)
        assert line.startswith(f"error: {out}: another run is writing there (pid {holder.pid}: ")
        assert "-c import sys, time from aplot.outputs import lock with lock(sys.argv[1]): print('held'" in line
        assert snapshot(out) == before


def test_the_lineage_build_is_locked(tmp_path):
    from aplot import lineage

    preset, lin = make_preset(tmp_path), tmp_path / "lin"
    with held(lin / "tiny-fast") as holder:
        with pytest.raises(UserError, match=f"^{lin}/tiny-fast: another run is writing there \\(pid {holder.pid}: "):
            lineage.policy_path(preset, str(lin))
    assert not (lin / "tiny-fast" / "tokenizer").exists()  # nothing was built under another's lock


# ---- results replaced only by better results -------------------------------------------------------

def test_a_run_that_diverges_mid_training_leaves_the_earlier_run_byte_identical(tmp_path, earlier, capsys):
    from pipelines import rm

    out = copy_run(earlier, tmp_path)
    before = snapshot(out)
    line = fails(rm.main, tiny_rm_argv(out, "--loss_type", "bt", "--learning_rate", "1e12", "--warmup_steps", "0",
                                       "--max_steps", "20", "--resume", "false"), capsys)
    assert line.startswith("error: non-finite reward at train step ")
    assert int(line.split("step ")[1].split(":")[0]) >= 1  # it trained before it failed: late, not at the start
    assert published(out) == before


def test_an_eval_set_without_rows_is_refused_before_training(tmp_path, earlier, capsys):
    from pipelines import rm

    out = copy_run(earlier, tmp_path)
    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hi!"}\n' * 3)  # every row dropped
    argv = with_recipe(tmp_path, f"eval_datasets: [{{name: mine, path: {same}, format: explicit}}]\n",
                       tiny_rm_argv(out, "--loss_type", "bt", "--resume", "false"))
    before = snapshot(out)
    line = fails(rm.main, argv, capsys)
    assert line == "error: eval set mine: no usable pairs (3 rows read, dropped: 3 identical)"
    assert snapshot(out) == before  # not even a run in progress: the refusal came before any work


def test_starting_over_works_aside_and_swaps_in_only_the_runs_own_files(tmp_path, earlier):
    from pipelines import rm

    out = copy_run(earlier, tmp_path)
    (out / "notes.txt").write_text("the user's own file")
    old = json.loads((out / outputs.OWNER).read_text())["files"]
    rm.main(with_recipe(tmp_path, "eval_splits: []\n", tiny_rm_argv(out, "--loss_type", "aplot", "--resume", "false",
                                                                   "--eval_strategy", "no")))
    assert json.loads((out / "metrics.json").read_text())["loss_type"] == "aplot"
    # the earlier run's plot of its eval sets is gone with it (this run has none); the user's file stays
    assert "reward_distributions.png" in old and not (out / "reward_distributions.png").exists()
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert not (out / outputs.WORK).exists() and not (out / outputs.LOCK).exists()
    assert "notes.txt" not in json.loads((out / outputs.OWNER).read_text())["files"]


def test_a_start_over_killed_mid_run_resumes_from_its_work_directory_not_the_earlier_run(tmp_path):
    out = tmp_path / "out"
    for path in (out / "checkpoint-30", out / outputs.WORK / "checkpoint-10"):
        fake_checkpoint(path)
    outputs.write_json(out / "run_settings.json", {"a": 1})
    outputs.write_json(out / outputs.WORK / "run_settings.json", {"a": 2})
    fake_checkpoint(out / outputs.WORK / "checkpoint-20", complete=False)
    plan = outputs.RunPlan(out, resume=True, settings={"a": 2})
    assert plan.checkpoint == out / outputs.WORK / "checkpoint-10"
    with pytest.raises(UserError, match=f"^{out}: checkpoint-10 was trained with other settings \\(a\\)"):
        outputs.RunPlan(out, resume=True, settings={"a": 3})
    before = snapshot(out)
    plan.prepare()  # resumes: only the half-saved checkpoint goes
    assert not (out / outputs.WORK / "checkpoint-20").exists()
    assert published(out) == {k: v for k, v in before.items() if not k.startswith(outputs.WORK)}
    fresh = outputs.RunPlan(out, resume=False, settings={"a": 3})
    fresh.prepare()
    assert fresh.checkpoint is None and os.listdir(out / outputs.WORK) == ["run_settings.json"]
    assert (out / "checkpoint-30" / "trainer_state.json").exists()  # the earlier run: until the publish


def test_a_publish_killed_part_way_is_finished_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    work = out / outputs.WORK
    work.mkdir(parents=True)
    for name in ("metrics.json", "old_plot.png", "notes.txt"):
        (out / name).write_text(f"earlier {name}")
    outputs.write_json(out / outputs.OWNER, {"stage": "rm", "files": ["metrics.json", "old_plot.png"]})
    # killed after the manifest and the new metrics were moved in, before the weights
    (out / "metrics.json").write_text("new metrics.json")
    (work / "model.safetensors").write_text("new weights")
    outputs.write_json(work / outputs.OWNER, {"stage": "rm", "files": ["metrics.json", "model.safetensors"],
                                              "replaces": ["metrics.json", "old_plot.png"]})
    with outputs.lock(out):
        pass
    assert sorted(os.listdir(out)) == [outputs.OWNER, "metrics.json", "model.safetensors", "notes.txt"]
    assert (out / "model.safetensors").read_text() == "new weights"
    assert json.loads((out / outputs.OWNER).read_text())["files"] == ["metrics.json", "model.safetensors"]


# ---- only its own files ------------------------------------------------------------------------------

def test_output_dir_that_is_the_input_model_is_refused(tmp_path, earlier, capsys):
    from pipelines import rm

    out = copy_run(earlier, tmp_path)
    before = snapshot(out)
    line = fails(rm.main, tiny_rm_argv(out, "--model_name_or_path", str(out)), capsys)
    assert line == f"error: output_dir {out} is model_name_or_path: the run would overwrite its own input; " \
                   "use another output_dir"
    assert snapshot(out) == before


def test_output_dir_that_holds_the_input_model_is_refused(tmp_path, earlier, capsys):
    from pipelines import rm

    parent = tmp_path / "runs"
    model = copy_run(earlier, parent)
    before = snapshot(parent)
    line = fails(rm.main, tiny_rm_argv(parent, "--model_name_or_path", str(model), "--lineage_dir",
                                       str(tmp_path / "lineage")), capsys)
    assert line == f"error: output_dir {parent} holds model_name_or_path ({model}): the run would replace its own " \
                   "input; use another output_dir"
    assert snapshot(parent) == before


def test_a_directory_no_aplot_run_made_is_refused_and_accepted_with_overwrite_output_dir(tmp_path, capsys):
    from pipelines import rm

    out = tmp_path / "mine"
    out.mkdir()
    for name in ("README.md", "metrics.json", "model.safetensors", "notes.txt"):
        (out / name).write_text(f"the user's {name}")
    before = snapshot(out)
    line = fails(rm.main, tiny_rm_argv(out), capsys)
    assert line == f"error: output_dir {out} is not empty (README.md, metrics.json, model.safetensors, ...) and no " \
                   "aplot run made it; use another output_dir, or set overwrite_output_dir: true to write there " \
                   "(files of the same names are replaced, the others kept)"
    assert snapshot(out) == before

    rm.main(tiny_rm_argv(out, "--overwrite_output_dir", "true"))
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 3
    assert (out / "notes.txt").read_text() == "the user's notes.txt"
    # now it is an aplot run's directory: a start-over replaces that run's files, still never the user's
    rm.main(tiny_rm_argv(out, "--loss_type", "bt", "--resume", "false"))
    assert json.loads((out / "metrics.json").read_text())["loss_type"] == "bt"
    assert (out / "notes.txt").read_text() == "the user's notes.txt"


def test_an_earlier_aplot_run_without_a_marker_is_still_its_stages(tmp_path, earlier):
    from pipelines import rm

    out = copy_run(earlier, tmp_path)
    (out / outputs.OWNER).unlink()  # as runs before the marker left their directories
    assert outputs.made_by(out) == "rm"
    rm.main(tiny_rm_argv(out, "--loss_type", "aplot", "--resume", "false"))
    assert json.loads((out / outputs.OWNER).read_text())["stage"] == "rm"


def test_eval_refuses_to_write_into_a_reward_models_directory(tmp_path, earlier, capsys):
    from pipelines import eval as stage

    bt, aplot = copy_run(earlier, tmp_path, "bt"), copy_run(earlier, tmp_path, "aplot")
    before = snapshot(tmp_path)
    argv = ["--config", "recipes/eval/embedded.yaml", "--n_eval", "8", "--reward_models", str(bt)]
    assert fails(stage.main, [*argv, "--output_dir", str(bt)], capsys) == \
        f"error: output_dir {bt} is reward_models: the run would overwrite its own input; use another output_dir"
    assert fails(stage.main, [*argv, "--output_dir", str(aplot)], capsys) == \
        f"error: output_dir {aplot} holds a reward model (make rm): an evaluation (make eval) would overwrite its " \
        "files; use another output_dir"
    assert snapshot(tmp_path) == before


def test_eval_writes_only_its_own_files(tmp_path, earlier):
    from pipelines import eval as stage

    out = tmp_path / "eval"
    argv = ["--config", "recipes/eval/embedded.yaml", "--n_eval", "8", "--reward_models", str(earlier / "bt"),
            "--output_dir", str(out)]
    stage.main(argv)
    assert sorted(os.listdir(out)) == [outputs.OWNER, "metrics.json", "reward_distributions.png"]
    (out / "notes.txt").write_text("the user's own file")
    stage.main(argv)  # the same directory again: its own files replaced, nothing else
    assert sorted(os.listdir(out)) == [outputs.OWNER, "metrics.json", "notes.txt", "reward_distributions.png"]


@pytest.mark.ppo
def test_bon_and_ppo_refuse_another_stages_directory_and_their_inputs(tmp_path, earlier, capsys):
    import yaml

    from pipelines import bon, ppo

    bt, aplot = copy_run(earlier, tmp_path, "bt"), copy_run(earlier, tmp_path, "aplot")
    recipe = tmp_path / "bon.yaml"
    recipe.write_text(yaml.safe_dump({"reward_models": [str(bt)], "gold": "embedded", "n_prompts": 2, "n_samples": 2,
                                      "backend": "transformers", "output_dir": str(aplot)}))
    before = snapshot(tmp_path)
    assert fails(bon.main, ["--config", str(recipe)], capsys) == \
        f"error: output_dir {aplot} holds a reward model (make rm): a Best-of-N run (make bon) would overwrite its " \
        "files; use another output_dir"
    assert fails(ppo.main, ["--config", "recipes/ppo/embedded.yaml", "--reward_model_path", str(bt), "--output_dir",
                            str(bt)], capsys) == \
        f"error: output_dir {bt} is reward_model_path: the run would overwrite its own input; use another output_dir"
    assert snapshot(tmp_path) == before


def test_a_run_refused_before_any_work_leaves_no_new_directory(tmp_path, capsys):
    from pipelines import rm

    out = tmp_path / "new" / "rm"
    line = fails(rm.main, tiny_rm_argv(out, "--dataset_name", str(tmp_path / "nope.jsonl"), "--eval_splits", "[]"),
                 capsys)
    assert line == f"error: dataset file does not exist: {tmp_path}/nope.jsonl"
    assert not (tmp_path / "new").exists()


def fake_checkpoint(path, complete=True):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        (path / "trainer_state.json").write_text('{"global_step": 1}')
