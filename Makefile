# Every target creates the venv it needs: `make demo` and `make test` work on a fresh clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-systemd test-real lint typecheck unit bench clean

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
	$(BIN)/pytest -q -m "not slow and not systemd and not real"

test: lint unit

# The shipped unit under a real systemd 252 in a container (/work/shared/systemd-box):
# needs root and the package registry; skips with the reason where the box cannot start.
test-systemd: $(STAMP)
	IHLD_SYSTEMD_TEST=1 $(BIN)/pytest -q -rs -m systemd tests/test_systemd_box.py

# Against a real llama.cpp server in router mode (tests/real): builds it and its model into
# $IHLD_REAL_CACHE (default ~/.cache/ihld-real-server) first (about 7 minutes the first time, then
# reused). build.sh exits 77 only when the build is impossible here (no cmake/ninja/g++, or
# the registry unreachable): the suite then skips with a loud banner; any other failure fails.
test-real: $(STAMP)
	@rc=0; PY=$(PY) bash realserver/build.sh || rc=$$?; \
	if [ $$rc -ne 0 ] && [ $$rc -ne 77 ]; then \
		echo "make test-real: realserver/build.sh failed (exit $$rc)" >&2; exit $$rc; fi
	$(BIN)/pytest -q -rs -m real tests/real

bench: $(STAMP)
	$(BIN)/ihld bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
