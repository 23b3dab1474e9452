"""Paged-attention problems and a float64 oracle, shared by the CUDA kernel's tests (on a GPU,
tests/test_kernels_cuda.py, and through the CPU emulation, tests/test_cuda_emulated.py).

A case is a flat batch of sequences (context length, new tokens) over a paged cache whose
block ids are shuffled; sequences 0 and 1 may share their first blocks (a prefix-cache hit).
Inputs are drawn in float32 on the CPU and then cast, so every dtype sees the same problem.
"""

from __future__ import annotations

import torch

NAMES = ("q", "k", "v", "k_cache", "v_cache", "cos", "sin", "slot_mapping", "block_tables",
         "context_lens", "query_start_loc")


def make_case(seed: int, seqs: list[tuple[int, int]], hq: int = 8, hk: int = 2, d: int = 64,
              bs: int = 16, num_blocks: int | None = None, shared_blocks: int = 0,
              dtype: torch.dtype = torch.float32, device: str = "cpu",
              strided: bool = False) -> dict:
    """seqs: [(context_len, new_tokens)]. ``strided``: q, k, v are views of one fused qkv
    projection (the model's layout) instead of contiguous tensors."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-length // bs) for length, _ in seqs)
    num_blocks = num_blocks or need + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-length // bs) for length, _ in seqs) + 1
    tables = torch.full((len(seqs), width), -1, dtype=torch.int32)   # unused entries stay -1
    for b, (length, _) in enumerate(seqs):
        for i in range(-(-length // bs)):
            tables[b, i] = tables[0, i] if b == 1 and i < shared_blocks else perm.pop()
    t = sum(n for _, n in seqs)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=1)
    q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
    if not strided:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    pos = torch.cat([torch.arange(length - n, length) for length, n in seqs])
    freqs = pos[:, None].float() * (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    slots = torch.cat([tables[b, p // bs].long() * bs + p % bs
                       for b, (length, n) in enumerate(seqs)
                       for p in [torch.arange(length - n, length)]])
    qsl = torch.tensor([0] + torch.tensor([n for _, n in seqs]).cumsum(0).tolist(),
                       dtype=torch.int32)
    c = dict(q=q, k=k, v=v, k_cache=torch.randn(num_blocks, hk, bs, d, generator=g),
             v_cache=torch.randn(num_blocks, hk, bs, d, generator=g), cos=freqs.cos(),
             sin=freqs.sin(), slot_mapping=slots, block_tables=tables,
             context_lens=torch.tensor([length for length, _ in seqs], dtype=torch.int32),
             query_start_loc=qsl)
    for name in ("q", "k", "v", "k_cache", "v_cache"):
        c[name] = c[name].to(dtype)
    if strided:   # keep q, k, v views of one buffer after the cast
        fused = torch.cat([c[n].reshape(t, -1) for n in ("q", "k", "v")], dim=1).to(device)
        q, k, v = fused.split([hq * d, hk * d, hk * d], dim=1)
        c["q"], c["k"], c["v"] = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
        return {n: (x if n in ("q", "k", "v") else x.to(device)) for n, x in c.items()}
    return {n: x.to(device) for n, x in c.items()}



def corrupt(c: dict, bad: str) -> None:
    """Break sequence 1 of ``c`` in place the way ``bad`` names (every case but
    "broken-partition", which breaks every sequence's query rows). Cases made with
    make_case(5, [(20, 1), (9, 4), (30, 2)], bs=8), as the bad-metadata tests use."""
    n_blocks, bs = c["k_cache"].shape[0], c["k_cache"].shape[2]
    if bad == "negative-slot":
        c["slot_mapping"][2] = -1
    elif bad == "slot-beyond-capacity":
        c["slot_mapping"][3] = n_blocks * bs
    elif bad == "zero-length":
        c["context_lens"][1] = 0
    elif bad == "length-below-new-tokens":
        c["context_lens"][1] = 3
    elif bad == "length-beyond-table":
        c["context_lens"][1] = bs * c["block_tables"].shape[1] + 1
    elif bad == "block-beyond-cache":
        c["block_tables"][1, 0] = n_blocks
    elif bad == "negative-block":
        c["block_tables"][1, 1] = -3
    elif bad == "broken-partition":
        c["query_start_loc"][2] = 0      # 5 -> 0: decreasing
    else:
        raise ValueError(f"unknown corruption {bad!r}")

def args(c: dict) -> list:
    """The op's positional tensors, caches cloned (the op writes them)."""
    return [c[n].clone() if n in ("k_cache", "v_cache") else c[n] for n in NAMES]


def guarded(c: dict, blocks: int = 2) -> tuple[list, list]:
    """args(c) with each cache a slice of a larger tensor whose ``blocks`` extra blocks on
    either side hold NaN: returns (args, [the two larger tensors]) so a test can check that
    nothing was written outside the cache."""
    a, outer = args(c), []
    for i in (3, 4):
        n = a[i].shape[0]
        big = torch.full((n + 2 * blocks, *a[i].shape[1:]), float("nan"), dtype=a[i].dtype,
                         device=a[i].device)
        big[blocks:blocks + n] = a[i]
        a[i] = big[blocks:blocks + n]
        outer.append(big)
    return a, outer


def guards_intact(outer: list, blocks: int = 2) -> bool:
    return all(big[:blocks].isnan().all() and big[-blocks:].isnan().all() for big in outer)


def _rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def oracle(c: dict, scale: float, window: int | None = None,
           softcap: float | None = None) -> torch.Tensor:
    """float64 attention per sequence over keys gathered position by position (no block
    walk, no paged write): old keys from the cache, new keys rotated here. (T, Hq, D)."""
    f = {n: c[n].double().cpu() if c[n].is_floating_point() else c[n].cpu() for n in NAMES}
    q, k_new = _rot(f["q"], f["cos"], f["sin"]), _rot(f["k"], f["cos"], f["sin"])
    bs, hq, hk = f["k_cache"].shape[2], q.shape[1], f["k"].shape[1]
    qsl, outs = f["query_start_loc"].tolist(), []
    for b, length in enumerate(f["context_lens"].tolist()):
        s, e = qsl[b], qsl[b + 1]
        old = length - (e - s)
        tab = f["block_tables"][b]
        ks = [f["k_cache"][tab[p // bs], :, p % bs] for p in range(old)] + list(k_new[s:e])
        vs = [f["v_cache"][tab[p // bs], :, p % bs] for p in range(old)] + list(f["v"][s:e])
        k = torch.stack(ks).repeat_interleave(hq // hk, 1)          # (L, Hq, D)
        v = torch.stack(vs).repeat_interleave(hq // hk, 1)
        scores = torch.einsum("thd,lhd->htl", q[s:e], k) * scale    # (Hq, n, L)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        pos, kpos = torch.arange(old, length)[:, None], torch.arange(length)[None, :]
        mask = kpos <= pos
        if window:
            mask &= kpos > pos - window
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        outs.append(torch.einsum("htl,lhd->thd", p, v))
    return torch.cat(outs)


def expected_caches(c: dict, tokens: torch.Tensor | None = None) -> tuple:
    """The caches after writing the new tokens' rotated k and v (all, or only ``tokens``),
    in the cache dtype, computed in float32 as the reference does."""
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
    k = _rot(c["k"].float(), c["cos"].float(), c["sin"].float()).to(kc.dtype)
    idx = torch.arange(k.shape[0], device=k.device) if tokens is None else tokens.to(k.device)
    bs = kc.shape[2]
    slots = c["slot_mapping"][idx].long()
    kc[slots // bs, :, slots % bs] = k[idx]
    vc[slots // bs, :, slots % bs] = c["v"][idx]
    return kc, vc


# name -> (sequences, hq, hk, d, bs, shared prefix blocks of sequences 0 and 1): ragged
# lengths, block boundaries, long prefills spanning several query tiles, GQA from 1 to 16
# query heads per KV head, every head dim the kernel is built for, shared prefix blocks.
CASES = {
    "decode-ragged": ([(1, 1), (17, 1), (16, 1), (33, 1), (100, 1)], 8, 2, 64, 16, 0),
    "prefill-ragged": ([(5, 5), (16, 16), (40, 40), (70, 70)], 8, 2, 64, 16, 0),
    "mixed-chunked": ([(47, 1), (64, 30), (200, 7), (3, 3), (18, 2)], 9, 3, 64, 16, 0),
    "block-boundaries": ([(15, 1), (16, 1), (17, 1), (32, 16), (33, 17)], 4, 4, 128, 16, 0),
    "odd-block-size": ([(37, 5), (6, 6), (70, 1)], 8, 1, 96, 7, 0),
    "mqa-16": ([(50, 3), (9, 1)], 16, 1, 64, 16, 0),
    "head-dim-256": ([(40, 2), (24, 24)], 4, 2, 256, 16, 0),
    "block-size-1": ([(9, 2), (3, 3)], 4, 2, 64, 1, 0),
    "shared-prefix": ([(70, 1), (70, 6)], 8, 2, 64, 16, 4),
}

# Long contexts (GPU only; too slow for the emulation): the split-KV path runs when the batch
# leaves the GPU idle, and windows far shorter than the context.
LONG_CASES = {
    "long-decode": ([(3000, 1), (1500, 1), (700, 2), (4097, 1)], 32, 8, 128, 16, 0),
    "long-prefill": ([(1200, 1000), (600, 1)], 8, 2, 128, 16, 0),
    "long-mqa-256": ([(2500, 1), (900, 3)], 8, 1, 256, 32, 0),
}


def case(name: str, seed: int = 0, **kw) -> dict:
    seqs, hq, hk, d, bs, shared = {**CASES, **LONG_CASES}[name]
    return make_case(seed + len(name), seqs, hq=hq, hk=hk, d=d, bs=bs, shared_blocks=shared,
                     **kw)
