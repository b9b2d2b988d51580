"""Planning a job before the GPUs (`make plan`): a recipe resolved exactly as its stage resolves it, then the
batch and step arithmetic, every model's parameter count from its config alone, the memory per GPU (model
states from DeepSpeed's own estimators, activations and logits as stated estimates) and whether the tokenizers
the stage pairs up agree. Nothing is loaded but config and tokenizer files, and nothing is written."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aplot.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
HUB_CONFIGS = ROOT / "recipes" / "models" / "hub"
RM_RECIPES = ROOT / "recipes" / "rm"
GIB = 2**30
STAGES = ("rm", "bon", "ppo")
# vLLM's default share of GPU memory (its `gpu_memory_utilization`); VLLMSampler does not change it.
VLLM_GPU_MEMORY_UTILIZATION = 0.9
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


# --- models: shapes from config files ---------------------------------------------------------------

@dataclass
class ModelShape:
    """One model of the job, as far as its config file tells: what the recipe names, where the config
    was read, its parameter count and largest layer (DeepSpeed's notion: one module's own parameters)."""

    role: str
    name: str
    source: str
    config: object
    params: int
    largest_layer: int
    dtype: str

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def is_hub_id(name: str) -> bool:
    """A hub id (`owner/name`) rather than a local path, by the rule the stages' `check_path` uses."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith(".") and not Path(name).exists()


def config_dir(name: str) -> tuple[str, str]:
    """A directory holding the model's config.json, and where it came from: the path itself, the hub
    cache, or the copies shipped for planning under recipes/models/hub/."""
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise UserError(f"{name}: no config.json in this directory")
        return name, name
    if not is_hub_id(name):
        raise UserError(f"model path does not exist: {name}")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent), "hub cache"
    shipped = HUB_CONFIGS / name.replace("/", "--")
    if (shipped / "config.json").exists():
        return str(shipped), "recipes/models/hub"
    raise UserError(f"{name}: not in the hub cache and no copy of its config.json under recipes/models/hub/ "
                    f"(add {shipped.relative_to(ROOT)}/config.json to plan with it)")


def model_shape(role: str, name: str, head: str, dtype: str | None, *, vocab_size: int | None = None,
                trust_remote_code: bool = False, source: str | None = None) -> ModelShape:
    """The model built on the meta device from its config (no weights anywhere): `head` "score" is the
    one-output sequence classifier every reward and value model is, "lm" a causal LM (policies)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from aplot.distributed import zero3_init_disabled

    path, where = config_dir(name)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if head == "score":
        config.num_labels = 1
    if vocab_size:
        config.vocab_size = vocab_size
    cls = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    # A ZeRO-3 recipe parsed earlier in this process would make from_config partition the model.
    with zero3_init_disabled(), torch.device("meta"):
        model = cls.from_config(config, trust_remote_code=trust_remote_code)
    params = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once, as DeepSpeed counts
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelShape(role, name, source or f"config from {where}", config, params, largest,
                      weight_dtype(dtype, config, path))


def weight_dtype(requested: str | None, config, path: str) -> str:
    """The dtype the stage loads the weights in: the recipe's, else what `from_pretrained` picks for a
    checkpoint (the config's own dtype in transformers 5) or float32 for a fresh model from a config."""
    if requested not in (None, "auto"):
        return str(requested)
    from aplot.reward_model import has_weights

    fresh = Path(path).is_dir() and not has_weights(path) and not str(path).startswith(str(HUB_CONFIGS))
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return "float32" if fresh or own is None else str(own).replace("torch.", "")


# --- tokenizers --------------------------------------------------------------------------------------

@dataclass
class TokenizerFacts:
    """What decides whether two tokenizers read the same token ids and format chats alike."""

    name: str
    chat_template: str | None
    special: dict  # id -> token
    eos: str | None
    pad: str | None
    tokenizer: object = None  # the tokenizer itself when its files are here (vocabularies compared)


def tokenizer_facts(name, trust_remote_code: bool = False) -> TokenizerFacts | None:
    """A tokenizer's facts (`name`: a tokenizer already at hand, or where to read one): from its files
    (the stage's own loader), the hub cache, or the copy of its tokenizer_config.json shipped for
    planning; None when none of them has it."""
    import json

    from aplot.reward_model import TOKENIZER_FILES, load_tokenizer

    if not isinstance(name, str):
        return TokenizerFacts(getattr(name, "name_or_path", "tokenizer"), name.chat_template,
                              {i: str(t) for i, t in name.added_tokens_decoder.items()}, name.eos_token,
                              name.pad_token, name)
    local = name == "embedded" or Path(name).is_dir() and any((Path(name) / f).exists() for f in TOKENIZER_FILES)
    if not local and is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        local = isinstance(try_to_load_from_cache(name, "tokenizer.json"), str)
    if local:
        tok = load_tokenizer(name, trust_remote_code) if not is_hub_id(name) else _hub_tokenizer(name)
        return TokenizerFacts(name, tok.chat_template, {i: str(t) for i, t in tok.added_tokens_decoder.items()},
                              tok.eos_token, tok.pad_token, tok)
    shipped = HUB_CONFIGS / name.replace("/", "--") / "tokenizer_config.json"
    if not shipped.exists():
        return None
    cfg = json.loads(shipped.read_text())
    return TokenizerFacts(name, cfg.get("chat_template"),
                          {int(i): t["content"] for i, t in cfg.get("added_tokens_decoder", {}).items()},
                          cfg.get("eos_token"), cfg.get("pad_token"))


def _hub_tokenizer(name):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)  # offline: from the hub cache, where it was found


