# Two entry points (README quick start): `make demo` and `make test`. Both create .venv and install
# bockd with every pinned dependency first; re-running skips the install when pyproject.toml is unchanged.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench bench-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job on offline data: the whole Kubeflow pipeline under kfp.local against the embedded S3 and
# MLflow servers (digits, smoke preset: 5 ResNet-20 students + 5 baselines), the selected student
# served by a local KServe model server and asked to classify 8 test images, then the summary table.
demo: $(STAMP)
	$(BIN)/bockd pipeline run --local

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/serve.py

# On a CUDA machine: the CUDA tests, then the paper networks' ensemble step (bf16 autocast and channels_last
# by default on CUDA), eager and compiled, with the one-epoch and 450-epoch estimates (docs/benchmarks.md).
GPU_BENCH := $(BIN)/python benchmarks/train_step.py --archs resnet110 densenet_bc_100_12 --iters 20 --warmup 5 --epoch-estimate
bench-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m cuda
	$(GPU_BENCH) --out benchmarks/results
	$(GPU_BENCH) --compile --out benchmarks/results/compiled

clean:
	rm -rf runs .pytest_cache .ruff_cache
