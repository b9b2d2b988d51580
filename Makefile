# aplot: three stages over one library. Every target installs the environment first if needed.
#   make rm   [RECIPE=recipes/rm/x.yaml]   [ARGS="--key value ..."] [NPROC=2]
#   make eval [RECIPE=recipes/eval/x.yaml] [ARGS="--reward_models dir1 dir2"]
#   make test | make bench-step

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ARGS       ?=
NPROC      ?= 1
PYTEST_ARGS ?=

# One process by default; NPROC>1 launches data-parallel ranks with torchrun.
ifeq ($(NPROC),1)
LAUNCH := $(PY)
else
LAUNCH := $(VENV)/bin/torchrun --nproc_per_node $(NPROC)
endif

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install rm eval test bench-step clean

# Each stage has its own default recipe; RECIPE=... on the command line picks another.
rm:   RECIPE ?= recipes/rm/embedded.yaml
eval: RECIPE ?= recipes/eval/embedded.yaml

install: $(VENV)/.installed

# torch first: the local CPU wheel here, so nothing pulls a several-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

rm: install
	$(LAUNCH) -m pipelines.rm --config $(RECIPE) $(ARGS)

eval: install
	$(PY) -m pipelines.eval --config $(RECIPE) $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-step: install
	$(PY) -m benchmarks.step_time $(ARGS)

clean:
	rm -rf outputs wandb