def compare_tokenizers(a: TokenizerFacts | None, b: TokenizerFacts | None, a_name: str,
                       b_name: str) -> tuple[str, bool]:
    """(what agrees or differs, whether the token ids would be read differently)."""
    missing = [n for f, n in ((a, a_name), (b, b_name)) if f is None]
    if missing:
        return f"not compared: no tokenizer files for {missing[0]} here", False
    differs = []
    if a.tokenizer is not None and b.tokenizer is not None:
        from aplot.ppo import same_tokenizer  # the check make ppo runs at start-up

        mismatch = same_tokenizer(a.tokenizer, b.tokenizer)
        if mismatch:
            differs.append(f"vocabulary ({mismatch})")
    if a.special != b.special:
        ids = sorted(set(a.special) ^ set(b.special)) or sorted(i for i in a.special if a.special[i] != b.special[i])
        differs.append(f"special tokens (id {ids[0]}: {a.special.get(ids[0])!r} against {b.special.get(ids[0])!r})")
    for what, x, y in (("eos", a.eos, b.eos), ("pad", a.pad, b.pad)):
        if x != y:
            differs.append(f"{what} {x!r} against {y!r}")
    ids_differ = bool(differs)
    if a.chat_template != b.chat_template:
        differs.append("chat template")
    if not differs:
        vocab = "vocabulary, " if a.tokenizer is not None and b.tokenizer is not None else ""
        note = "" if vocab else " (vocabularies not compared: no tokenizer.json for both here)"
        return f"agree: {vocab}special tokens and chat template{note}", False
    return "differ: " + "; ".join(differs), ids_differ


# --- memory ------------------------------------------------------------------------------------------

def zero_config(deepspeed) -> dict | None:
    """The `zero_optimization` section of a recipe's DeepSpeed config (a path or a mapping)."""
    if not deepspeed:
        return None
    import json

    if isinstance(deepspeed, dict):
        return deepspeed.get("zero_optimization", {})
    path = Path(deepspeed)
    if not path.is_file():
        raise UserError(f"deepspeed config does not exist: {deepspeed}")
    return json.loads(path.read_text()).get("zero_optimization", {})


def _offloaded(zero: dict, key: str) -> bool:
    return str((zero.get(key) or {}).get("device", "none")) in ("cpu", "nvme")


def model_states_bytes(params: int, largest_layer: int, zero: dict | None, gpus_per_node: int, nodes: int,
                       weight_bytes: int) -> tuple[int, str]:
    """Bytes per GPU for the weights, gradients and optimizer state of a trained model, and how they were
    reckoned: DeepSpeed's own estimators under ZeRO-2/3 (their numbers unchanged), else weights, gradients
    and AdamW's two moments, all in the weights' dtype."""
    stage = int((zero or {}).get("stage", 0))
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        offload_opt, offload_param = _offloaded(zero, "offload_optimizer"), _offloaded(zero, "offload_param")
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload_opt,
            cpu_offload_params=offload_param, zero_init=True)
        offload = " + ".join(k for k, on in (("optimizer", offload_opt), ("parameters", offload_param)) if on)
        return gpu, f"ZeRO-3{f', {offload} offloaded' if offload else ''} (DeepSpeed estimate)"
    if stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        offload_opt = _offloaded(zero, "offload_optimizer")
        _, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
                                                       cpu_offload=offload_opt)
        label = "ZeRO-2" if stage == 2 else "ZeRO-1 (ZeRO-2's estimate)"
        return gpu, f"{label}{', optimizer offloaded' if offload_opt else ''} (DeepSpeed estimate)"
    return 4 * weight_bytes * params, f"no DeepSpeed: weights, gradients, 2 AdamW moments in {weight_bytes}-byte values"


def activation_bytes(model: ModelShape, sequences: int, length: int, checkpointing: bool) -> int:
    """Estimate of what one training micro-batch keeps for the backward pass, in the weights' dtype.

    Per token and layer a decoder block keeps about 6h + 2kv + 4i values (norm inputs, q/k/v, the
    attention output and its projection input, the MLP's gate, up, product and down-projection input;
    memory-efficient attention, no dropout), h the hidden size, kv the key/value width, i the MLP width.
    With gradient checkpointing only each layer's input (h values) is kept, plus one layer recomputed
    at a time. Logits are counted apart (`logits_bytes`)."""
    c = model.config
    tokens = sequences * length
    kv = c.num_key_value_heads * model.head_dim if getattr(c, "num_key_value_heads", None) else c.hidden_size
    per_layer = tokens * (6 * c.hidden_size + 2 * kv + 4 * c.intermediate_size) * model.weight_bytes
    if checkpointing:
        return c.num_hidden_layers * tokens * c.hidden_size * model.weight_bytes + per_layer
    return c.num_hidden_layers * per_layer


def inference_bytes(model: ModelShape, sequences: int, length: int) -> int:
    """Estimate of a no-grad forward pass's peak beyond the weights: one layer's widest activations."""
    c = model.config
    return sequences * length * (2 * c.hidden_size + 3 * c.intermediate_size) * model.weight_bytes


