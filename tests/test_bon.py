"""Best-of-N: the exact estimator against brute force, the resumable caches, and the stage end to end."""

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from aplot import bon
from aplot.errors import UserError

pytestmark = pytest.mark.core


def brute_force(proxy, gold, n):
    """Average over every n-subset of each prompt's samples of (gold, proxy) at the proxy-argmax."""
    g_total = p_total = 0.0
    for p_row, g_row in zip(proxy, gold):
        subsets = list(itertools.combinations(range(len(p_row)), n))
        best = [max(s, key=lambda j: (p_row[j], -j)) for s in subsets]  # ties: the lower index wins
        g_total += sum(g_row[b] for b in best) / len(subsets)
        p_total += sum(p_row[b] for b in best) / len(subsets)
    return g_total / len(proxy), p_total / len(proxy)


@pytest.mark.parametrize("seed", range(4))
def test_estimator_equals_brute_force_enumeration(seed):
    rng = np.random.default_rng(seed)
    proxy = rng.integers(0, 4, size=(3, 8)).astype(float)  # small integers: many ties
    gold = rng.normal(size=(3, 8))
    estimate = bon.best_of_n(proxy, gold, range(1, 9))
    for n in range(1, 9):
        g, p = brute_force(proxy, gold, n)
        assert estimate[n][0] == pytest.approx(g, abs=1e-12) and estimate[n][1] == pytest.approx(p, abs=1e-12)


def test_estimator_is_monotone_in_n_for_the_proxy_and_bounded_by_the_max():
    rng = np.random.default_rng(7)
    proxy, gold = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))
    estimate = bon.best_of_n(proxy, gold, bon.powers_of_two(64))
    values = [estimate[n][1] for n in bon.powers_of_two(64)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert estimate[1][0] == pytest.approx(gold.mean()) and estimate[64][1] == pytest.approx(proxy.max(1).mean())


def test_kl_of_best_of_n():
    assert bon.kl_best_of_n(1) == 0.0
    assert bon.kl_best_of_n(64) == pytest.approx(math.log(64) - 63 / 64)
    assert bon.powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]


def test_cache_resumes_past_a_torn_line_and_never_duplicates(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = bon.JsonlCache(path, ("i",), {"a": 1})
    cache.append([{"i": 0, "v": "x"}, {"i": 1, "v": "y"}])
    cache.append([{"i": 1, "v": "again"}])  # already there: ignored
    with open(path, "a") as f:
        f.write('{"i": 2, "v": "to')  # a crash mid-write
    reopened = bon.JsonlCache(path, ("i",), {"a": 1})
    assert sorted(reopened.rows) == [(0,), (1,)] and reopened.rows[(1,)]["v"] == "y"
    reopened.append([{"i": 2, "v": "z"}])
    lines = path.read_text().splitlines()
    assert [json.loads(line)["i"] for line in lines] == [0, 1, 2]


def test_cache_refuses_other_settings(tmp_path):
    bon.JsonlCache(tmp_path / "c.jsonl", ("i",), {"temperature": 1.0}).append([{"i": 0}])
    with pytest.raises(UserError, match=r"c.jsonl: cached with other settings \(temperature\)"):
        bon.JsonlCache(tmp_path / "c.jsonl", ("i",), {"temperature": 0.7})


def bon_recipe(tmp_path, embedded_rms, **keys):
    rms, policy = embedded_rms
    recipe = {"policy_name_or_path": policy, "reward_models": rms, "gold": "embedded", "n_prompts": 6,
              "n_samples": 8, "max_new_tokens": 12, "backend": "transformers", "chunk_prompts": 2,
              "output_dir": str(tmp_path / "bon"), **keys}
    path = tmp_path / "bon.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_bon_stage_writes_table_plot_and_metrics(tmp_path, embedded_rms):
    from pipelines import bon as stage

    metrics = stage.main(["--config", bon_recipe(tmp_path, embedded_rms)])
    out = tmp_path / "bon"
    table = json.loads((out / "bon_table.json").read_text())
    assert [(r["proxy"], r["n"]) for r in table] == [(p, n) for p in ("bt", "aplot") for n in (1, 2, 4, 8)]
    assert all(r["gold_normalized"] == pytest.approx(r["gold"] - table[i - i % 4]["gold"]) for i, r in enumerate(table))
    assert (out / "bon_table.csv").read_text().splitlines()[0].startswith("proxy,n,kl,gold")
    assert (out / "bon.png").stat().st_size > 1000
    assert set(metrics["gold_at_n"]) == {"bt", "aplot"} and set(metrics["gold_at_n"]["bt"]) == {1, 4}
    assert len((out / "samples.jsonl").read_text().splitlines()) == 6 * 8
    assert len((out / "scores.jsonl").read_text().splitlines()) == 3 * 6 * 8

    again = stage.main(["--config", bon_recipe(tmp_path, embedded_rms)])  # everything cached: same table
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(metrics))


