"""How ``compile_spike_<date>.jsonl`` was made: does regional ``torch.compile`` shorten the bf16 decode step?

Rerun it at 1bbeb55: since then Llama layers run in server/engine/llama_stack.py, not the forwards it patches.
Issue #23's spike (a measurement, not an engine change): at one torch thread, bfloat16, the engine's decode
step is slower than vLLM's CPU build, which compiles its forward with inductor. This script patches the loaded
model's decoder layers (Llama family: the default SmolLM2-135M) in this process, never the engine's code::

    PYTHONPATH=. python server/bench/results/peers/compile_spike.py --rounds 3 > compile_spike_<date>.jsonl
    ... compile_spike.py --only decode --modes eager,stack --rounds 5 >> compile_spike_<date>.jsonl
    ... compile_spike.py --only equal --emulate-casts >> compile_spike_<date>.jsonl

One JSON line per measurement:

- ``micro``: one layer's linears of this model at 1 and 32 rows, oneDNN-prepacked bfloat16 as the engine
  calls them, as 7 calls (q, k, v, o, gate, up, down) against 4 (q|k|v and gate|up fused into one weight).
- ``decode``: the engine's decode tokens/s (:func:`server.bench.offline.engine_decode_tokens_per_s`) at 32
  streams and 1 stream with each mode, alternating modes within each round:
  ``eager`` (as served), ``mlp`` (compiled: the input RMSNorm; residual add + post-attention RMSNorm + MLP +
  residual add; attention module eager), ``layer`` (compiled: RMSNorm + q/k/v + rotary; o_proj + residual +
  RMSNorm + MLP + residual; only the cache write and the packed attention eager), ``stack`` (the 30 layers
  as one compiled graph, one call per step, the cache write + attention an opaque custom op in it).
- ``equal``: greedy tokens of each compiled mode against eager (32 streams x ``--check-tokens``).
- ``compile``: the first steps' extra seconds with compiling, in a fresh process per mode, with an empty
  inductor cache (cold) and again with that cache dir kept (warm: FX graph / AOTAutograd caches on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch._inductor.config

REPO_ROOT = Path(__file__).resolve().parents[4]
MODES = ("eager", "mlp", "layer", "stack")


def _cpu_name() -> str:
    lines = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    return lines[0].split(":", 1)[1].strip() if lines else "?"


def _emit(row: dict) -> None:
    row.update(load1=round(os.getloadavg()[0], 2), time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               threads=torch.get_num_threads())
    print(json.dumps(row), flush=True)


# -- micro-benchmark: 7 prepacked linears per layer against 4 -----------------------------------------------


def _packed(out_features: int, in_features: int) -> torch.Tensor:
    w = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def micro(rounds: int, reps: int = 200) -> None:
    h, q, kv, inter = 576, 576, 192, 1536  # SmolLM2-135M: 9 heads / 3 KV heads of 64, MLP 1536
    sep = [_packed(q, h), _packed(kv, h), _packed(kv, h), _packed(h, q), _packed(inter, h), _packed(inter, h),
           _packed(h, inter)]
    fused = [_packed(q + 2 * kv, h), _packed(h, q), _packed(2 * inter, h), _packed(h, inter)]

    def seven(x: torch.Tensor) -> None:
        a = _linear(x, sep[0]) + 0
        _linear(x, sep[1]), _linear(x, sep[2])
        _linear(a, sep[3])
        m = _linear(x, sep[4]) * _linear(x, sep[5])
        _linear(m, sep[6])

    def four(x: torch.Tensor) -> None:
        a = _linear(x, fused[0])[..., :q]
        _linear(a.contiguous(), fused[1])
        gu = _linear(x, fused[2])
        _linear(gu[..., :inter] * gu[..., inter:], fused[3])

    for rows in (1, 32):
        x = torch.randn(rows, h, dtype=torch.bfloat16)
        times: dict[str, list[float]] = {"7 calls": [], "4 calls": []}
        for _ in range(rounds):
            for name, fn in (("7 calls", seven), ("4 calls", four)):
                for _ in range(10):
                    fn(x)
                start = time.perf_counter()
                for _ in range(reps):
                    fn(x)
                times[name].append((time.perf_counter() - start) / reps * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        seven_us, four_us = med["7 calls"], med["4 calls"]
        _emit({"kind": "micro", "rows": rows, "us_per_layer_7": round(seven_us, 1),
               "us_per_layer_4": round(four_us, 1), "ratio_4_over_7": round(four_us / seven_us, 3),
               "per_step_30_layers_ms_saved": round((seven_us - four_us) * 30 / 1e3, 2)})


# -- regional compile of the decoder layers -----------------------------------------------------------------

# Inductor cannot take the engine's linears as they are: ``mkldnn._linear_pointwise`` on a packed weight
# is lowered only for frozen constants (an AssertionError in mkldnn_lowerings.linear_unary), and the packed
# weight is an opaque mkldnn tensor. So inside compiled regions each linear is this custom op: its argument
# is the module's ordinary bfloat16 weight (a graph input, so all 30 layers share one graph), and it calls
# oneDNN on the packed copy the engine made (found by the weight's address): the same kernel as eager.
_PACKED: dict[int, torch.Tensor] = {}


@torch.library.custom_op("spike::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[weight.data_ptr()], None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _lin(module, x: torch.Tensor) -> torch.Tensor:
    return packed_linear(x, module.weight)


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    return _lin(mlp.down_proj, torch.nn.functional.silu(_lin(mlp.gate_proj, x)) * _lin(mlp.up_proj, x))



def _pre_norm(layer, hidden: torch.Tensor) -> torch.Tensor:
    return layer.input_layernorm(hidden)


def _pre_qkv(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = _lin(attn.q_proj, x).view(shape).transpose(1, 2)
    k = _lin(attn.k_proj, x).view(shape).transpose(1, 2)
    v = _lin(attn.v_proj, x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _post_mlp(layer, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    hidden = residual + attn_out
    return hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden))


def _post_o_mlp(layer, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    return _post_mlp(layer, residual, _lin(layer.self_attn.o_proj, attn_out))


# "stack": all 30 layers as one compiled graph, one call per step; the cache write and the packed attention
# are one opaque custom op per layer, handed the cache view, mask and kwargs here for the forward.
_STACK: dict = {}


@torch.library.custom_op("spike::attend", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn, cache, extra = _STACK["attn"][layer_idx], _STACK["cache"], _STACK["extra"]
    if cache is not None:
        k, v = cache.update(k, v, layer_idx, kwargs=extra)
    interface = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation]
    out, _ = interface(attn, q, k, v, _STACK["mask"], dropout=0.0, scaling=attn.scaling, **extra)
    return out.reshape(q.shape[0], q.shape[2], -1).clone()  # [B, T, H*D]


@attend.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1] * q.shape[3]))


def _stack(layers, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    for i, layer in enumerate(layers):
        q, k, v = _pre_qkv(layer, hidden, cos, sin)
        hidden = _post_o_mlp(layer, hidden, attend(q, k, v, i))
    return hidden


class Regions:
    """The compiled regions, shared by every layer (its modules are inputs, so one graph serves all 30)."""

    def __init__(self) -> None:
        def compiled(fn):
            return torch.compile(fn, dynamic=True)

        self.pre_norm, self.post_mlp = compiled(_pre_norm), compiled(_post_mlp)
        self.pre_qkv, self.post_o_mlp = compiled(_pre_qkv), compiled(_post_o_mlp)
        self.stack = compiled(_stack)


def _mlp_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                 position_embeddings=None, **kwargs):
    regions = self._spike_regions
    attn_out, _ = self.self_attn(hidden_states=regions.pre_norm(self, hidden_states),
                                 attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                 use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    return regions.post_mlp(self, hidden_states, attn_out)


def _layer_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                   position_embeddings=None, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    regions, attn = self._spike_regions, self.self_attn
    cos, sin = position_embeddings
    q, k, v = regions.pre_qkv(self, hidden_states, cos, sin)
    extra = {"position_ids": position_ids, "use_cache": use_cache, **kwargs}  # what LlamaAttention passes on
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx, kwargs=extra)
    interface = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation]
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **extra)
    out = out.reshape(*hidden_states.shape[:-1], -1)
    return regions.post_o_mlp(self, hidden_states, out)


def _stack_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                   position_embeddings=None, **kwargs):
    """Layer 0 runs every layer (one compiled call); layers 1.. pass their input through."""
    if self.self_attn.layer_idx:
        return hidden_states
    layers = self._spike_layers
    _STACK.update(attn=[layer.self_attn for layer in layers], cache=cache, mask=attention_mask,
                  extra={"position_ids": position_ids, "use_cache": use_cache, **kwargs})
    try:
        return self._spike_regions.stack(layers, hidden_states, *position_embeddings)
    finally:
        _STACK.clear()


def set_mode(model, mode: str, regions: Regions) -> None:
    """Route every decoder layer's forward through ``mode``'s compiled regions ("eager": the model's own)."""
    forward = {"mlp": _mlp_forward, "layer": _layer_forward, "stack": _stack_forward}.get(mode)
    for module in model.modules():
        if hasattr(module, "_packed_weight"):
            _PACKED[module.weight.data_ptr()] = module._packed_weight
    for layer in model.model.layers:
        layer.__dict__.pop("forward", None)
        if forward is not None:
            object.__setattr__(layer, "_spike_regions", regions)
            object.__setattr__(layer, "_spike_layers", model.model.layers)
            layer.forward = types.MethodType(forward, layer)


# -- the engine ---------------------------------------------------------------------------------------------


def _client():
    from server.engine.cpu_linear import resolve_dtype
    from server.engine.engine import EngineConfig
    from server.engine.model import load_base_model
    from server.frontend.local_client import LocalEngineClient

    base = load_base_model("default", resolve_dtype("auto", "cpu"), "cpu")
    return base, LocalEngineClient(base, EngineConfig(max_batch_size=33, kv_cache_bytes=1 << 30))


def _states(streams: int, new_tokens: int, seed: int = 10):
    from server.bench.kv import _ids
    from server.engine.sequence import SamplingParams
    from server.frontend.request_state import RequestState

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [RequestState(_ids(seed + i, 32), params, None) for i in range(streams)]


def decode(client, streams: int, new_tokens: int) -> float:
    from server.bench.offline import engine_decode_tokens_per_s

    return engine_decode_tokens_per_s(client, _states(streams, new_tokens))


def greedy(base, streams: int, new_tokens: int) -> list[list[int]]:
    """A fresh engine each time: a second run of the same prompts in one engine would find them in its
    prefix cache, skip their prefill and lay its steps out differently (bfloat16 then differs by itself)."""
    from server.engine.engine import EngineConfig
    from server.frontend.local_client import LocalEngineClient

    client = LocalEngineClient(base, EngineConfig(max_batch_size=33, kv_cache_bytes=1 << 28))
    states = _states(streams, new_tokens, seed=500)
    for state in states:
        client.submit(state)
    client.run_until_idle()
    return [list(s.output_ids) for s in states]


def timings(base, client, rounds: int, new_tokens: int, modes: tuple[str, ...] = MODES) -> None:
    regions = Regions()
    for mode in modes:  # warm-up: compiles each mode's graphs (T > 1 prefill, T = 32, T = 1 decode)
        set_mode(base.model, mode, regions)
        decode(client, 32, 4)
        decode(client, 1, 4)
    results: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for streams in (32, 1):
            for mode in modes:
                set_mode(base.model, mode, regions)
                tps = decode(client, streams, new_tokens if streams > 1 else 2 * new_tokens)
                results.setdefault((mode, streams), []).append(tps)
                _emit({"kind": "decode", "round": r, "mode": mode, "streams": streams,
                       "decode_tok_s": round(tps, 1), "step_ms": round(streams * 1e3 / tps, 2)})
    for (mode, streams), values in results.items():
        eager = statistics.median(results[("eager", streams)])
        _emit({"kind": "decode-median", "mode": mode, "streams": streams,
               "step_ms": round(streams * 1e3 / statistics.median(values), 2),
               "step_ratio_vs_eager": round(eager / statistics.median(values), 3)})
    set_mode(base.model, "eager", regions)


def equality(base, new_tokens: int) -> None:
    regions = Regions()
    set_mode(base.model, "eager", regions)
    reference = greedy(base, 32, new_tokens)
    for mode in MODES:
        set_mode(base.model, mode, regions)
        got = greedy(base, 32, new_tokens)
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                 for x, y in zip(reference, got)]
        diverged = [i for i in first if i is not None]
        _emit({"kind": "equal", "mode": mode, "streams": 32, "tokens": new_tokens,
               "rows_equal": sum(i is None for i in first), "rows": len(first),
               "first_divergence_min": min(diverged) if diverged else None})
    set_mode(base.model, "eager", regions)