def logits_bytes(model: ModelShape, sequences: int, length: int) -> int:
    """float32 logits over the vocabulary (what log-softmax over sampled tokens works on)."""
    return sequences * length * model.config.vocab_size * 4


# --- the plan ----------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What `make plan` prints: rows of arithmetic, memory items per GPU, and the problems found."""

    recipe: str
    stage: str
    processes: int
    nodes: int
    gpu_memory_gib: float
    rows: list = field(default_factory=list)  # (label, text)
    memory: list = field(default_factory=list)  # (item, bytes, how)
    models: dict = field(default_factory=dict)  # role -> ModelShape
    numbers: dict = field(default_factory=dict)  # the arithmetic, for tests and callers
    problems: list = field(default_factory=list)  # one-line messages; the first is raised after printing
    fit_limit: int | None = None  # bytes one GPU must hold at most (a share of it for vLLM)

    def row(self, label, text):
        self.rows.append((label, text))

    def need(self, item, nbytes, how):
        self.memory.append((item, int(nbytes), how))

    @property
    def total_bytes(self) -> int:
        return sum(b for _, b, _ in self.memory)

    def format(self) -> str:
        lines = [f"plan: {self.recipe} ({self.stage}), {self.processes} process{'es' * (self.processes > 1)}"
                 f" ({self.nodes} node{'s' * (self.nodes > 1)} x {self.processes // self.nodes}), "
                 f"GPUs of {self.gpu_memory_gib:g} GiB"]
        width = max(len(label) for label, _ in self.rows) if self.rows else 0
        lines += [f"  {label:<{width}}  {text}" for label, text in self.rows]
        if self.memory:
            lines.append("  memory per GPU (GiB):")
            iw = max(len(i) for i, _, _ in self.memory)
            lines += [f"    {item:<{iw}}  {b / GIB:7.2f}  {how}" for item, b, how in self.memory]
            lines.append(f"    {'total':<{iw}}  {self.total_bytes / GIB:7.2f}  of {self.gpu_memory_gib:g}")
        return "\n".join(lines)


PLAN_FLAGS = ("stage", "nproc", "nnodes", "gpu_memory_gib", "train_pairs")


def parse_plan_flags(argv: list[str]):
    """The planner's own flags, taken out of the command line; the rest goes to the stage's parser."""
    import argparse

    parser = argparse.ArgumentParser(prog="make plan", allow_abbrev=False, add_help=False)
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--gpu_memory_gib", type=float, default=80.0)
    parser.add_argument("--train_pairs", type=int, default=None,
                        help="rm: training pairs, for a data set that is not read here")
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"command line: {message}"))
    opts, rest = parser.parse_known_args(argv)
    from aplot.config import check_range

    for key in ("nproc", "nnodes"):
        check_range(key, getattr(opts, key), low=1)
    check_range("gpu_memory_gib", opts.gpu_memory_gib, low=0, low_open=True)
    if opts.train_pairs is not None:
        check_range("train_pairs", opts.train_pairs, low=1)
    return opts, rest


def detect_stage(recipe: str) -> str:
    """The stage a recipe is for: the keys only one stage has, else the folder it sits in."""
    from aplot.config import read_recipe

    keys = set(read_recipe(recipe))
    marks = {"rm": {"model_name_or_path", "loss_type", "dataset_name", "dataset_format"},
             "bon": {"policy_name_or_path", "reward_models", "n_samples", "backend"},
             "ppo": {"sft_model_path", "reward_model_path", "total_episodes", "response_length", "kl_coef"}}
    found = [stage for stage, k in marks.items() if keys & k]
    if len(found) == 1:
        return found[0]
    folder = Path(recipe).resolve().parent.name
    if folder in STAGES:
        return folder
    raise UserError(f"{recipe}: cannot tell which stage this recipe is for; pass --stage rm, bon or ppo")


@contextmanager
def resolving_for_the_gpu_machine():
    """Parse as the stage would on the GPU machine the job is meant for, leaving this process as it was.

    TrainingArguments asks this machine whether it can run bf16 on a GPU; a plan made on a laptop or a
    login node answers for the GPU node (the one hardware question in the parse). The PPO recipe keys
    hand a DeepSpeed config to accelerate through the environment, and a ZeRO-3 config registers itself
    with transformers: both are undone afterwards, so later work in this process is not affected."""
    import torch
    import transformers.training_args as training_args
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    environ = dict(os.environ)
    original = training_args.is_torch_bf16_gpu_available
    if not torch.cuda.is_available():
        training_args.is_torch_bf16_gpu_available = lambda: True
    try:
        yield
    finally:
        training_args.is_torch_bf16_gpu_available = original
        os.environ.clear()
        os.environ.update(environ)
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)


def make_plan(argv: list[str]) -> Plan:
    """The plan of `argv` (`--config recipe.yaml [--key value ...]` plus the planner's own flags)."""
    opts, rest = parse_plan_flags(argv)
    if "--config" not in rest[:-1]:
        raise UserError("command line: name a recipe: --config recipes/<stage>/<name>.yaml")
    recipe = rest[rest.index("--config") + 1]
    from aplot.config import read_recipe

    read_recipe(recipe)  # a missing or unreadable recipe: the stages' own one-line errors
    stage = opts.stage or detect_stage(recipe)
    plan = Plan(recipe, stage, opts.nproc * opts.nnodes, opts.nnodes, opts.gpu_memory_gib)
    plan.fit_limit = int(opts.gpu_memory_gib * GIB)
    {"rm": plan_rm, "bon": plan_bon, "ppo": plan_ppo}[stage](plan, rest, opts)
    if plan.total_bytes > plan.fit_limit and not any("does not fit" in p for p in plan.problems):
        plan.problems.insert(0, f"{recipe}: does not fit in {opts.gpu_memory_gib:g} GiB per GPU "
                                f"({plan.total_bytes / GIB:.1f} GiB)")
    return plan


