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


def first_block_read(context_len: int, new_tokens: int, block_size: int,
                     window: int | None) -> int:
    """The first block-table entry a sequence's attention reads: 0, or with a sliding
    ``window`` the block holding the first key its first new token sees (the entries before
    it are never read; the engine may have freed their blocks)."""
    if window is None:
        return 0
    return max(0, context_len - new_tokens + 1 - window) // block_size


def check_paged_metadata(slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                         num_blocks: int, block_size: int, window: int | None = None) -> None:
    """Raise ParallaxError unless every slot, length and needed block id is in range
    (the paged kernels' input contract; nothing is written when this fails). With a
    ``window``, entries before ``first_block_read`` are not needed and not checked."""
    from ..errors import ParallaxError
    t, b = slot_mapping.shape[0], context_lens.shape[0]
    qsl = query_start_loc.tolist()
    if len(qsl) != b + 1 or qsl[0] != 0 or qsl[-1] != t:
        raise ParallaxError(f"query_start_loc must run from 0 to the {t} tokens over {b} "
                            f"sequences, got {qsl[:8]}")
    cap = num_blocks * block_size
    if t and (int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= cap):
        raise ParallaxError(f"slot_mapping has slots outside the cache's [0, {cap}): "
                            f"{slot_mapping.min().item()}..{slot_mapping.max().item()}")
    lens, n = context_lens.tolist(), [qsl[i + 1] - qsl[i] for i in range(b)]
    for i in range(b):
        if n[i] < 1 or lens[i] < n[i]:
            raise ParallaxError(f"sequence {i}: context_lens {lens[i]} with {n[i]} new tokens; "
                                "each sequence needs >= 1 new token and context_lens >= that")
        need = -(-lens[i] // block_size)
        if need > block_tables.shape[1]:
            raise ParallaxError(f"sequence {i}: {lens[i]} tokens need {need} blocks but the "
                                f"block table has {block_tables.shape[1]} columns")
        ids = block_tables[i, first_block_read(lens[i], n[i], block_size, window):need]
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
            raise ParallaxError(f"sequence {i}: block ids {ids.tolist()[:8]} outside "
                                f"[0, {num_blocks})")


def write_paged_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new tokens' k, v (T, Hk, D) into paged caches (N, Hk, bs, D) at
    ``slot_mapping`` (T,): slot s is row s % bs of block s // bs."""
    bs = k_cache.shape[2]
    slots = slot_mapping.long()
    blk, off = slots // bs, slots % bs
    k_cache[blk, :, off] = k
    v_cache[blk, :, off] = v


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Attention of a flat batch of new tokens over paged caches, causal, GQA-aware.

    q: (T, Hq, D), rotated; k_cache, v_cache: (N, Hk, bs, D) with the new tokens already
    written; block_tables: (B, max_blocks) int32; context_lens: (B,) int32, tokens in the
    cache per sequence (new ones included); query_start_loc: (B+1,) int32, sequence b's new
    tokens are q[qsl[b]:qsl[b+1]], the last ones of its context. Returns (T, Hq, D).
    window: a token at position p attends only to positions > p - window (HF's sliding
    window). softcap: scores s (after ``scale``) become softcap * tanh(s / softcap) (Gemma 2).
    """
    n_blocks, hk, bs, d = k_cache.shape
    out = torch.empty_like(q)
    qsl, lens = query_start_loc.tolist(), context_lens.tolist()
    for b in range(len(lens)):
        s, e, length = qsl[b], qsl[b + 1], lens[b]
        first = first_block_read(length, e - s, bs, window)
        blocks = block_tables[b, first:-(-length // bs)].long()
        start = first * bs                                                  # first key read
        k = k_cache[blocks].transpose(1, 2).reshape(-1, hk, d)[:length - start]  # (L, Hk, D)
        v = v_cache[blocks].transpose(1, 2).reshape(-1, hk, d)[:length - start]
        pos = torch.arange(length - (e - s), length, device=q.device)       # new tokens' positions
        kpos = torch.arange(start, length, device=q.device)[None, :]
        mask = kpos <= pos[:, None]                                         # (n, L)
        if window is not None:
            mask &= kpos > pos[:, None] - window
        qb, kb, vb = q[s:e].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if softcap is None:
            o = F.scaled_dot_product_attention(
                qb[None], kb[None], vb[None], attn_mask=mask, scale=scale,
                enable_gqa=q.shape[1] != hk)[0]                             # (Hq, n, D)
        else:   # SDPA has no soft-capping: the scores spelled out
            rep = q.shape[1] // hk
            kb, vb = kb.repeat_interleave(rep, 0), vb.repeat_interleave(rep, 0)
            scores = (qb @ kb.transpose(1, 2)).float() * scale               # (Hq, n, L)
            scores = softcap * torch.tanh(scores / softcap)
            scores = scores.masked_fill(~mask, float("-inf"))
            o = torch.softmax(scores, dim=-1).to(vb.dtype) @ vb
        out[s:e] = o.transpose(0, 1)
    return out


def paged_attention_with_kvcache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 cos: torch.Tensor, sin: torch.Tensor,
                                 slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                                 context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                 scale: float, window: int | None = None,
                                 softcap: float | None = None) -> torch.Tensor:
    """One step of paged attention with rotary and the cache write folded in.

    q: (T, Hq, D); k, v: (T, Hk, D) the new tokens' keys and values, not yet rotated;
    cos, sin: (T, D/2) float32; slot_mapping: (T,) each new token's cache slot; the rest as
    in ``paged_attention``. Writes k (rotated) and v into the caches, returns (T, Hq, D).
    Raises ParallaxError (before writing) on a slot, length or block id out of range.
    """
    check_paged_metadata(slot_mapping, block_tables, context_lens, query_start_loc,
                         k_cache.shape[0], k_cache.shape[2], window)
    q, k = rotary_embedding(q[None], k[None], cos[None], sin[None])
    write_paged_kv(k[0], v, k_cache, v_cache, slot_mapping)
    return paged_attention(q[0], k_cache, v_cache, block_tables, context_lens,
                           query_start_loc, scale, window, softcap)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x (M, N) -> (M,) int64: the first index of each row's largest value (a NaN counts as
    the largest), torch.argmax's rule; greedy sampling's pick."""
    return x.argmax(dim=-1)


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


# llama.cpp block formats kept quantized on the CPU: bytes per block of 32 weights.
GGUF_BLOCK = 32
# kind -> (weights, bytes) of one block (K-quants: one super-block of 8 sub-blocks of 32).
GGUF_BLOCKS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q4_k": (256, 144),
               "q6_k": (256, 210)}