def compile_cost(mode: str) -> dict:
    """In this (fresh) process: seconds of the first steps (a prefill, a 32-row decode, a 1-row decode) in
    ``mode`` minus the same steps in eager after it."""
    torch.set_num_threads(1)
    base, client = _client()
    regions = Regions()
    decode(client, 2, 2)  # eager warm-up: the engine's own first-call costs
    out = {}
    for m in (mode, "eager"):
        set_mode(base.model, m, regions)
        start = time.perf_counter()
        decode(client, 32, 2)
        decode(client, 1, 2)
        out[m] = time.perf_counter() - start
    return {"first_steps_s": round(out[mode], 2), "eager_same_steps_s": round(out["eager"], 2),
            "compile_s": round(out[mode] - out["eager"], 2)}


def compile_costs() -> None:
    for mode in MODES[1:]:
        with tempfile.TemporaryDirectory(prefix="inductor-spike-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(REPO_ROOT)}
            for state in ("cold", "warm"):
                res = subprocess.run([sys.executable, __file__, "--compile-cost", mode], env=env,
                                     capture_output=True, text=True, check=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                _emit({"kind": "compile", "mode": mode, "cache": state, **row})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument("--only", default="micro,equal,decode,compile")
    parser.add_argument("--emulate-casts", action="store_true",
                        help="inductor's emulate_precision_casts: round where eager rounds to bfloat16")
    parser.add_argument("--modes", default=",".join(MODES), help="modes to time (decode), eager first")
    parser.add_argument("--compile-cost", choices=MODES[1:], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch._inductor.config.emulate_precision_casts = args.emulate_casts
    if args.compile_cost:
        print(json.dumps(compile_cost(args.compile_cost)))
        return
    only = args.only.split(",")
    _emit({"kind": "machine", "cpu": _cpu_name(), "torch": torch.__version__,
           "emulate_precision_casts": args.emulate_casts})
    if "micro" in only:
        micro(args.rounds)
    if "equal" in only or "decode" in only:
        with tempfile.TemporaryDirectory(prefix="inductor-spike-main-") as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            base, client = _client()
            if "equal" in only:
                equality(base, args.check_tokens)
            if "decode" in only:
                timings(base, client, args.rounds, args.new_tokens, tuple(args.modes.split(",")))
    if "compile" in only:
        compile_costs()


if __name__ == "__main__":
    main()