def test_same_seed_same_samples_other_seed_other_samples(tmp_path, embedded_rms):
    from pipelines import bon as stage

    def samples(name, seed):
        stage.main(["--config", bon_recipe(tmp_path / name, embedded_rms, seed=seed, n_prompts=2, n_samples=4)])
        return (tmp_path / name / "bon" / "samples.jsonl").read_text()

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    assert samples("a", 1) == samples("b", 1) != samples("c", 2)


@pytest.mark.slow
def test_killed_stage_resumes_to_the_same_table_without_duplicates(tmp_path, embedded_rms):
    uninterrupted = tmp_path / "whole"
    uninterrupted.mkdir()
    subprocess.run([sys.executable, "-m", "pipelines.bon", "--config",
                    bon_recipe(uninterrupted, embedded_rms, n_prompts=16, chunk_prompts=1)], check=True,
                   capture_output=True)

    killed = tmp_path / "killed"
    killed.mkdir()
    recipe = bon_recipe(killed, embedded_rms, n_prompts=16, chunk_prompts=1)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.bon", "--config", recipe],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    samples = killed / "bon" / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not samples.exists() or len(samples.read_text().splitlines()) < 3 * 8):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(samples.read_text().splitlines())
    assert 0 < written < 16 * 8, "the kill must land during sampling"

    subprocess.run([sys.executable, "-m", "pipelines.bon", "--config", recipe], check=True, capture_output=True)
    assert (killed / "bon" / "bon_table.json").read_text() == (uninterrupted / "bon" / "bon_table.json").read_text()
    for name in ("samples.jsonl", "scores.jsonl"):
        lines = (killed / "bon" / name).read_text().splitlines()
        assert len(lines) == len(set(lines)) == len((uninterrupted / "bon" / name).read_text().splitlines())


@pytest.mark.parametrize("recipe", ["recipes/bon/unified-feedback-qwen2.5-3b.yaml",
                                    "recipes/bon/unified-feedback-qwen2.5-7b.yaml"])
def test_real_bon_recipes_parse_and_take_their_prompts_from_the_dataset_format(recipe):
    from aplot.config import RecipeParser
    from pipelines.bon import BonConfig, load_prompts

    (cfg,) = RecipeParser((BonConfig,)).parse_recipe(["--config", recipe, "--n_prompts", "3"])
    assert cfg.policy_name_or_path.startswith("Qwen/Qwen2.5-") and cfg.backend == "vllm" and cfg.n_samples == 64
    cfg.prompt_dataset = "tests/fixtures/unified_feedback.jsonl"  # the fixture mimicking the recipe's dataset
    prompts = load_prompts(cfg)
    assert len(prompts) == 3 and all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
    assert len({json.dumps(p) for p in prompts}) == 3


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_cpu_backend_runs_the_stage_and_repeats_its_samples(tmp_path, embedded_rms):
    """The real vLLM engine (its CPU build), through the stage's command line, twice; a chunk of 8 prompts x
    32 samples holds more prompt tokens than vLLM's default step budget (its seeded requests must not be
    split over steps)."""
    outputs = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        recipe = bon_recipe(tmp_path / name, embedded_rms, backend="vllm", n_prompts=8, n_samples=32,
                            chunk_prompts=8)
        done = subprocess.run([sys.executable, "-m", "pipelines.bon", "--config", recipe],
                              capture_output=True, text=True, env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(tmp_path / name / "bon")
    rows = [json.loads(line) for line in (outputs[0] / "samples.jsonl").read_text().splitlines()]
    assert sorted((r["prompt_index"], r["sample_index"]) for r in rows) == [(i, j) for i in range(8) for j in range(32)]
    assert len({r["response"] for r in rows}) > 32  # real sampling: prompts do not share their samples
    assert (outputs[0] / "samples.jsonl").read_text() == (outputs[1] / "samples.jsonl").read_text()
    assert json.loads((outputs[0] / "metrics.json").read_text())["backend"] == "vllm"
