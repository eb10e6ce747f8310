# The two commands of README: `make serve` (run the service) and `make test` (run the tests).
# Both set up everything on a fresh machine: virtualenv, pinned dependencies, default model.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEFAULT_MODEL := HuggingFaceTB/SmolLM2-135M-Instruct

.PHONY: serve test lint format model setup

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

model: $(INSTALLED)
	$(BIN)/python -m engine download-weights $(DEFAULT_MODEL)

serve: model
	$(BIN)/serve run serve_config.yaml

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: model lint
	$(BIN)/python -m pytest -v --durations=15
