"""The install by stage: the core imports no stage that needs an extra, and PPO without TRL's PPOTrainer
fails in one line naming the install that brings it."""

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.core

EXTRA_MODULES = ("trl.experimental.ppo", "vllm")


def test_core_and_every_test_module_import_neither_ppo_nor_vllm():
    """`make test-latest` collects every test file on an install without either: a module-level import of
    them anywhere in the core or the tests would fail there, so it fails here too."""
    code = ("import sys, pytest\n"
            "import aplot, aplot.trainer, aplot.evaluation, aplot.rewardbench, aplot.bon, aplot.data\n"
            "import pipelines.rm, pipelines.eval, pipelines.bon\n"
            "assert pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests']) == 0\n"
            f"print(sorted(m for m in sys.modules if m.startswith({EXTRA_MODULES!r})))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_ppo_without_trls_ppo_trainer_fails_in_one_line_naming_the_install(tmp_path, monkeypatch):
    """On TRL 1.13 and later (the core install on the newest line) as it is; on the pinned line with its
    PPO module made unimportable, as Python sees a TRL without it."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    hide = "" if importlib.util.find_spec("trl.experimental.ppo") is None else \
        "sys.modules['trl.experimental.ppo'] = None\n"
    code = f"import sys\n{hide}from aplot.errors import run_pipeline\nfrom pipelines.ppo import main\n" \
        "run_pipeline(main)\n"
    out = tmp_path / "ppo"
    done = subprocess.run([sys.executable, "-c", code, "--config", "recipes/ppo/embedded.yaml",
                           "--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: PPO needs TRL's PPOTrainer, removed in trl 1.13 (this environment has trl ")
    assert line.endswith('pip install "aplot[ppo]" (trl<1.13), or make install')
    assert not out.exists()
