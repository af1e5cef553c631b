# Every target creates the venv it needs: `make demo` and `make test` work on a fresh clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-systemd lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ihld demo

lint: $(STAMP)
	$(BIN)/ruff check ihld plugins tests benchmarks
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not systemd"

test: lint unit

# The shipped unit under a real systemd 252 in a container (/work/shared/systemd-box):
# needs root and the package registry; skips with the reason where the box cannot start.
test-systemd: $(STAMP)
	IHLD_SYSTEMD_TEST=1 $(BIN)/pytest -q -rs -m systemd tests/test_systemd_box.py

bench: $(STAMP)
	$(BIN)/ihld bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
