"""The one settings object, validated when built (from the command line or by tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class Settings:
    model: str = "default"  # "default" (embedded SmolLM2-135M-Instruct) or a local HF model folder
    store_dir: Path = Path("store")
    dtype: str = "float32"
    device: str = "cpu"
    max_batch_size: int = 32
    kv_cache_bytes: int = 2 << 30  # key/value memory for the running batch
    max_step_tokens: int = 512  # tokens per forward: running requests' next tokens + joining prompts' chunks
    cache_bytes: int = 1 << 30  # resident prefixes (memory tier of the store)
    max_upload_bytes: int = 256 << 20
    max_virtual_tokens: int = 1024
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (one per core)
    auth_file: Path | None = None  # tenants and keys; None serves everyone (single-user mode)
    redis_url: str | None = None  # shared Redis tier of the store (all replicas); None: local disk alone
    host_cache_bytes: int = 2 << 30  # host-memory tier of the store (0: none); unused when the device is the CPU

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {sorted(DTYPES)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device {self.device!r}: choose cpu or cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to torch")
        for name in ("max_batch_size", "kv_cache_bytes", "cache_bytes", "max_upload_bytes", "max_virtual_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError(f"--max-step-tokens {self.max_step_tokens} must be at least --max-batch-size "
                             f"{self.max_batch_size}: a full batch's next tokens are computed in one step")
        if self.host_cache_bytes < 0:
            raise ValueError("host_cache_bytes must be 0 (no host-memory tier) or positive")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--redis-url {self.redis_url!r}: use redis://HOST:PORT/DB, rediss://... or "
                             "unix:///path/to/redis.sock")
        object.__setattr__(self, "store_dir", Path(self.store_dir))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
