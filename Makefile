# Two entry points (README quick start): `make demo` and `make test`. Both create .venv and install
# bockd with every pinned dependency first; re-running skips the install when pyproject.toml is unchanged.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint imports format bench bench-gpu gpu-pack gpu-check gpu-rehearse images clean

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

lint: $(STAMP) imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The layer rule (pyproject.toml [tool.importlinter], docs/architecture.md). import-linter reads packages
# from the filesystem, and bockd.pipeline / bockd.components live in pipeline/ and components/ (the
# editable install maps them): it reads a copy laid out as installed, from another folder (it puts the
# working folder first on sys.path).
IMPORT_VIEW := .build/import-view
imports: $(STAMP)
	rm -rf $(IMPORT_VIEW) && mkdir -p $(IMPORT_VIEW)
	cp -r bockd $(IMPORT_VIEW)/bockd && cp -r pipeline $(IMPORT_VIEW)/bockd/pipeline
	cp -r components $(IMPORT_VIEW)/bockd/components
	cd $(IMPORT_VIEW) && $(CURDIR)/$(BIN)/lint-imports --no-cache $(CURDIR)/pyproject.toml

test: $(STAMP) imports
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

# The GPU check for a session that borrows the GPU machine (docs/benchmarks.md, "GPU check"). gpu-pack, here:
# the wheels that machine's python3 lacks and CIFAR-10 in two parts (lossless, sha256-checked) into .gpu/
# (git-ignored; about 5 minutes the first time). gpu-check, there: the CUDA tests, the step benchmark and the
# paper-cifar10 ResNet-20 runs, resumable, results in $OUT/gpu-check. gpu-rehearse: the device calls
# simulated here with REHEARSE_PY, an interpreter without pydantic standing in for that python3.
GPU_PYTHON ?= python3
REHEARSE_PY ?= /tmp/r312/venv/bin/python
gpu-pack: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py pack

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py run $(GPU_CHECK_ARGS)

gpu-rehearse: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py rehearse --python $(REHEARSE_PY) --minutes 3 -- --device cpu \
	    --bench-archs resnet20 --bench-variants eager graph --bench-iters 2 --bench-batch 32 \
	    --runs ensemble baseline-s5 --set data.train_subset=640 --set epochs=6 --set runtime.eval_every=6

# Both images built with buildah (no Docker engine or registry: a debootstrapped Debian base) and run:
# a compiled component's command line in the trainer, the model server in the serving image. Needs root,
# buildah and debootstrap; about 18 min and 26 GB of scratch with the vfs driver (images/README.md).
images:
	images/build.sh all

clean:
	rm -rf runs .pytest_cache .ruff_cache
