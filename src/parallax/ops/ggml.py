"""llama.cpp's CPU arithmetic, op for op: ``PARALLAX_NUMERICS=ggml``.

With 8-bit activations a one-ulp difference anywhere can move an activation code, and the
difference grows from layer to layer: greedy text then parts from llama.cpp's after a few
dozen tokens, as llama.cpp's own AVX2 and AVX-512 builds part from each other (measured on
SmolLM2 Q8_0: 4 of 8 prompts within 32 tokens). This mode computes what llama.cpp 0.3.x
computes on the CPU, bit for bit, for the build matching the kernel variant (avx512*:
llama.cpp's AVX-512 build; avx2: its AVX2 build; generic: ggml's scalar fallbacks), so
that parallax's greedy text equals llama.cpp's on the same GGUF file:

- Q8_0 matmuls: x in ggml's block_q8_0, ggml's lane order (ops.cpu.q8_0_linear_ggml);
  other block types take the q8 kernels (ggml's blocks, not its order) and float weights
  parallax's own matmuls, so bit-equality holds for Q8_0 files;
- RMS_NORM then MUL, SWIGLU and ROPE as ggml computes them (csrc/cpu/ggml_pointwise.c);
- keys and values rounded to fp16 as llama.cpp's default F16 cache holds them, attention
  as its CPU flash attention over that cache (csrc/cpu/ggml_attention.c), q and k in
  GGUF's head-dim order, which the GGUF loader undoes for HF's.

Past 256 cached tokens llama.cpp's decode splits the keys over its threads, and its result
depends on that count: the mode reproduces it for llama.cpp running on as many threads as
parallax (``torch.get_num_threads()``) with a context size that is a multiple of 256 (its
default 4096; llama-cpp-python's 512). Not reproduced, so the mode refuses such models: rope
scaling or frequency factors, sliding windows, soft-capping, biases, non-SiLU gates,
tensor parallelism (its all-reduce adds partial sums; pipeline stages are fine). The mode is for
comparing with llama.cpp, not for speed: it runs the module path (no fused layers) and
attention one sequence at a time, and LLM turns prefix caching off (llama.cpp computes each
prompt in full; prefill chunks of ``max_num_batched_tokens``, 512 by default, are its
default ubatches).
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import ParallaxError
from . import cpu as _cpu
from .reference import write_paged_kv


@functools.cache
def enabled() -> bool:
    """Whether ``PARALLAX_NUMERICS`` is ``ggml`` (read once; ``enabled.cache_clear()``
    re-reads it). ``parallax`` (default) is parallax's own arithmetic."""
    mode = (os.environ.get("PARALLAX_NUMERICS") or "parallax").strip().lower()
    if mode not in ("parallax", "ggml"):
        raise ParallaxError(f"PARALLAX_NUMERICS={mode!r}: use parallax (default) or ggml")
    if mode == "ggml" and _cpu.kernels() is None:
        raise ParallaxError("PARALLAX_NUMERICS=ggml needs the CPU kernels, which did not build: "
                            f"{_cpu.build_error()}")
    return mode == "ggml"


def check_model(cfg, device: torch.device | str, tp_size: int = 1) -> None:
    """Raise ParallaxError when ``cfg`` (a ModelConfig), the device or the layout has what
    this mode does not reproduce (pipeline stages do not change a layer's arithmetic; a
    tensor-parallel all-reduce adds partial sums, which llama.cpp does not)."""
    why = []
    if tp_size > 1:
        why.append(f"tp={tp_size} (its all-reduce sums partial products; use tp=1, any pp)")
    if cfg.architecture not in ("llama", "mistral"):
        why.append(f"the {cfg.architecture} family (llama and mistral are reproduced)")
    if torch.device(device).type != "cpu":
        why.append(f"device {device} (the mode is CPU only)")
    if cfg.rope_scaling is not None or cfg.rope_freq_factors is not None:
        why.append("rope scaling or frequency factors")
    if any(cfg.layer_window(i) is not None for i in range(cfg.num_layers)):
        why.append("sliding-window layers")
    if cfg.hidden_act != "silu":
        why.append(f"the {cfg.hidden_act} gate")
    if cfg.attention_bias or cfg.mlp_bias or cfg.o_proj_bias:
        why.append("projection biases")
    if why:
        raise ParallaxError("PARALLAX_NUMERICS=ggml reproduces llama.cpp's plain Llama layers on "
                            f"the CPU; this model has {', '.join(why)}. Unset PARALLAX_NUMERICS.")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS_NORM(x) * weight: x (..., D), weight (D,) float32 -> (..., D)."""
    return _cpu.ggml_rms_norm(x.contiguous(), weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMS_NORM(x + residual) * weight, x + residual): llama.cpp's ADD, then its norm."""
    total = x + residual
    return _cpu.ggml_rms_norm(total, weight, eps), total


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SWIGLU: x (..., 2N) = [gate | up] float32 -> silu(gate) * up, (..., N)."""
    return _cpu.ggml_swiglu(x.contiguous())


@functools.cache
def _gguf_order(d: int) -> torch.Tensor:
    """(D,) the HF head dim at each GGUF head dim: GGUF's 2i is HF's i, 2i + 1 is i + D/2."""
    j = torch.arange(d)
    return j // 2 + (j % 2) * (d // 2)


KV_PAD = 256   # llama.cpp pads the KV length it attends over to a multiple of this


def kv_padded(n_ctx: int) -> int:
    """llama.cpp's attended KV length for a sequence of ``n_ctx`` cached tokens (its context
    size a multiple of KV_PAD and at least this)."""
    return -(-n_ctx // KV_PAD) * KV_PAD


def paged_attention_with_kvcache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
                                 scale: float, rope_base: float) -> torch.Tensor:
    """ops.paged_attention_with_kvcache as llama.cpp computes it: ROPE of q and k at
    ``meta.positions``, k and v rounded to fp16 into the (fp32) paged caches, then each
    sequence's attention over its cached keys (ggml's flash attention, the algorithm of a
    call of all the step's rows). q (T, Hq, D), k, v (T, Hk, D) -> (T, Hq, D) float32."""
    pos = meta.positions.to(torch.int32)
    q = _cpu.ggml_rope(q.contiguous(), pos, rope_base)
    k = _cpu.ggml_rope(k.contiguous(), pos, rope_base).half().float()
    v = v.half().float()
    write_paged_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    order = _gguf_order(q.shape[-1])
    q = q[..., order].contiguous()
    bs = k_cache.shape[2]
    out = torch.empty_like(q)
    threads = torch.get_num_threads()   # llama.cpp's, when it runs with parallax's count
    starts = meta.query_start_loc.tolist()
    for i, n_ctx in enumerate(meta.context_lens.tolist()):
        a, b = starts[i], starts[i + 1]
        blocks = meta.block_tables[i, :-(-n_ctx // bs)].long()
        # (blocks, Hk, bs, D) -> this sequence's (n_ctx, Hk, D), in position order
        keys, values = (c[blocks].transpose(1, 2).flatten(0, 1)[:n_ctx] for c in (k_cache, v_cache))
        out[a:b] = _cpu.ggml_attention(q[a:b], keys[..., order].contiguous(), values.contiguous(),
                                       pos[a:b], scale, q.shape[0], kv_padded(n_ctx), threads)
    return out
