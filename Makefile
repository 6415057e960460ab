# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := $(VENV)/.installed-demo
TEST   := $(VENV)/.installed-test

.PHONY: demo test typecheck docs bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# `demo` installs the demo extra only; `test` everything the tests need.
$(DEMO): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[demo]'
	touch $@

$(TEST): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(DEMO)

demo: $(DEMO)
	$(PY) -m gradtransforms demo

# The type check, then the suite (which also builds the API docs once and
# fails on any pdoc warning: tests/test_packaging.py), in TEST_WORKERS
# processes (pytest-xdist; CI has 2 cores), a file to a process so that
# its module-level compile caches are shared.
TEST_WORKERS ?= 2
test: $(TEST)
	$(PY) -m mypy
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

typecheck: $(TEST)
	$(PY) -m mypy

# API reference from the docstrings, into docs/api/ (not committed).
docs: $(TEST)
	$(PY) docs/build.py docs/api

# The long runs (about an hour on 2 cores): rewrite benchmarks/results/.
bench: $(DEMO)
	$(PY) -m gradtransforms bench overhead --stacked --out benchmarks/results
	$(PY) -m gradtransforms bench stability --out benchmarks/results
	$(PY) benchmarks/lm_stability.py --out benchmarks/results

clean:
	rm -rf $(VENV) build dist *.egg-info docs/api .mypy_cache
