# The two commands of README: `make serve` (run the service) and `make test` (run the tests).
# Both set up everything on a fresh machine: virtualenv, pinned dependencies, default model,
# and the browser the chat page's test drives (Debian's chromium; Playwright's own browser
# download is never used).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEFAULT_MODEL := HuggingFaceTB/SmolLM2-135M-Instruct
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: serve test lint format model setup browser

setup: $(INSTALLED) browser

# tests/integration/test_chat_page.py launches it (Debian/Ubuntu: apt, as root or via sudo).
browser:
	test -x $(CHROMIUM) || ($(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

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

test: model browser lint
	$(BIN)/python -m pytest -v --durations=15
