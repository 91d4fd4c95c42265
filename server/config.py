"""The one settings object, validated when built (from the command line or by tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from server.engine.cpu_linear import resolve_dtype

# "default" leaves OMP_WAIT_POLICY unset: libgomp spins a while at a barrier, then sleeps.
OMP_WAIT_POLICIES = ("default", "active", "passive")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class Settings:
    model: str = "default"  # "default" (embedded SmolLM2-135M-Instruct) or a local HF model folder
    # names the API serves the base model under, the first one listed; empty: the default model's hub id
    # (HuggingFaceTB/SmolLM2-135M-Instruct, also accepted as SmolLM2-135M-Instruct), or the folder's name
    served_model_name: tuple[str, ...] = ()
    store_dir: Path = Path("store")
    # "auto": bfloat16 where the CPU has native bfloat16 matmuls (avx512_bf16/amx_bf16), else float32
    dtype: str = "auto"
    device: str = "cpu"
    max_batch_size: int = 32
    kv_cache_bytes: int = 2 << 30  # key/value memory for the running batch
    max_step_tokens: int = 512  # tokens per forward: running requests' next tokens + joining prompts' chunks
    # The paged key/value cache (server/engine/block_manager.py): token slots per block; reuse of computed
    # prompt blocks (per tenant and task version, or across tenants when shared); a prompt with more tokens
    # than long_prefill_threshold to prefill gets at most that many of a step while others wait (0: half a
    # step), and at most max_long_prefills such prompts prefill at once
    block_size: int = 16
    prefix_caching: bool = True
    share_prefix_cache: bool = False
    long_prefill_threshold: int = 0
    max_long_prefills: int = 1
    cache_bytes: int = 1 << 30  # resident prefixes (memory tier of the store)
    max_upload_bytes: int = 256 << 20
    max_virtual_tokens: int = 1024
    threads: int = 0  # the engine process's torch threads; 0: one per core but one (see engine_threads)
    auth_file: Path | None = None  # tenants and keys; None serves everyone (single-user mode)
    redis_url: str | None = None  # shared Redis tier of the store (all replicas); None: local disk alone
    # seconds between a replica's checks that Redis still holds its tasks (what Redis lost is pushed back)
    redis_reconcile_interval: float = 5.0
    # host-memory tier of the store (0: none); unused when the device is the CPU
    host_cache_bytes: int = 2 << 30
    # Admission control: sequences waiting for the batch beyond which new requests get 503 + Retry-After.
    # None: two batches' worth (2 x max_batch_size), so an accepted request waits for at most two batches.
    max_waiting_requests: int | None = None
    # default per-request deadline (seconds from arrival to joining the batch)
    request_timeout: float | None = None
    # on SIGTERM, how long in-flight requests may take before they are cancelled
    shutdown_timeout: float = 30.0
    # The engine process's OpenMP wait policy (OMP_WAIT_POLICY); "default" leaves libgomp's own (spin a
    # while, then sleep), which measured best (README, "Under load").
    omp_wait_policy: str = "default"
    # Largest non-upload request body (JSON). The default model's whole context (8,192 tokens) is about 32 KB
    # of text, 200 KB if every character were \u-escaped: 4 MiB fits it many times over.
    max_request_bytes: int = 4 << 20
    # prompt tokens one request may ask for across its prompts and choices (prompts x n); 0: four contexts
    max_request_tokens: int = 0
    # tokens a chat request's tools take in its prompt (server/api/tools.py, tool_prompt); 0: half the
    # model's context (4,096 for the default model), so the tools leave the conversation and the answer at
    # least as much room as they take
    max_tool_prompt_tokens: int = 0
    public_metrics: bool = False  # with --auth-file: serve /metrics without a key
    public_docs: bool = False  # with --auth-file: serve /docs, /redoc and /openapi.json without a key
    # Engine liveness: silence (no step, no heartbeat) for this long replaces the engine process. The longest
    # legit step measured on 2 cores took 9.9 s (a 512-token prefill chunk deep in the 8,192-token context
    # beside 31 decoding rows; README, "Under load"): 30 s is three times that.
    engine_stall_timeout: float = 30.0
    engine_max_restarts: int = 5  # replacements in any 60 s; one more and the server exits non-zero

    @property
    def cache_options(self) -> dict:
        """The engine's paged-cache options (EngineConfig's field names)."""
        return {"block_size": self.block_size, "prefix_caching": self.prefix_caching,
                "share_prefix_cache": self.share_prefix_cache,
                "long_prefill_threshold": self.long_prefill_threshold,
                "max_long_prefills": self.max_long_prefills}

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose auto or one of {sorted(DTYPES)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device {self.device!r}: choose cpu or cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to torch")
        for name in ("max_batch_size", "kv_cache_bytes", "cache_bytes", "max_upload_bytes",
                     "max_virtual_tokens", "max_request_bytes", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_request_tokens < 0:
            raise ValueError("--max-request-tokens must be >= 0 (0: four times the model's context)")
        if self.max_tool_prompt_tokens < 0:
            raise ValueError("--max-tool-prompt-tokens must be >= 0 (0: half the model's context)")
        if self.long_prefill_threshold < 0:
            raise ValueError("--long-prefill-threshold must be >= 0 (0: half of --max-step-tokens)")
        if self.max_long_prefills < 1:
            raise ValueError("--max-long-prefills must be at least 1")
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError(f"--max-step-tokens {self.max_step_tokens} must be at least --max-batch-size "
                             f"{self.max_batch_size}: a full batch's next tokens are computed in one step")
        if self.host_cache_bytes < 0:
            raise ValueError("host_cache_bytes must be 0 (no host-memory tier) or positive")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--redis-url {self.redis_url!r}: use redis://HOST:PORT/DB, rediss://... or "
                             "unix:///path/to/redis.sock")
        if not 0.05 <= self.redis_reconcile_interval <= 3600:
            raise ValueError("--redis-reconcile-interval must be between 0.05 and 3600 seconds")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError("--max-waiting-requests must be at least 1")
        if self.request_timeout is not None and not self.request_timeout >= 0.1:
            raise ValueError("--request-timeout must be at least 0.1 seconds")
        if not self.shutdown_timeout >= 0:
            raise ValueError("--shutdown-timeout must be 0 or more seconds")
        if self.omp_wait_policy not in OMP_WAIT_POLICIES:
            raise ValueError(
                f"--omp-wait-policy {self.omp_wait_policy!r}: choose one of {', '.join(OMP_WAIT_POLICIES)}"
            )
        if not self.engine_stall_timeout >= 1:
            raise ValueError("--engine-stall-timeout must be at least 1 second (the idle heartbeat is 0.5 s)")
        if self.engine_max_restarts < 0:
            raise ValueError("--engine-max-restarts must be 0 (never replace the engine) or more")
        names = tuple(self.served_model_name or ())  # None: the CLI's flag left out
        if any(not name.strip() for name in names) or len(set(names)) != len(names):
            raise ValueError(f"--served-model-name {' '.join(names)!r}: give distinct, non-empty names")
        object.__setattr__(self, "served_model_name", names)
        object.__setattr__(self, "store_dir", Path(self.store_dir))

    @property
    def engine_threads(self) -> int:
        """``threads``, or every core this process may use but one: that core is left to the HTTP process
        (and the OS). An OpenMP team that needs every core stalls at each barrier whenever anything else runs:
        on 2 cores, decode with 2 threads fell to a quarter beside a busy process, with 1 it kept its speed
        (README, "Under load")."""
        if self.threads:
            return self.threads
        return max(1, len(os.sched_getaffinity(0)) - 1)

    @property
    def waiting_limit(self) -> int:
        return self.max_waiting_requests or 2 * self.max_batch_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.device)