def _fits(plan: Plan, advice: str) -> None:
    if plan.total_bytes > plan.fit_limit:
        parts = ", ".join(f"{item} {b / GIB:.1f}" for item, b, _ in plan.memory if b >= 0.05 * GIB)
        plan.problems.insert(0, f"{plan.recipe}: does not fit: {plan.total_bytes / GIB:.1f} GiB per GPU ({parts}) "
                                f"> --gpu_memory_gib {plan.gpu_memory_gib:g}; {advice}")


def _count(n: int | float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _describe(m: ModelShape) -> str:
    return f"{m.name}: {_count(m.params)} parameters, {m.dtype} ({m.config.num_hidden_layers} layers, " \
           f"hidden {m.config.hidden_size}; {m.source})"


# --- rm ------------------------------------------------------------------------------------------------

def trainer_steps(pairs: int, per_device: int, accumulation: int, processes: int, epochs: float,
                  max_steps: int) -> tuple[int, float]:
    """(optimizer steps, epochs) as transformers' Trainer counts them: each rank's dataloader has
    ceil(pairs / (per_device x processes)) batches, an epoch ends with a partial accumulation."""
    batches = math.ceil(pairs / (per_device * processes))
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    if max_steps > 0:
        return max_steps, max_steps / per_epoch
    return math.ceil(epochs * per_epoch), epochs


def plan_rm(plan: Plan, argv: list[str], opts) -> None:
    from aplot.config import parse_rm_recipe
    from aplot.outputs import check_output_dir
    from aplot.reward_model import check_path

    with resolving_for_the_gpu_machine():
        data_cfg, args, model_cfg = parse_rm_recipe(argv)
        zero = zero_config(args.hf_deepspeed_config.config if args.deepspeed else None)
    # The checks `make rm` makes before any work, in its order and words.
    if not model_cfg.model_name_or_path:
        raise UserError("model_name_or_path is not set: name a model directory, hub id or config directory")
    check_path(model_cfg.model_name_or_path, "model")
    check_output_dir(Path(args.output_dir))

    world, pd, ga = plan.processes, args.per_device_train_batch_size, args.gradient_accumulation_steps
    batch = pd * ga * world
    processes = f"{world} process{'es' * (world > 1)}"
    plan.row("batch", f"{pd} pairs per device x {ga} accumulation x {processes} = {batch} pairs per step "
                      f"({2 * batch} sequences: chosen and rejected)")
    pairs, exact = None, True
    if data_cfg.dataset_name == "embedded":
        pairs = min(data_cfg.n_train, data_cfg.max_train_pairs or data_cfg.n_train)
    elif opts.train_pairs:
        pairs = min(opts.train_pairs, data_cfg.max_train_pairs or opts.train_pairs)
    elif data_cfg.max_train_pairs:
        pairs, exact = data_cfg.max_train_pairs, False
    if pairs is None and args.max_steps <= 0:
        plan.row("steps", f"unknown: {data_cfg.dataset_name} is not read when planning (--train_pairs N to count)")
        steps = None
    else:
        steps, epochs = trainer_steps(pairs or 1, pd, ga, world, args.num_train_epochs, args.max_steps)
        of = f"{'at most ' if not exact else ''}{pairs} pairs" if pairs else "the data set"
        plan.row("steps", f"{steps} optimizer steps = {epochs:g} epoch{'s' * (epochs != 1)} of {of}")
    length = args.max_length
    tokens = 2 * batch * length if length else None
    plan.row("tokens/step", f"at most {tokens:,} ({2 * batch} sequences x max_length {length})" if tokens
             else "unknown: max_length is not set")
    plan.numbers.update(global_batch=batch, per_device=pd, accumulation=ga, steps=steps, pairs=pairs,
                        tokens_per_step=tokens)

    model, _ = resolve_model("reward model", model_cfg.model_name_or_path, "score", model_cfg.dtype,
                             init_from=getattr(model_cfg, "init_from", "sft"),
                             lineage_dir=getattr(model_cfg, "lineage_dir", None),
                             tokenizer_name=data_cfg.tokenizer_name_or_path, trust_remote_code=args.trust_remote_code)
    plan.models["reward model"] = model
    plan.row("model", _describe(model))
    states, how = model_states_bytes(model.params, model.largest_layer, zero, opts.nproc, opts.nnodes,
                                     model.weight_bytes)
    plan.need("model states", states, how)
    if length:
        act = activation_bytes(model, 2 * pd, length, args.gradient_checkpointing)
        plan.need("activations", act, f"estimate: {2 * pd} sequences x {length} tokens per micro-batch, "
                                      f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    plan.numbers.update(model_states=states, params=model.params, zero_stage=(zero or {}).get("stage", 0))
    _fits(plan, _training_advice(zero, args.gradient_checkpointing, pd, states > plan.fit_limit))


def _training_advice(zero, checkpointing, per_device, states_alone: bool) -> str:
    stage = int((zero or {}).get("stage", 0))
    if states_alone:
        if stage < 3:
            return "set deepspeed: recipes/deepspeed/zero3.json (or more processes: NPROC, NNODES)"
        if not _offloaded(zero, "offload_optimizer"):
            return "set deepspeed: recipes/deepspeed/zero3_offload.json (or more processes: NPROC, NNODES)"
        return "more processes (NPROC, NNODES)"
    if not checkpointing:
        return "set gradient_checkpointing: true"
    return (f"lower per_device_train_batch_size (now {per_device}; raise gradient_accumulation_steps to keep "
            "the global batch) or max_length")


# --- reward models named by bon and ppo recipes ----------------------------------------------------------

def rm_recipe_writing(path: str) -> str | None:
    """The rm recipe whose output is `path`: its output_dir, or the same with a suffix (`<dir>-bt`, as
    the README trains the bt variant), or a sibling of the same stem (`outputs/rm/embedded-aplot` for
    `outputs/rm/embedded-bt`)."""
    from aplot.config import read_recipe

    target = os.path.normpath(path)
    outputs = {}
    for recipe in sorted(RM_RECIPES.glob("*.yaml")):
        out = read_recipe(str(recipe)).get("output_dir")
        if isinstance(out, str):
            outputs[str(recipe.relative_to(ROOT))] = os.path.normpath(out)
    for rule in (lambda o: o == target, lambda o: target.startswith(o + "-"),
                 lambda o: "-" in o and target.startswith(o.rsplit("-", 1)[0] + "-")):
        found = [r for r, o in outputs.items() if rule(o)]
        if found:
            return found[0]
    return None


def resolve_model(role: str, name: str, head: str, dtype: str | None, *, init_from: str = "sft",
                  lineage_dir: str | None = None, tokenizer_name: str | None = None,
                  trust_remote_code: bool = False) -> tuple[ModelShape, object]:
    """A model as its stage would load it, without building or loading anything: the shape, and its
    tokenizer (an object, or the name to read one from). A model preset (recipes/models/<name>/) is
    its lineage's `init_from` model when built, else its config sized to the tokenizer its lineage
    trains (trained here in memory, as aplot.lineage trains it, and not saved); a config directory
    is sized to its tokenizer as `build_reward_model` sizes it; anything else is read as it is."""
    from aplot import checkpoints, lineage
    from aplot.reward_model import has_weights, load_tokenizer

    lineage_dir = lineage_dir or lineage.LINEAGE_DIR
    if checkpoints.is_imported(lineage.preset_dir(name)):  # a real checkpoint: its imported directory
        imported = Path(lineage_dir) / Path(lineage.preset_dir(name)).name
        if not (imported / lineage.MARKER).exists():
            raise UserError(f"{name}: not imported yet (make import PRESET={Path(lineage.preset_dir(name)).name}); "
                            "a plan downloads and writes nothing")
        name = str(imported)
    if lineage.is_preset(name):
        preset = lineage.load_preset(name)
        built_tokenizer = Path(lineage_dir) / preset.name / "tokenizer"
        if tokenizer_name:
            tokenizer = load_tokenizer(tokenizer_name, trust_remote_code)
        elif (built_tokenizer / lineage.MARKER).exists():
            tokenizer = load_tokenizer(str(built_tokenizer))
        else:
            from aplot.data.world import build_tokenizer

            tokenizer = build_tokenizer(preset.seed, **preset.tokenizer)
        built = Path(lineage_dir) / preset.name / init_from
        if init_from != "scratch" and (built / lineage.MARKER).exists():
            shape = model_shape(role, str(built), head, dtype, trust_remote_code=trust_remote_code)
        else:
            shape = model_shape(role, name, head, dtype, vocab_size=len(tokenizer), trust_remote_code=trust_remote_code)
            shape.source = f"config from {name}, " + ("fresh weights" if init_from == "scratch"
                                                      else f"its {init_from} model not built yet")
        return shape, tokenizer
    tokenizer = tokenizer_name or name
    vocab = None
    if Path(name).is_dir() and not has_weights(name):
        tokenizer = load_tokenizer(tokenizer, trust_remote_code)
        vocab = len(tokenizer)
    return model_shape(role, name, head, dtype, vocab_size=vocab, trust_remote_code=trust_remote_code), tokenizer


def reward_model_shape(role: str, path: str, dtype: str | None, trust_remote_code: bool) -> tuple[ModelShape, object]:
    """A reward model named by a bon or ppo recipe, and its tokenizer: a trained directory (checked as
    the stage checks it), a hub id, or, not trained yet, what the rm recipe writing it starts from."""
    from aplot.config import read_recipe
    from aplot.reward_model import check_path, check_reward_model

    if Path(path).is_dir():
        check_reward_model(path)
        return resolve_model(role, path, "score", dtype, trust_remote_code=trust_remote_code)
    if is_hub_id(path):
        return resolve_model(role, path, "score", dtype, trust_remote_code=trust_remote_code)
    recipe = rm_recipe_writing(path)
    if recipe is None:
        check_path(path, role)  # the stage's one line: it does not exist
    keys = read_recipe(str(ROOT / recipe))
    base = keys.get("model_name_or_path")
    shape, tokenizer = resolve_model(role, base, "score", dtype or keys.get("dtype"),
                                     init_from=keys.get("init_from", "sft"), lineage_dir=keys.get("lineage_dir"),
                                     tokenizer_name=keys.get("tokenizer_name_or_path"),
                                     trust_remote_code=trust_remote_code)
    shape.name, shape.source = path, f"not trained yet: {recipe} trains it from {base} ({shape.source})"
    return shape, tokenizer


def policy_shape(path: str, lineage_dir: str, dtype: str | None, trust_remote_code: bool) -> tuple[ModelShape, object]:
    """The policy (a causal LM) Best-of-N samples and PPO optimises, and its tokenizer: a preset's SFT
    model ('embedded': the embedded default's), or a model directory or hub id as it is."""
    from aplot import lineage
    from aplot.reward_model import check_path

    resolved = lineage.EMBEDDED if path == "embedded" else path
    check_path(resolved, "policy")
    shape, tokenizer = resolve_model("policy", resolved, "lm", dtype, lineage_dir=lineage_dir,
                                     trust_remote_code=trust_remote_code)
    shape.name = path
    return shape, tokenizer


# --- bon -----------------------------------------------------------------------------------------------

def plan_bon(plan: Plan, argv: list[str], opts) -> None:
    from aplot.config import RecipeParser
    from aplot.outputs import check_output_dir
    from pipelines.bon import BonConfig

    with resolving_for_the_gpu_machine():
        (cfg,) = RecipeParser((BonConfig,)).parse_recipe(argv)
    scorers = {}
    tokenizers = {}
    for path in cfg.reward_models:
        scorers[Path(path).name], tokenizers[Path(path).name] = reward_model_shape(
            f"proxy {Path(path).name}", path, cfg.dtype, cfg.trust_remote_code)
    if cfg.gold != "embedded":
        scorers["gold"], _ = reward_model_shape("gold", cfg.gold, cfg.dtype, cfg.trust_remote_code)
    check_output_dir(Path(cfg.output_dir))
    policy, policy_tokenizer = policy_shape(cfg.policy_name_or_path, cfg.lineage_dir, cfg.dtype,
                                            cfg.trust_remote_code)

    world = plan.processes
    samples = cfg.n_prompts * cfg.n_samples
    chunks = math.ceil(cfg.n_prompts / cfg.chunk_prompts)
    plan.row("sampling", f"{cfg.n_prompts} prompts x {cfg.n_samples} samples = {samples:,} responses, in {chunks} "
                         f"chunks of {cfg.chunk_prompts} prompts ({cfg.backend}, on rank 0)")
    plan.row("tokens", f"at most {samples * cfg.max_new_tokens:,} generated ({cfg.max_new_tokens} new tokens each)")
    per_rank = math.ceil(samples / world)
    plan.row("scoring", f"{len(scorers) + (cfg.gold == 'embedded')} scorers x {samples:,} responses; each rank "
                        f"scores {per_rank:,} per scorer in {math.ceil(per_rank / cfg.score_batch_size)} batches of "
                        f"{cfg.score_batch_size}")
    plan.numbers.update(samples=samples, chunks=chunks, scored_per_rank=per_rank)
    plan.models["policy"] = policy
    plan.row("policy", _describe(policy))
    for name, m in scorers.items():
        plan.models[name] = m
        plan.row(name if name == "gold" else f"proxy {name}", _describe(m))
    if cfg.gold == "embedded":
        plan.row("gold", "the embedded world's gold function (no model)")

    gpu = plan.fit_limit
    if cfg.backend == "vllm":
        share = int(VLLM_GPU_MEMORY_UTILIZATION * gpu)
        tp = cfg.tensor_parallel_size
        weights = policy.params * policy.weight_bytes // tp
        c = policy.config
        kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * policy.head_dim * policy.weight_bytes // tp
        max_len = cfg.max_model_len or c.max_position_embeddings
        kv_cache = share - weights
        plan.need("vLLM policy weights", weights, f"{policy.name}, tensor_parallel_size {tp}")
        plan.need("vLLM KV cache", max(kv_cache, 0),
                  f"the rest of gpu_memory_utilization {VLLM_GPU_MEMORY_UTILIZATION} x GPU (vLLM's default): "
                  f"~{max(kv_cache, 0) // kv_per_token:,} tokens = {max(kv_cache, 0) // kv_per_token // max_len} "
                  f"sequences of max_model_len {max_len}; less vLLM's own activations and graphs")
        plan.numbers.update(vllm_share=share, vllm_weights=weights, kv_tokens=max(kv_cache, 0) // kv_per_token)
        if weights > share:
            plan.problems.append(f"{plan.recipe}: the policy's weights ({weights / GIB:.1f} GiB per GPU) exceed vLLM's "
                                 f"share ({share / GIB:.1f} GiB); raise tensor_parallel_size (now {tp})")
        elif kv_cache < max_len * kv_per_token:
            plan.problems.append(f"{plan.recipe}: vLLM's KV cache ({kv_cache / GIB:.2f} GiB) cannot hold one "
                                 "sequence of "
                                 f"max_model_len {max_len}; lower max_model_len or raise tensor_parallel_size")
    else:
        plan.need("policy weights", policy.params * policy.weight_bytes, f"{policy.name} (transformers generate)")
        plan.need("generation", cfg.n_samples * (cfg.max_new_tokens + 512) * 2 * policy.config.num_hidden_layers
                  * policy.config.num_key_value_heads * policy.head_dim * policy.weight_bytes,
                  f"estimate: KV cache of {cfg.n_samples} samples x (prompt <= 512 + {cfg.max_new_tokens}) tokens")
    # The scorers come after sampling (the sampler is deleted first, and its memory with vLLM's engine
    # process); one at a time.
    # Scorers keep the last max_length tokens; unset, a sequence is its prompt (512 tokens assumed) and response.
    length = cfg.max_length or 512 + cfg.max_new_tokens
    worst = max(scorers.values(), key=lambda m: m.params * m.weight_bytes, default=None)
    if worst is not None:
        need = worst.params * worst.weight_bytes + inference_bytes(worst, cfg.score_batch_size, length)
        plan.row("scorers", f"after sampling, one at a time: the largest, {worst.name}, needs {need / GIB:.2f} GiB "
                            f"(weights + estimate of a batch of {cfg.score_batch_size} x {length} tokens); "
                            f"{(gpu - int(VLLM_GPU_MEMORY_UTILIZATION * gpu)) / GIB:.1f} GiB would be left were "
                            "vLLM's share still held")
        plan.numbers["largest_scorer"] = need
        if need > gpu:
            plan.problems.append(f"{plan.recipe}: the scorer {worst.name} needs {need / GIB:.1f} GiB > "
                                 "--gpu_memory_gib "
                                 f"{plan.gpu_memory_gib:g}; lower score_batch_size (now {cfg.score_batch_size}) or "
                                 "max_length, or set dtype: bfloat16")
    for name, tok in tokenizers.items():
        verdict, _ = compare_tokenizers(tokenizer_facts(policy_tokenizer, cfg.trust_remote_code),
                                        tokenizer_facts(tok, cfg.trust_remote_code), "the policy", name)
        plan.row(f"tokenizer {name}", f"policy and proxy {verdict} (scorers re-encode the text: not required)")


# --- ppo -----------------------------------------------------------------------------------------------

def plan_ppo(plan: Plan, argv: list[str], opts) -> None:
    from aplot.config import RecipeParser
    from aplot.outputs import check_output_dir
    from aplot.ppo import APLOTPPOConfig

    with resolving_for_the_gpu_machine():
        (args,) = RecipeParser((APLOTPPOConfig,)).parse_recipe(argv)
        # APLOTPPOConfig hands a `deepspeed` config to accelerate through the environment.
        deepspeed = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if os.environ.get(
            "ACCELERATE_USE_DEEPSPEED") == "true" else None
    check_output_dir(Path(args.output_dir))
    zero = zero_config(deepspeed)
    stage3 = int((zero or {}).get("stage", 0)) == 3

    world, pd, ga = plan.processes, args.per_device_train_batch_size, args.gradient_accumulation_steps
    local_batch = pd * ga
    batch = local_batch * world
    if batch % args.num_mini_batches or local_batch % args.num_mini_batches:
        raise UserError(f"{plan.recipe}: per_device_train_batch_size x gradient_accumulation_steps ({local_batch}) "
                        f"must be a multiple of num_mini_batches ({args.num_mini_batches})")
    episodes = args.total_episodes or int(args.num_train_epochs * args.n_prompts)
    updates = math.ceil(episodes / batch)
    epochs_note = ("" if args.total_episodes
                   else f" ({args.num_train_epochs:g} epochs of at most {args.n_prompts} prompts)")
    processes = f"{world} process{'es' * (world > 1)}"
    plan.row("rollout", f"{pd} prompts per device x {ga} accumulation x {processes} = {batch} episodes per "
                        f"update ({args.num_mini_batches} mini-batch{'es' * (args.num_mini_batches > 1)} of "
                        f"{batch // args.num_mini_batches})")
    plan.row("updates", f"{updates} PPO updates for {episodes:,} episodes"
                        f"{epochs_note}, "
                        f"{args.num_ppo_epochs * args.num_mini_batches} optimizer steps each "
                        f"({args.num_ppo_epochs} PPO epochs x {args.num_mini_batches} mini-batch"
                        f"{'es' * (args.num_mini_batches > 1)})")
    prompt_len = args.max_prompt_length
    plan.row("tokens/update", f"{batch * args.response_length:,} generated ({batch} x response_length "
                              f"{args.response_length})" + (f" + at most {batch * prompt_len:,} prompt tokens"
                                                            if prompt_len else ""))
    plan.numbers.update(global_batch=batch, per_device=pd, accumulation=ga, updates=updates, episodes=episodes,
                        tokens_per_step=batch * args.response_length)

    policy, policy_tokenizer = policy_shape(args.sft_model_path, args.lineage_dir, args.dtype,
                                            args.trust_remote_code)
    reward, reward_tokenizer = reward_model_shape("reward model", args.reward_model_path, args.dtype,
                                                  args.trust_remote_code)
    verdict, ids_differ = compare_tokenizers(tokenizer_facts(policy_tokenizer, args.trust_remote_code),
                                             tokenizer_facts(reward_tokenizer, args.trust_remote_code),
                                             "the policy", "the reward model")
    plan.row("tokenizers", f"policy and reward model {verdict}")
    if ids_differ and not args.retokenize_rewards:
        plan.problems.append(f"{plan.recipe}: policy {args.sft_model_path} and reward model {args.reward_model_path} "
                             f"have different tokenizers ({verdict[len('differ: '):]}): make ppo refuses this pair; "
                             "set retokenize_rewards: true, or use a reward model trained with the policy's tokenizer")
    elif not ids_differ and all(hasattr(t, "apply_chat_template") for t in (policy_tokenizer, reward_tokenizer)):
        # The stage's own start-up check: a probe response, as PPO would score it and as the reward model
        # was trained on it (chat layouts differ by the template's closing newline, or other templates).
        from aplot.ppo import rendering_mismatch
        from pipelines.ppo import encode_prompts

        chat = args.prompt_format not in ("explicit", "multiple_choice")
        probe = [{"role": "user", "content": "Write about apple."}] if chat else "Write about apple.\nAnswer:"
        import json

        from aplot.reward_model import CHAT_KEY, RewardScorer

        config = Path(args.reward_model_path) / "config.json"  # a trained model records how it reads texts
        chat_pairs = config.is_file() and bool(json.loads(config.read_text()).get(CHAT_KEY))
        mismatch = rendering_mismatch(policy_tokenizer, RewardScorer(None, reward_tokenizer, chat=chat_pairs), probe,
                                      encode_prompts(policy_tokenizer, [probe], None)[0][0])
        bridged = " (bridged: retokenize_rewards)" if args.retokenize_rewards else ""
        plan.row("rendering", f"policy and reward model {mismatch}{bridged}" if mismatch
                 else "a response reaches the reward model as it was trained on it")
        if mismatch and not args.retokenize_rewards:
            plan.problems.append(f"{plan.recipe}: policy {args.sft_model_path} and reward model "
                                 f"{args.reward_model_path} {mismatch}: make ppo refuses this pair; set "
                                 "retokenize_rewards: true")
    if args.value_model_path:
        value = model_shape("value model", args.value_model_path, "score", args.dtype,
                            trust_remote_code=args.trust_remote_code)
    else:
        # The stage starts the value model from the reward model, or from the policy when the tokenizers
        # differ (it reads the policy's tokens); a policy given a score head is counted as the policy.
        value = dataclasses.replace(policy if ids_differ else reward, role="value model")
    gold = None
    if args.gold != "embedded":
        gold, _ = reward_model_shape("gold", args.gold, args.dtype, args.trust_remote_code)
    for role, m in (("policy", policy), ("reference", policy), ("value model", value), ("reward model", reward),
                    ("gold", gold)):
        if m is not None:
            plan.models[role] = m
            plan.row(role, _describe(m) + (" (frozen copy of the policy)" if role == "reference" else "")
                     + (" (starts from it)" if role == "value model" else ""))

    trained = policy.params + value.params
    states, how = model_states_bytes(trained, max(policy.largest_layer, value.largest_layer), zero, opts.nproc,
                                     opts.nnodes, policy.weight_bytes)
    plan.need("policy + value states", states, how + ": one engine trains both")
    shard = world if stage3 else 1  # TRL shards the frozen models only under ZeRO-3
    for role, m in (("reference weights", policy), ("reward weights", reward)):
        plan.need(role, m.params * m.weight_bytes // shard,
                  "frozen" + (", sharded by ZeRO-3" if stage3 else ", whole on every GPU"))
    if gold is not None:
        plan.need("gold weights", gold.params * gold.weight_bytes, "gold evaluation: loaded whole on every rank")
    seq = (prompt_len or 0) + args.response_length
    no_prompt = "response only: no max_prompt_length, "
    plan.need("rollout logits", logits_bytes(policy, local_batch, args.response_length),
              f"{local_batch} rollouts x {args.response_length} tokens x vocabulary {policy.config.vocab_size}, "
              "float32")
    act = activation_bytes(policy, pd, seq, args.gradient_checkpointing) + activation_bytes(
        value, pd, seq, args.gradient_checkpointing) + logits_bytes(policy, pd, args.response_length)
    plan.need("activations", act, f"estimate: policy and value on {pd} x {seq} tokens "
                                  f"({'prompt <= max_prompt_length + ' if prompt_len else no_prompt}"
                                  f"response), with their logits; gradient checkpointing "
                                  f"{'on' if args.gradient_checkpointing else 'off'}")
    plan.numbers.update(model_states=states, params=trained)
    if states > plan.fit_limit or not args.gradient_checkpointing:
        advice = _training_advice(zero, args.gradient_checkpointing, pd, states > plan.fit_limit)
    else:
        advice = (f"lower per_device_train_batch_size (now {pd}) or gradient_accumulation_steps (the rollout's "
                  "logits), or response_length")
    _fits(plan, advice)


# --- throughput arithmetic (make gpu-check) ------------------------------------------------------------

# Dense bf16 peaks in TFLOP/s by device name (NVIDIA's data sheets, no sparsity); the first match wins, so
# the specific names come before the family's. An unknown device gets no MFU.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))


def peak_bf16_flops(device_name: str) -> float | None:
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


def matmul_params(model) -> int:
    """Parameters that multiply activations (every nn.Linear weight, a tied LM head included): the N of
    the 6N FLOPs-per-token rule; embedding lookups and norms do no matmul."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def training_flops_per_token(model, seq_len: int) -> float:
    """Forward and backward FLOPs per token: 6N plus attention's 12 x layers x hidden x sequence length
    (the PaLM paper's estimate, which MFU is conventionally measured against)."""
    c = model.config
    return 6 * matmul_params(model) + 12 * c.num_hidden_layers * c.hidden_size * seq_len
