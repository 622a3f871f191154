# pelab: `make train` and `make test` work on a fresh clone (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.pelab-installed
# GPU hosts take PyPI's (CUDA) torch; CPU-only hosts take 2.13.0, which this project's CPU
# machines serve as a local CPU build. Override with `make TORCH_SPEC=...`.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.11,torch==2.13.0)
ARGS ?=

.PHONY: help install train test test-gpu test-slurm bench sweep report eval export data clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with pelab and its dev tools

train: $(STAMP)  ## pretrain the default model offline on the embedded data (ARGS="pe=alibi ...")
	$(PY) -m train $(ARGS)

test: $(STAMP)  ## lint (ruff) and run the test suite (CPU)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(PY) -m pytest -q $(ARGS)

test-gpu: $(STAMP)  ## GPU suite on one CUDA GPU: every attention path through the model, train and eval entry points; table in bench/out/test_gpu
	PY=$(PY) bench/gpu_check.sh 1 bench/out/test_gpu $(ARGS)

test-slurm: $(STAMP)  ## real-Slurm tests; starts (and stops) a one-node cluster from Debian's Slurm if none is reachable
	PELAB_SLURM_START=1 $(PY) -m pytest -q -m slurm tests/test_slurm.py $(ARGS)

bench: $(STAMP)  ## GPU throughput: real training steps per (PE, backend) cell, every registered PE (ARGS to override)
	$(PY) -m bench.bench --models gpt_355m --seq-len 4096 --micro-batch 20 --backends auto,fa4,cudnn,triton,flex_const --docs rope,alibi,fox,grape_a_q,grape_ap --dense-ref alibi:20,grape_a_qk:4,grape_ap:1 $(ARGS)

sweep: $(STAMP)  ## the PE matrix as a Hydra multirun (ARGS="experiment=grape_medium hydra/launcher=slurm ...")
	$(PY) -m train -m +sweep=pe_matrix $(ARGS)

report: $(STAMP)  ## compare runs: plots + table (ARGS="runs/multirun/<date>" or "--wandb entity/project/group")
	$(PY) -m train.report $(ARGS)

eval: $(STAMP)  ## evaluate a checkpoint (ARGS="checkpoint=runs/<run> suite=all eval.data_dir=../shared/data/eval")
	$(PY) -m train.eval $(ARGS)

export: $(STAMP)  ## a checkpoint as a Hugging Face folder (ARGS="checkpoint=runs/<run> out=runs/<run>/hf")
	$(PY) -m train.export $(ARGS)

data: $(STAMP)  ## build FineWeb-Edu shards (ARGS="data.subset=sample-10BT" or data.local_files=...)
	$(PY) -m data.prepare data=fineweb_edu $(ARGS)

clean:  ## remove runs, caches and .venv
	rm -rf runs data_cache .pytest_cache $(VENV)