GGUF_BLOCK_BYTES = {kind: nbytes for kind, (n, nbytes) in GGUF_BLOCKS.items() if n == 32}


def gguf_k(kind: str, qweight: torch.Tensor) -> int:
    """K (weights per row) of a (N, bytes per row) uint8 matrix of ``kind`` blocks."""
    n, nbytes = GGUF_BLOCKS[kind]
    return qweight.shape[1] // nbytes * n


def q8_0_dequantize(qweight: torch.Tensor) -> torch.Tensor:
    """Q8_0 rows -> fp32. qweight: (N, K/32*34) uint8, each row K/32 blocks of
    (fp16 d, 32 int8 q) as in a GGUF file -> (N, K) float32 = q * d."""
    n = qweight.shape[0]
    blocks = qweight.reshape(n, -1, 34)                                    # (N, K/32, 34)
    d = blocks[..., :2].contiguous().view(torch.float16).float()           # (N, K/32, 1)
    q = blocks[..., 2:].contiguous().view(torch.int8).float()              # (N, K/32, 32)
    return (q * d).reshape(n, -1)


def q4_0_dequantize(qweight: torch.Tensor) -> torch.Tensor:
    """Q4_0 rows -> fp32. qweight: (N, K/32*18) uint8, each row K/32 blocks of (fp16 d,
    16 bytes: weight i < 16 in the low nibble of byte i, 16 + i in its high nibble)
    -> (N, K) float32 = (q - 8) * d."""
    n = qweight.shape[0]
    blocks = qweight.reshape(n, -1, 18)                                    # (N, K/32, 18)
    d = blocks[..., :2].contiguous().view(torch.float16).float()           # (N, K/32, 1)
    qs = blocks[..., 2:].to(torch.int16)                                   # (N, K/32, 16)
    q = torch.cat([qs & 15, qs >> 4], dim=-1).float() - 8                  # (N, K/32, 32)
    return (q * d).reshape(n, -1)


