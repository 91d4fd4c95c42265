"""Where the engine-vs-PEFT tests run: ``PREFIX_SERVE_TEST_DEVICE`` (cpu, cuda, cuda:N) and
``PREFIX_SERVE_TEST_DTYPE`` (float32, bfloat16, float16). Unset, they are cpu and float32, so CPU CI is
unchanged; `server/bench/gpu-check.sh` sets them to run the same tests on a GPU.

The tiny models are built in float32 on the CPU from a fixed seed and then moved, so every placement
serves the same weights. Engine and oracle run in the same dtype, and two float paths (batched, cached,
packed vs. one sequence recomputed) may order two logits differently only when they are closer than
that dtype's rounding over a forward pass: ``NEAR_TIE``.
"""

from __future__ import annotations

import os

import torch

from server.config import DTYPES

DEVICE = torch.device(os.environ.get("PREFIX_SERVE_TEST_DEVICE") or "cpu")
DTYPE = DTYPES[os.environ.get("PREFIX_SERVE_TEST_DTYPE") or "float32"]

# Largest logit gap still called a tie, per dtype. float32: gaps measured on CPU are 0 (ties ~1e-5).
# bfloat16: on CPU, 1 of 1,524 tokens differed, by 0.031 (half a bfloat16 step at logits of 8-16); the
# bound is two such steps, since GPU kernels reduce in other orders. float16 (not run by any check yet):
# two of its steps at the same magnitude.
_NEAR_TIE = {torch.float32: 1e-3, torch.bfloat16: 0.125, torch.float16: 0.016}
NEAR_TIE = _NEAR_TIE[DTYPE]


def place(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` on the tests' device, in their dtype."""
    return model.to(device=DEVICE, dtype=DTYPE)
