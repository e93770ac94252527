# Two entry points (README quick start): `make demo` and `make test`. Both create .venv and install
# bockd with every pinned dependency first; re-running skips the install when pyproject.toml is unchanged.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job on offline data: a BOC-KD ensemble of 5 ResNet-20 students and their 5 baselines
# on scikit-learn's digits, then the comparison table and plot in runs/demo.
demo: $(STAMP)
	$(BIN)/bockd reproduce --dataset digits --arch resnet20 --preset smoke --out runs/demo

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

clean:
	rm -rf runs .pytest_cache .ruff_cache