def q4_1_parts(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 rows split as ggml's dot uses them: (q * d (N, K/32, 32), m (N, K/32)) float32."""
    n = qweight.shape[0]
    blocks = qweight.reshape(n, -1, 20)                                    # (N, K/32, 20)
    d = blocks[..., :2].contiguous().view(torch.float16).float()           # (N, K/32, 1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()          # (N, K/32, 1)
    qs = blocks[..., 4:].to(torch.int16)                                   # (N, K/32, 16)
    q = torch.cat([qs & 15, qs >> 4], dim=-1).float()                      # (N, K/32, 32)
    return q * d, m.squeeze(-1)


def q4_1_dequantize(qweight: torch.Tensor) -> torch.Tensor:
    """Q4_1 rows -> fp32. qweight: (N, K/32*20) uint8, each row K/32 blocks of (fp16 d,
    fp16 m, 16 bytes of nibbles as in Q4_0) -> (N, K) float32 = q * d + m."""
    qd, m = q4_1_parts(qweight)
    return (qd + m.unsqueeze(-1)).reshape(qweight.shape[0], -1)


def _half(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian fp16 bytes -> (..., 1) float32."""
    return b.contiguous().view(torch.float16).float()


def q4_k_dequantize(qweight: torch.Tensor) -> torch.Tensor:
    """Q4_K rows -> fp32 (gguf.quants.Q4_K's layout). qweight: (N, K/256*144) uint8, each
    super-block (fp16 d, fp16 dmin, 12 bytes of 6-bit scales sc[8] / mins m[8], 128 bytes of
    nibbles: sub-block j in bytes 32*(j//2).., low nibble for even j) -> (N, K) float32 =
    d * sc[j] * q - dmin * m[j]."""
    n = qweight.shape[0]
    blocks = qweight.reshape(n, -1, 144)                                   # (N, K/256, 144)
    d, dmin = _half(blocks[..., 0:2]), _half(blocks[..., 2:4])             # (N, K/256, 1)
    s = blocks[..., 4:16].to(torch.int32)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]                   # (N, K/256, 4)
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 2) & 48)], dim=-1).float()    # (N, K/256, 8)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 2) & 48)], dim=-1).float()
    qs = blocks[..., 16:].to(torch.int32).reshape(n, -1, 4, 1, 32)         # 4 pairs of subs
    q = torch.cat([qs & 15, qs >> 4], dim=-2).reshape(n, -1, 8, 32).float()
    w = (d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)
    return w.reshape(n, -1)


def q6_k_dequantize(qweight: torch.Tensor) -> torch.Tensor:
    """Q6_K rows -> fp32 (gguf.quants.Q6_K's layout). qweight: (N, K/256*210) uint8, each
    super-block (ql[128] low 4 bits, qh[64] high 2 bits, int8 scales[16], fp16 d) ->
    (N, K) float32 = d * scales[i // 16] * (q - 32)."""
    n = qweight.shape[0]
    blocks = qweight.reshape(n, -1, 210)                                   # (N, K/256, 210)
    ql = blocks[..., :128].to(torch.int32).reshape(n, -1, 2, 1, 64)
    ql = torch.cat([ql & 15, ql >> 4], dim=-2).reshape(n, -1, 2, 4, 32)    # (.., half, t, 32)
    qh = blocks[..., 128:192].to(torch.int32).reshape(n, -1, 2, 1, 32)
    qh = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=-2)          # (.., half, t, 32)
    q = ((ql | (qh << 4)) - 32).reshape(n, -1, 16, 16).float()
    scales = blocks[..., 192:208].contiguous().view(torch.int8).float()    # (N, K/256, 16)
    d = _half(blocks[..., 208:210])                                        # (N, K/256, 1)
    return ((d * scales).unsqueeze(-1) * q).reshape(n, -1)


def q8_0_linear(x: torch.Tensor, qweight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W in Q8_0 rows (see q8_0_dequantize), dequantised by torch.
    x: (..., K) float32 with K = qweight.shape[1] / 34 * 32 -> (..., N) float32."""
    return F.linear(x, q8_0_dequantize(qweight).to(x.dtype), bias)


def q4_0_linear(x: torch.Tensor, qweight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """q8_0_linear for Q4_0 rows (see q4_0_dequantize): K = qweight.shape[1] / 18 * 32."""
    return F.linear(x, q4_0_dequantize(qweight).to(x.dtype), bias)


def q4_1_linear(x: torch.Tensor, qweight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """q8_0_linear for Q4_1 rows (see q4_1_dequantize): K = qweight.shape[1] / 20 * 32."""
    return F.linear(x, q4_1_dequantize(qweight).to(x.dtype), bias)


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations as llama.cpp's 8-bit blocks (ggml's block_q8_0, by its x86 quantize_row_q8_0):
    x (..., K) float32, K a multiple of 32 -> (codes (..., K) int8, scales (..., K/32) float32)
    with, per block of 32, amax = max |x|, scale = fp16(amax / 127) (the block's fp16 d,
    rounded to nearest even, as a float32), code = round-half-even(x * (127 / amax)) (0 where
    amax is 0). gguf-py's quants.quantize (ggml's reference rule) gives the same scales; its
    codes (x * (1 / (amax / 127)), ties away from zero) differ only where x * 127 / amax is
    within an ulp or two of a half. |x - code * scale| <= amax / 254 (1 + 2^-10)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, GGUF_BLOCK)               # (..., K/32, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)                         # (..., K/32, 1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv).to(torch.int8)
    return q.reshape(x.shape), (amax / 127.0).half().float().squeeze(-1)


def quantize_q8_1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations as ggml's block_q8_1 (its x86 quantize_row_q8_1, what llama.cpp's Q4_1 dot
    takes): quantize_q8's codes and fp16 scales, and per block s = fp16(amax / 127 * sum of
    the codes), the scale taken in fp32 before its fp16 rounding, as ggml computes it:
    x (..., K) float32 -> (codes (..., K) int8, scales, s (..., K/32) float32)."""
    q, d = quantize_q8(x)
    amax = x.float().reshape(*x.shape[:-1], -1, GGUF_BLOCK).abs().amax(dim=-1)
    sums = q.reshape(*q.shape[:-1], -1, GGUF_BLOCK).sum(dim=-1, dtype=torch.int32).float()
    return q, d, (amax / 127.0 * sums).half().float()


QK_K = 256   # elements per K-quant super-block (and per block_q8_K)


def quantize_q8_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations as ggml's block_q8_K (quantize_row_q8_K_ref, which its x86 build runs;
    what llama.cpp's Q4_K / Q6_K dots take), per super-block of 256: max = the first x of
    largest |x|, iscale = -127 / max (fp32), code = min(127, round-half-even(iscale * x)),
    scale d = 1 / iscale (fp32, not fp16; negative where max > 0, the codes then carry the
    opposite sign), bsums = the codes' sums per 16; an all-zero block: d 0, codes 0.
    x (..., K) float32, K a multiple of 256 -> (codes (..., K) int8, d (..., K/256) float32,
    bsums (..., K/16) float32)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, QK_K)                     # (..., K/256, 256)
    mag = blocks.abs()
    amax = mag.amax(dim=-1, keepdim=True)
    pos = torch.arange(QK_K).expand_as(blocks)
    first = torch.where(mag == amax, pos, QK_K).amin(dim=-1, keepdim=True)
    big = blocks.gather(-1, first.clamp(max=QK_K - 1))                     # (..., K/256, 1)
    nonzero = amax > 0
    # tensor / tensor: one correctly rounded division (a Python number over a tensor is a
    # reciprocal times the number in torch, two roundings)
    iscale = torch.where(nonzero, torch.full_like(big, -127.0) / torch.where(nonzero, big, 1.0),
                         0.0)
    q = torch.round(blocks * iscale).clamp(max=127).to(torch.int8)
    d = torch.where(nonzero, torch.ones_like(iscale) / torch.where(nonzero, iscale, 1.0), 0.0)
    bsums = q.reshape(*q.shape[:-2], -1, 16).sum(dim=-1, dtype=torch.int32).float()
    return q.reshape(x.shape), d.squeeze(-1), bsums.reshape(*x.shape[:-1], -1)


# The activation blocks each weight kind's dot takes in llama.cpp (ggml's vec_dot_type).
ACTIVATION_KIND = {"q8_0": "q8_0", "q4_0": "q8_0", "q4_1": "q8_1", "q4_k": "q8_k",
                   "q6_k": "q8_k"}


def quantize_act(kind: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., K) float32 as activation blocks of ``kind`` ("q8_0", "q8_1", "q8_k") ->
    (codes (..., K) int8, scales, sums) float32: scales (..., K/32) (q8_k: K/256); sums
    (..., K/32) the code sums (q8_0), block_q8_1's s (q8_1), or (..., K/16) the bsums (q8_k).
    The twin of csrc/cpu/q8_act.c's parallax_quantize_act_f32."""
    if kind == "q8_1":
        return quantize_q8_1(x)
    if kind == "q8_k":
        return quantize_q8_k(x)
    if kind != "q8_0":
        raise ValueError(f"activation kind {kind!r}: use q8_0, q8_1 or q8_k")
    q, d = quantize_q8(x)
    return q, d, q.reshape(*q.shape[:-1], -1, GGUF_BLOCK).sum(dim=-1, dtype=torch.int32).float()


def dequantize_q8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Activation codes and their block scales (quantize_q8's, or quantize_q8_k's: the block
    length is K / scales.shape[-1]) back to float32 values, (..., K)."""
    blocks = q.float().reshape(*q.shape[:-1], scales.shape[-1], -1)
    return (blocks * scales.unsqueeze(-1)).reshape(q.shape)


def q8_activations(kind: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (..., K) rounded to the 8-bit blocks a ``kind`` weight's dot takes (ACTIVATION_KIND)
    -> (their values (..., K) float32, for Q4_1 block_q8_1's s (..., K/32), else None)."""
    act = ACTIVATION_KIND[kind]
    q, scales, sums = quantize_act(act, x)
    return dequantize_q8(q, scales), sums if act == "q8_1" else None


_DEQUANTIZE = {"q8_0": q8_0_dequantize, "q4_0": q4_0_dequantize, "q4_1": q4_1_dequantize,
               "q4_k": q4_k_dequantize, "q6_k": q6_k_dequantize}


def linear_q8_values(kind: str, x8: torch.Tensor, s: torch.Tensor | None,
                     qweight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """q8_activations's (x8, s) times ``kind`` rows, as ggml's dots compute: x8 @ W^T, except
    for Q4_1, whose minimum m multiplies block_q8_1's s (fp16, not the codes' own sum times
    the scale): x8 @ (q * d)^T + s @ m^T. -> (..., N) float32 (+ bias)."""
    if s is None:
        return F.linear(x8, _DEQUANTIZE[kind](qweight).to(x8.dtype), bias)
    qd, m = q4_1_parts(qweight)
    return F.linear(x8, qd.reshape(qweight.shape[0], -1), bias) + s @ m.T


def _linear_q8(kind: str, x: torch.Tensor, qweight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    return linear_q8_values(kind, *q8_activations(kind, x), qweight, bias)


def q8_0_linear_q8(x: torch.Tensor, qweight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """q8_0_linear with x first rounded to 8-bit blocks (quantize_q8), as llama.cpp's CPU
    matmuls compute: x (..., K) float32 -> (..., N) float32."""
    return _linear_q8("q8_0", x, qweight, bias)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a * b + c rounded once, as an fma instruction: the product of two floats is
    exact in float64, so only the sum rounds there, then to float32 (the two roundings
    differ from one only when the float64 sum falls exactly half-way between two floats)."""
    return (a.double() * b.double() + c.double()).float()


def hsum8(acc: torch.Tensor) -> torch.Tensor:
    """(..., 8) float32 lanes -> (...,) summed as ggml's hsum_float_8 (and llamafile's hsum):
    lanes i + 4 and i, then (0 + 2) + (1 + 3)."""
    r = acc[..., 4:] + acc[..., :4]
    return (r[..., 0] + r[..., 2]) + (r[..., 1] + r[..., 3])


def q8_0_linear_ggml(x: torch.Tensor, qweight: torch.Tensor,
                     bias: torch.Tensor | None = None, lanes: int = 8) -> torch.Tensor:
    """q8_0_linear_q8 in llama.cpp's x86 order of arithmetic (ggml_vec_dot_q8_0_q8_0, and
    llamafile's tinyBLAS_Q0_AVX for several rows of x): per block, 8 int32 lanes of 4
    code products each, each lane times fp32(d_w) * d_x by one fma into 8 fp32 running
    sums, block after block, then hsum8. x (..., K) float32, qweight (N, K/32*34) uint8 ->
    (..., N) float32, + bias. The twin of csrc/cpu/q8_act.c's EXACT_Q8_0 on x86; ``lanes=1``:
    one int32 sum per block and a plain running sum, ggml's scalar fallback (our generic
    build on x86, which has no fma)."""
    q, dx = quantize_q8(x.reshape(-1, x.shape[-1]))                        # (M, K), (M, K/32)
    n = qweight.shape[0]
    blocks = qweight.reshape(n, -1, 34)
    dw = blocks[..., :2].contiguous().view(torch.float16).float()[..., 0]  # (N, K/32)
    qw = blocks[..., 2:].contiguous().view(torch.int8)                      # (N, K/32, 32)
    qx = q.reshape(q.shape[0], -1, lanes, GGUF_BLOCK // lanes).int()
    dots = torch.einsum("mbli,nbli->mnbl", qx, qw.reshape(n, -1, lanes, GGUF_BLOCK // lanes).int())
    scale = dx[:, None, :] * dw[None]                                      # (M, N, K/32)
    acc = torch.zeros(q.shape[0], n, lanes)
    for b in range(scale.shape[-1]):                                       # exact int32 dots
        p = dots[:, :, b].float()
        # x86's generic build has no fma: a product and a sum, each rounded
        acc = fma32(scale[..., b, None], p, acc) if lanes == 8 else acc + p * scale[..., b, None]
    y = (hsum8(acc) if lanes == 8 else acc[..., 0]).reshape(*x.shape[:-1], n)
    return y if bias is None else y + bias


def q4_0_linear_q8(x: torch.Tensor, qweight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """q4_0_linear with x rounded to 8-bit blocks (see q8_0_linear_q8)."""
    return _linear_q8("q4_0", x, qweight, bias)


def q4_1_linear_q8(x: torch.Tensor, qweight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """q4_1_linear with x rounded to ggml's block_q8_1 (quantize_q8_1), the minimum times its
    fp16 s (linear_q8_values), as llama.cpp's Q4_1 dot computes."""
    return _linear_q8("q4_1", x, qweight, bias)


def q4_k_linear(x: torch.Tensor, qweight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """q8_0_linear for Q4_K rows (see q4_k_dequantize): K = qweight.shape[1] / 144 * 256."""
    return F.linear(x, q4_k_dequantize(qweight).to(x.dtype), bias)


def q6_k_linear(x: torch.Tensor, qweight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """q8_0_linear for Q6_K rows (see q6_k_dequantize): K = qweight.shape[1] / 210 * 256."""
    return F.linear(x, q6_k_dequantize(qweight).to(x.dtype), bias)


def q4_k_linear_q8(x: torch.Tensor, qweight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """q4_k_linear with x rounded to ggml's block_q8_K (quantize_q8_k), as llama.cpp's
    Q4_K dot takes it."""
    return _linear_q8("q4_k", x, qweight, bias)


def q6_k_linear_q8(x: torch.Tensor, qweight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """q6_k_linear with x rounded to ggml's block_q8_K (quantize_q8_k), as llama.cpp's
    Q6_K dot takes it."""
    return _linear_q8("q6_k", x, qweight, bias)


def q4_k_embedding(ids: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a Q4_K matrix, dequantised: ids (...) long -> (..., K) float32."""
    return q4_k_dequantize(qweight[ids.reshape(-1)]).reshape(*ids.shape, -1)


def q6_k_embedding(ids: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a Q6_K matrix, dequantised: ids (...) long -> (..., K) float32."""
    return q6_k_dequantize(qweight[ids.reshape(-1)]).reshape(*ids.shape, -1)


def q8_0_embedding(ids: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a Q8_0 matrix, dequantised: ids (...) long -> (..., K) float32."""
    return q8_0_dequantize(qweight[ids.reshape(-1)]).reshape(*ids.shape, -1)


def q4_0_embedding(ids: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a Q4_0 matrix, dequantised: ids (...) long -> (..., K) float32."""
    return q4_0_dequantize(qweight[ids.reshape(-1)]).reshape(*ids.shape, -1)


def q4_1_embedding(ids: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a Q4_1 matrix, dequantised: ids (...) long -> (..., K) float32."""
    return q4_1_dequantize(qweight[ids.reshape(-1)]).reshape(*ids.shape, -1)


# ---------------------------------------------------------------------------------------
# The halves of a Llama decoder layer (the twins of csrc/cpu/layer_f32.c's fused ops).

def weight_linear(kind: str, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias for W of weight kind ``kind`` as ops/cpu.py's choose() names them:
    "f32" (packed panels, linear_packed), a GGUF block kind ("q8_0": x as it is,
    q8_0_linear) or a block kind by 8-bit activations ("q8_0*q8": q8_0_linear_q8)."""
    if kind == "f32":
        return linear_packed(x, weight, bias)
    block, _, act = kind.partition("*")
    return globals()[f"{block}_linear_q8" if act == "q8" else f"{block}_linear"](x, weight, bias)


def fused_attention_half(x: torch.Tensor, residual: torch.Tensor | None,
                         norm_weight: torch.Tensor, eps: float, w_qkv: torch.Tensor,
                         qkv_kind: str, b_qkv: torch.Tensor | None, w_o: torch.Tensor,
                         o_kind: str, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor,
                         query_start_loc: torch.Tensor, num_heads: int, num_kv_heads: int,
                         scale: float, window: int = 0,
                         softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention half of a Llama decoder layer: (o_proj output (T, H) before any tp
    all-reduce, the residual stream x + residual (T, H); x when residual is None).

    x, residual: (T, H); the norm in front (add_rms_norm), q|k|v by ``w_qkv`` (+ b_qkv),
    paged_attention_with_kvcache over the caches (window 0 / softcap 0: none), o_proj by
    ``w_o``; weights of the kinds ``weight_linear`` takes."""
    if residual is None:
        h, residual = rms_norm(x, norm_weight, eps), x
    else:
        h, residual = add_rms_norm(x, residual, norm_weight, eps)
    t, d = x.shape[0], k_cache.shape[-1]
    qkv = weight_linear(qkv_kind, h, w_qkv, b_qkv)                       # (T, (Hq+2Hk)*D)
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    a = paged_attention_with_kvcache(
        q.reshape(t, num_heads, d), k.reshape(t, num_kv_heads, d), v.reshape(t, num_kv_heads, d),
        k_cache, v_cache, cos, sin, slot_mapping, block_tables, context_lens, query_start_loc,
        scale, window or None, softcap or None)                           # (T, Hq, D)
    return weight_linear(o_kind, a.reshape(t, num_heads * d), w_o), residual


def fused_mlp_half(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                   eps: float, w_gate_up: torch.Tensor, gate_up_kind: str, w_down: torch.Tensor,
                   down_kind: str, intermediate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The SwiGLU MLP half of a Llama decoder layer: (down_proj output (T, H) before any tp
    all-reduce, the residual stream x + residual (T, H)). ``w_gate_up`` gives gate|up
    (2 * intermediate rows), ``w_down`` takes ``intermediate`` inputs."""
    if residual is None:
        h, residual = rms_norm(x, norm_weight, eps), x
    else:
        h, residual = add_rms_norm(x, residual, norm_weight, eps)
    act = silu_and_mul(weight_linear(gate_up_kind, h, w_gate_up))       # (T, F)
    return weight_linear(down_kind, act, w_down), residual
