"""Pure-torch references of every op parallax runs on its hot path.

Each function here has the same signature as its CUDA twin in ``parallax.ops`` (csrc/).
They are the CPU path, the fallback when the extension is not built, and the oracle the
kernel tests compare against. Shapes use B = batch, T = tokens, H = heads, D = head dim,
S = KV-cache length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim. x: (..., d) any float dtype; weight: (d,). Computes in fp32."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)   # one fused op, same math
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``residual = x + residual; out = rms_norm(residual)``. Returns (out, residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by position (HF "rotate_half" layout: pairs are (i, i + D/2)).

    q: (B, T, Hq, D), k: (B, T, Hk, D); cos, sin: (B, T, D/2) float32.
    Returns new (q, k) of the input dtype (the CUDA twin rotates in place and returns them).
    """
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Causal self-attention over a fresh prompt, GQA-aware.

    q: (B, Hq, T, D); k, v: (B, Hk, T, D) with Hq % Hk == 0. Returns (B, Hq, T, D).
    Right padding needs no mask: a padded tail never influences earlier positions.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence against its cached keys, GQA-aware.

    q: (B, Hq, D); k_cache, v_cache: (B, Hk, S, D); context_lens: (B,) int32, the number
    of valid cache positions per sequence (the new token's key is already written).
    Returns (B, Hq, D).
    """
    b, hq, d = q.shape
    hk = k_cache.shape[1]
    # Only read the cache up to the longest live sequence; mask the rest per sequence.
    s = int(context_lens.max())
    k, v = k_cache[:, :, :s], v_cache[:, :, :s]
    qg = q.view(b, hk, hq // hk, d)                                   # (B, Hk, G, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale   # (B, Hk, G, S)
    if int(context_lens.min()) != s:
        pos = torch.arange(s, device=q.device)
        pad = pos[None, :] >= context_lens[:, None].to(pos.dtype)      # (B, S)
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(b, hq, d)                     # (B, Hq, D)


def decode_attention_with_kvcache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  cos: torch.Tensor, sin: torch.Tensor,
                                  context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode step of attention with the cache update folded in (the contract of
    flash-attn's ``flash_attn_with_kvcache``): rotate q and the new k, write k and v into
    slot ``context_lens - 1`` of each sequence's cache, attend over ``[0, context_lens)``.

    q: (B, Hq, D); k, v: (B, Hk, D) the new token's key and value, not yet rotated;
    k_cache, v_cache: (B, Hk, S, D), written in place; cos, sin: (B, D/2) float32;
    context_lens: (B,) int32, including the new token. Returns (B, Hq, D).
    """
    q, k = rotary_embedding(q[:, None], k[:, None], cos[:, None], sin[:, None])
    write_kv_cache(k[:, 0], v, k_cache, v_cache, context_lens)
    return decode_attention(q[:, 0], k_cache, v_cache, context_lens, scale)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, context_lens: torch.Tensor) -> None:
    """Store one token's k, v (B, Hk, D) at slot ``context_lens - 1`` of caches (B, Hk, S, D)."""
    rows = torch.arange(k.shape[0], device=k.device)
    slots = (context_lens - 1).long()
    k_cache[rows, :, slots] = k
    v_cache[rows, :, slots] = v


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: x (..., 2N) = [gate | up] -> silu(gate) * up, (..., N)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias. x: (..., K); weight: (N, K)."""
    return F.linear(x, weight, bias)


def linear_packed(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W stored as 32-column panels of W^T: packed (N/32, K, 32),
    ``packed[n // 32, k, n % 32] = W[n, k]`` (the CPU kernel's layout, ops/cpu.py).
    One batched matmul over the panels: the weight is read in place, never copied."""
    p, k, width = packed.shape
    rows = x.reshape(-1, k)
    y = torch.matmul(rows, packed)                                   # (N/32, M, 32)
    y = y.permute(1, 0, 2).reshape(*x.shape[:-1], p * width)         # (..., N)
    return y + bias if bias is not None else y


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8 matmul: y = x @ (qweight * scales[:, None]).T + bias.

    x: (..., K) float; qweight: (N, K) int8; scales: (N,) of x's dtype (per output channel).
    """
    y = F.linear(x, qweight.to(x.dtype)) * scales.to(x.dtype)
    return y + bias if bias is not None else y


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8. weight: (N, K) float -> (qweight int8 (N, K), scales (N,))."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(weight.dtype)
