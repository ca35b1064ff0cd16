# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv with the CPU build of torch pinned, and lstmkit installed from this clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: setup demo test lint bench sanitize clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/lstmkit warmup
	touch $@

demo: setup
	$(BIN)/lstmkit demo

test: setup lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/lstmkit bench

# The cpu backend's tests under AddressSanitizer and UBSan (see .ci/sanitize); gcc's runtimes.
sanitize: setup
	PYTHON=$(BIN)/python .ci/sanitize

clean:
	rm -rf $(VENV) build src/*.egg-info
