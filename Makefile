# `make demo` and `make test` are the whole set-up: both create .venv and install ssl3d on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ssl3d-installed
DEMO_DIR ?= $(CURDIR)/demo_work
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: demo test test-slow test-all venv clean-demo

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# test: the suite without its slow tier (< 15 min on 2 cores), in TEST_WORKERS pytest-xdist workers, one test file
# per worker at a time (a file's fixtures are built once); test-slow: the end-to-end runs of whole CLIs and
# multi-process (DDP, kill) tests, marked `slow` (about 40 min on 2 cores), one at a time; CI runs both
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

clean-demo:
	rm -rf $(DEMO_DIR)
