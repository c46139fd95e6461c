# The two commands a new machine needs: `make demo` and `make test`. Both depend on `make setup`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-sd15 lint clean

setup: $(STAMP)

# Reinstall only when the package metadata changes; a second `make setup` does nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pipelines.deepspeed_ops
	touch $(STAMP)

demo: setup
	$(BIN)/anomdiff demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not sd15"

# The paper-size DiAD and DRDC on CPUs: two training steps under ZeRO-3, resume, export, evaluate, predict.
test-sd15: setup
	$(BIN)/python -m pytest -q -m sd15

lint: setup
	$(BIN)/ruff check anomdiff pipelines tests

clean:
	rm -rf $(VENV) .anomdiff build *.egg-info
