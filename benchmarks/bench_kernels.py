"""Times parallax's kernels against their torch counterparts.

    PYTHONPATH=src python benchmarks/bench_kernels.py --cpu [--rows 1,8,16,128] [--reps 15]
        [--tables f32,int8,q8_0,q4_0,q4_1,q4_k,q6_k]
    PYTHONPATH=src python benchmarks/bench_kernels.py [--quick] [--skip-e2e]      (GPU)

--cpu (the default without a GPU): the packed fp32 matmul of csrc/cpu in every variant this
CPU runs against torch on the same panels (reference.linear_packed, what the dispatcher falls
back to) and F.linear on the plain weight, for SmolLM2-135M's weight shapes; interleaved,
medians; prints the ISA, ratios and the path ops.linear_packed chooses. Then the same for
int8 weights and GGUF Q8_0 / Q4_0 / Q4_1 weights: each variant's kernel against dequantise +
F.linear (GGUF: with x rounded to 8-bit blocks, the default; the fp32-activation kernel beside);
Q4_K / Q6_K (tables q4_k, q6_k; random super-blocks, gguf-py cannot quantise to them) at
TinyLlama-1.1B's shapes (K a multiple of 256, which SmolLM2's 576 is not).
Then (table ``paged``) the paged attention kernel at SmolLM2's heads: decode batches of 1-64
rows over ragged contexts and prefill chunks, every variant, with us/row, GB/s and GFLOP/s.

GPU: the CUDA kernels against their torch counterparts (the paged attention kernel against
its torch reference, the fallback the model takes without the extension), then a decode step
of a random-weight Llama-3-8B-shaped model with the kernels on and off. Prints one table.

Method: CUDA events around each launch, median of many runs, inputs rotated over enough
copies that the working set exceeds the L2 (so bandwidth is HBM's, not the cache's). Achieved
GB/s counts the fewest bytes each op must move; it is compared with a measured device copy
(read + write bytes). Needs a GPU and the extension (built by setup.py or JIT).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import parallax.ops as ops
from parallax.ops import cuda as C
from parallax.ops import reference as ref

DEV = "cuda"
BF = torch.bfloat16
ROWS: list[tuple[str, str, float, float, float]] = []  # name, detail, ms kernel, ms torch, GB


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 60 << 20)


def copies_for(nbytes: int) -> int:
    """How many input copies to rotate over so the set is >= 4x the L2."""
    return max(1, min(16, math.ceil(4 * l2_bytes() / max(nbytes, 1))))


def bench(fn, args_list, iters: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of fn(*args), rotating over args_list."""
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        a = args_list[i % len(args_list)]
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), [()], iters=20)
    return 2 * n / ms / 1e6  # GB/s


def record(name, detail, fn_k, fn_t, args_list, nbytes, iters=50):
    mk = bench(fn_k, args_list, iters)
    mt = bench(fn_t, args_list, iters) if fn_t is not None else float("nan")
    ROWS.append((name, detail, mk, mt, nbytes / 1e9))


# ----------------------------------------------------------------------------- per kernel

def bench_decode(quick: bool):
    hq, hk, d = 32, 8, 128   # Llama-3-8B attention
    for b, ctx in [(1, 4096), (1, 16384), (16, 4096), (32, 2048)] if not quick else [(1, 4096)]:
        kv_bytes = 2 * b * hk * ctx * d * 2
        sets = []
        for _ in range(copies_for(kv_bytes)):
            q = torch.randn(b, hq, d, device=DEV, dtype=BF)
            kc = torch.randn(b, hk, ctx, d, device=DEV, dtype=BF)
            vc = torch.randn(b, hk, ctx, d, device=DEV, dtype=BF)
            lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
            sets.append((q, kc, vc, lens))
        scale = d ** -0.5
        # torch counterpart: SDPA on the same GQA problem (equal lengths, so no mask needed)
        sdpa = lambda q, kc, vc, lens: F.scaled_dot_product_attention(  # noqa: E731
            q[:, :, None], kc, vc, scale=scale, enable_gqa=True)
        record("decode_attention", f"B={b} ctx={ctx} Hq=32 Hk=8 D=128",
               lambda q, kc, vc, lens: C.decode_attention(q, kc, vc, lens, scale), sdpa, sets,
               kv_bytes + 2 * b * hq * d * 2)


def paged_metadata(seqs: list[tuple[int, int]], d: int, bs: int, device=DEV,
                   g: torch.Generator | None = None) -> tuple:
    """For sequences [(context_len, new_tokens)] on shuffled cache blocks (as after a while of
    serving): (n_blocks, new tokens, cos, sin (T, d/2), slots, block tables, context lengths,
    query start offsets), the metadata arguments of paged_attention_with_kvcache."""
    blocks = [-(-length // bs) for length, _ in seqs]
    n_blocks = sum(blocks) + 1
    perm = torch.randperm(n_blocks, generator=g, device=device).to(torch.int32)
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32, device=device)
    at = 0
    for b, nb in enumerate(blocks):
        tables[b, :nb] = perm[at:at + nb]
        at += nb
    pos = torch.cat([torch.arange(length - n, length, device=device) for length, n in seqs])
    seq = torch.cat([torch.full((n,), b, device=device) for b, (_, n) in enumerate(seqs)])
    slots = tables[seq, pos // bs].long() * bs + pos % bs
    ang = pos[:, None].float() * (1.0 / 10000 ** (torch.arange(0, d, 2, device=device) / d))
    qsl = torch.tensor([0] + torch.tensor([n for _, n in seqs]).cumsum(0).tolist(),
                       dtype=torch.int32, device=device)
    lens = torch.tensor([length for length, _ in seqs], dtype=torch.int32, device=device)
    return n_blocks, pos.shape[0], ang.cos(), ang.sin(), slots, tables, lens, qsl


def paged_problem(seqs: list[tuple[int, int]], hq: int, hk: int, d: int, bs: int = 16,
                  dtype: torch.dtype = BF) -> tuple:
    """Arguments of paged_attention_with_kvcache for sequences [(context_len, new_tokens)]
    on shuffled cache blocks (paged_metadata)."""
    n_blocks, t, *meta = paged_metadata(seqs, d, bs)
    g = dict(device=DEV, dtype=dtype)
    return (torch.randn(t, hq, d, **g), torch.randn(t, hk, d, **g), torch.randn(t, hk, d, **g),
            torch.randn(n_blocks, hk, bs, d, **g), torch.randn(n_blocks, hk, bs, d, **g), *meta)


def bench_paged(quick: bool):
    """The paged kernel (rotary + cache write + attention of a flat batch) against its torch
    reference (the fallback: one SDPA per sequence over gathered blocks), Llama-3-8B heads."""
    hq, hk, d = 32, 8, 128
    cases = {"decode B=1 ctx=8192": [(8192, 1)],
             "decode B=32 ctx=2048": [(2048, 1)] * 32,
             "prefill 1x2048": [(2048, 2048)],
             "mixed 512 + 31 decodes ctx=1024": [(512, 512)] + [(1024, 1)] * 31}
    if quick:
        cases = dict(list(cases.items())[:2])
    for detail, seqs in cases.items():
        kv = sum(length for length, _ in seqs) * hk * d * 2 * 2
        sets = [paged_problem(seqs, hq, hk, d) for _ in range(copies_for(kv))]
        scale = d ** -0.5
        record("paged_attention", detail,
               lambda *a: C.paged_attention_with_kvcache(*a, scale),
               lambda *a: ref.paged_attention_with_kvcache(*a, scale), sets, kv,
               iters=20)
    # Gemma-2 style layer: sliding window 4096 and soft-cap 50, head dim 256.
    seqs = [(8192, 1)] * 8
    sets = [paged_problem(seqs, 8, 4, 256) for _ in range(2)]
    record("paged_attention", "window=4096 softcap=50 D=256 B=8 ctx=8192",
           lambda *a: C.paged_attention_with_kvcache(*a, 256 ** -0.5, 4096, 50.0),
           lambda *a: ref.paged_attention_with_kvcache(*a, 256 ** -0.5, 4096, 50.0), sets,
           8 * 4096 * 4 * 256 * 2 * 2, iters=10)


def bench_int8(quick: bool):
    shapes = [(14336, 4096), (4096, 14336)] if not quick else [(14336, 4096)]
    for n, k in shapes:
        for m in (1, 16) if not quick else (1,):
            sets = []
            for _ in range(copies_for(n * k * 2)):   # sized for the bf16 weight
                w = torch.randn(n, k, device=DEV, dtype=BF) * 0.02
                qw, sc = ref.quantize_int8(w)
                sets.append((torch.randn(m, k, device=DEV, dtype=BF), qw, sc, w))
            record("int8_linear", f"M={m} N={n} K={k} vs bf16 F.linear",
                   lambda x, qw, sc, w: C.int8_linear(x, qw, sc),
                   lambda x, qw, sc, w: F.linear(x, w), sets, n * k + 2 * m * (n + k))


def bench_norm_rotary(quick: bool):
    for rows in (16, 8192):
        d = 4096
        nbytes = rows * d * 2
        sets = [(torch.randn(rows, d, device=DEV, dtype=BF), torch.randn(rows, d, device=DEV, dtype=BF),
                 torch.randn(d, device=DEV, dtype=BF)) for _ in range(copies_for(4 * nbytes))]
        record("add_rms_norm", f"rows={rows} d=4096",
               lambda x, r, w: C.add_rms_norm(x, r, w, 1e-5),
               lambda x, r, w: ref.add_rms_norm(x, r, w, 1e-5), sets, 4 * nbytes)
    for b, t in [(16, 1), (1, 4096)]:
        hq, hk, d = 32, 8, 128
        nbytes = 2 * b * t * (hq + hk) * d * 2 + 2 * b * t * d // 2 * 4
        sets = [(torch.randn(b, t, hq, d, device=DEV, dtype=BF), torch.randn(b, t, hk, d, device=DEV, dtype=BF),
                 torch.rand(b, t, d // 2, device=DEV), torch.rand(b, t, d // 2, device=DEV))
                for _ in range(copies_for(nbytes))]
        record("rotary_embedding", f"B={b} T={t} (in place vs out of place)",
               lambda q, k, c, s: C.rotary_embedding(q, k, c, s),
               lambda q, k, c, s: ref.rotary_embedding(q, k, c, s), sets, nbytes)


# ----------------------------------------------------------------------------- end to end

class TinyLlama:
    """Llama-3-8B shapes, random bf16 weights, decode only, written on parallax.ops so the
    same code runs with the kernels (`impl=ops`) or the torch references (`impl=ref`)."""

    def __init__(self, layers=32, hidden=4096, heads=32, kv_heads=8, inter=14336,
                 vocab=128256, max_len=2048, batch=16):
        g = dict(device=DEV, dtype=BF)
        self.h, self.nq, self.nk, self.d = hidden, heads, kv_heads, hidden // heads
        std = 0.02
        self.embed = torch.randn(vocab, hidden, **g) * std
        self.layers = []
        for _ in range(layers):
            self.layers.append(dict(
                ln1=torch.ones(hidden, **g), ln2=torch.ones(hidden, **g),
                qkv=torch.randn((heads + 2 * kv_heads) * self.d, hidden, **g) * std,
                o=torch.randn(hidden, hidden, **g) * std,
                gate_up=torch.randn(2 * inter, hidden, **g) * std,
                down=torch.randn(hidden, inter, **g) * std,
                k=torch.randn(batch, kv_heads, max_len, self.d, **g),
                v=torch.randn(batch, kv_heads, max_len, self.d, **g)))
        self.norm = torch.ones(hidden, **g)
        self.lm_head = torch.randn(vocab, hidden, **g) * std
        inv = 1.0 / (500000.0 ** (torch.arange(0, self.d, 2, device=DEV).float() / self.d))
        self.inv_freq = inv

    def step(self, impl, tokens, pos):
        """tokens: (B,) int64; pos: (B,) int64 position of the new token. Returns logits."""
        b = tokens.shape[0]
        x = self.embed[tokens][:, None]                                  # (B, 1, H)
        ang = pos[:, None, None].float() * self.inv_freq                 # (B, 1, D/2)
        cos, sin = ang.cos(), ang.sin()
        lens = (pos + 1).to(torch.int32)
        rows = torch.arange(b, device=DEV)
        residual = None
        for L in self.layers:
            if residual is None:
                residual, h = x, impl.rms_norm(x, L["ln1"], 1e-5)
            else:
                h, residual = impl.add_rms_norm(x, residual, L["ln1"], 1e-5)
            qkv = impl.linear(h, L["qkv"])                               # (B, 1, (Hq+2Hk)D)
            q, k, v = qkv.split([self.nq * self.d, self.nk * self.d, self.nk * self.d], -1)
            q = q.view(b, 1, self.nq, self.d)
            k = k.view(b, 1, self.nk, self.d)
            q, k = impl.rotary_embedding(q, k, cos, sin)
            L["k"][rows, :, pos] = k[:, 0]
            L["v"][rows, :, pos] = v.view(b, self.nk, self.d)
            att = impl.decode_attention(q[:, 0], L["k"][:b], L["v"][:b], lens, self.d ** -0.5)
            x = impl.linear(att.reshape(b, 1, -1), L["o"])
            h, residual = impl.add_rms_norm(x, residual, L["ln2"], 1e-5)
            gu = impl.linear(h, L["gate_up"])
            gate, up = gu.chunk(2, -1)
            x = impl.linear(F.silu(gate) * up, L["down"])
        h, _ = impl.add_rms_norm(x, residual, self.norm, 1e-5)
        return impl.linear(h, self.lm_head)


def bench_e2e(results: list[str], ctx: int = 1024, steps: int = 20):
    model = TinyLlama(batch=16, max_len=ctx + 64)
    for b in (1, 16):
        tokens = torch.randint(0, 1000, (b,), device=DEV)
        for name, impl in (("kernels on", ops), ("kernels off", ref)):
            pos = torch.full((b,), ctx, dtype=torch.int64, device=DEV)
            for _ in range(3):
                model.step(impl, tokens, pos)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                model.step(impl, tokens, pos)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3 / steps
            results.append(f"e2e decode  B={b:<2} ctx={ctx}  {name:<11}: {ms:7.2f} ms/step  "
                           f"{b * 1e3 / ms:8.1f} tok/s  (eager)")
        # kernels on, replayed as a CUDA graph: removes Python launch overhead
        try:
            pos = torch.full((b,), ctx, dtype=torch.int64, device=DEV)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    model.step(ops, tokens, pos)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model.step(ops, tokens, pos)
            ms = bench(lambda: graph.replay(), [()], iters=steps, warmup=2)
            weight_gb = 2 * 8.03e9 / 1e9
            results.append(f"e2e decode  B={b:<2} ctx={ctx}  kernels on : {ms:7.2f} ms/step  "
                           f"{b * 1e3 / ms:8.1f} tok/s  (CUDA graph; weights alone = "
                           f"{weight_gb / ms:5.2f} TB/s)")
        except Exception as e:  # noqa: BLE001 - report and go on
            results.append(f"e2e decode  B={b:<2} CUDA graph capture failed: {type(e).__name__}: {e}")


def sanitize_case():
    """Each kernel once on small, odd-sized inputs (for compute-sanitizer memcheck)."""
    g = dict(device=DEV, dtype=BF)
    x, r, w = torch.randn(3, 100, **g), torch.randn(3, 100, **g), torch.randn(100, **g)
    C.rms_norm(x, w, 1e-5)
    C.add_rms_norm(x, r, w, 1e-5)
    x8 = torch.randn(5, 4096, **g)
    C.add_rms_norm(x8, x8.clone(), torch.randn(4096, **g), 1e-5)
    C.rotary_embedding(torch.randn(2, 3, 9, 64, **g), torch.randn(2, 3, 3, 64, **g),
                       torch.rand(2, 3, 32, device=DEV), torch.rand(2, 3, 32, device=DEV))
    for d, hq, hk in ((64, 9, 3), (128, 32, 8), (128, 16, 1)):
        q = torch.randn(3, hq, d, **g)
        kc, vc = torch.randn(3, hk, 300, d, **g), torch.randn(3, hk, 300, d, **g)
        C.decode_attention(q, kc, vc, torch.tensor([1, 300, 77], dtype=torch.int32, device=DEV),
                           d ** -0.5)
    for dtype in (torch.float32, BF):   # paged: odd sizes, split-KV, window, a bad sequence
        for seqs, hq, hk, d, bs in (([(1, 1), (70, 3), (33, 33)], 9, 3, 64, 7),
                                    ([(3000, 1), (5, 2)], 8, 1, 256, 16)):
            a = paged_problem(seqs, hq, hk, d, bs, dtype)
            C.paged_attention_with_kvcache(*a, 0.1, 17, 20.0)
            a[7][0] = -1                                       # a bad slot: no write, NaN
            C.paged_attention_with_kvcache(*a, 0.1)
    qw, sc = ref.quantize_int8(torch.randn(37, 528, **g))
    for m in (1, 3, 16):
        C.int8_linear(torch.randn(m, 528, **g), qw, sc, torch.randn(37, **g))
    torch.cuda.synchronize()
    print("sanitize case ran")


# ----------------------------------------------------------------------------- CPU matmul

SMOLLM2_SHAPES = {"qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576),
                  "down": (576, 1536), "lm_head": (49152, 576)}
K_QUANT_SHAPES = {"qkv": (2560, 2048), "o_proj": (2048, 2048), "up": (5632, 2048),
                  "down": (2048, 5632)}   # TinyLlama-1.1B: K a multiple of 256


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Microseconds of each fn over ``rounds`` interleaved rounds, after one warm-up call."""
    times: dict[str, list[float]] = {c: [] for c in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for c, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[c].append((time.perf_counter() - t0) * 1e6)
    return times


def cpu_matmul_table(rows: list[int], reps: int) -> None:
    """Per shape and row count: each CPU variant's kernel, torch on the panels, F.linear.
    ratio: the best variant's time over torch's (medians; "ratio min": fastest runs);
    chosen: what ops.linear_packed does for that bucket here."""
    from parallax.ops import cpu
    variants = [v for v in cpu.supported_variants() if cpu.kernels(v) is not None]
    print(f"# CPU: best variant {cpu.supported_variants()[0]}, built {variants}, "
          f"{torch.get_num_threads()} threads; median us over {reps} interleaved rounds")
    cols = [f"{v} us" for v in variants] + ["torch us", "F.linear us"]
    print(f"{'weight':<8} {'N x K':>11} {'rows':>4} " + " ".join(f"{c:>12}" for c in cols)
          + f" {'ratio':>6} {'ratio min':>9} {'chosen':>7}")
    for name, (n, k) in SMOLLM2_SHAPES.items():
        w = torch.randn(n, k) * 0.02
        packed = cpu.pack(w)
        for m in rows:
            x = torch.randn(m, k)
            fns = {f"{v} us": (lambda v=v: cpu.linear_packed(x, packed, isa=v)) for v in variants}
            fns["torch us"] = lambda: ref.linear_packed(x, packed)
            fns["F.linear us"] = lambda: F.linear(x, w)
            times = interleaved(fns, reps if m * n * k < 2e9 else max(3, reps // 3))
            med = {c: statistics.median(t) for c, t in times.items()}
            low = {c: min(t) for c, t in times.items()}
            best = f"{variants[0]} us"
            chosen = cpu.matmul_path(m, packed)
            print(f"{name:<8} {f'{n} x {k}':>11} {m:>4} "
                  + " ".join(f"{med[c]:12.0f}" for c in cols)
                  + f" {med[best] / med['torch us']:6.2f} {low[best] / low['torch us']:9.2f}"
                  + f" {chosen:>7}", flush=True)


def _cpu_paged_problem(seqs: list[tuple[int, int]], hq: int, hk: int, d: int, bs: int,
                       g: torch.Generator) -> tuple:
    """paged_attention_with_kvcache's arguments for [(context_len, new_tokens)] on shuffled
    cache blocks (paged_metadata), q, k, v as the views of one fused qkv projection (as the
    model has them)."""
    n_blocks, t, *meta = paged_metadata(seqs, d, bs, "cpu", g)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=1)
    caches = [torch.randn(n_blocks, hk, bs, d, generator=g) for _ in range(2)]
    return (q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d), *caches, *meta)


def cpu_paged_table(reps: int) -> None:
    """The paged attention kernel (csrc/cpu/paged_attention_f32.c) at SmolLM2-135M's heads
    (9 query, 3 KV, head dim 64, block size 16): decode batches of 1-64 rows over ragged
    contexts, and prefill chunks beside decodes. Each case rotates over copies of its cache
    that together exceed the L3, so the KV comes from memory as in a step (whose weights
    stream between two layers' attention). us: median per call, per variant, interleaved;
    us/row, GB/s (K and V bytes attended) and GFLOP/s for the best variant. With one thread
    the times are the thread's CPU time (less noisy on a shared machine), else wall."""
    from parallax.ops import cpu
    variants = [v for v in cpu.supported_variants() if cpu.kernels(v) is not None]
    hq, hk, d, bs = 9, 3, 64, 16
    g = torch.Generator().manual_seed(0)
    cases = {}
    for rows in (1, 8, 16, 32, 64):
        for lo, hi in ((100, 600), (300, 300)):
            ctx = torch.randint(lo, hi + 1, (rows,), generator=g).tolist()
            cases[f"decode {rows} rows, context {lo}-{hi}"] = [(c, 1) for c in ctx]
    cases["prefill 256 + 7 decodes at 300"] = [(256, 256)] + [(300, 1)] * 7
    cases["prefill 128 of 512 + 31 decodes at 350"] = [(512, 128)] + [(350, 1)] * 31
    one = torch.get_num_threads() == 1
    clock = time.thread_time if one else time.perf_counter
    print(f"# paged attention, SmolLM2 heads; {torch.get_num_threads()} threads, "
          f"{'thread CPU' if one else 'wall'} us, median of {reps} interleaved rounds")
    cols = [f"{v} us" for v in variants]
    print(f"{'case':<40} " + " ".join(f"{c:>15}" for c in cols)
          + f" {'us/row':>7} {'GB/s':>6} {'GFLOP/s':>7}")
    for name, seqs in cases.items():
        kv = sum(length for length, _ in seqs) * hk * d * 4 * 2
        sets = [_cpu_paged_problem(seqs, hq, hk, d, bs, g)
                for _ in range(max(1, min(16, (96 << 20) // kv)))]
        times = {c: [] for c in cols}
        for r in range(reps + 2):
            for v, c in zip(variants, cols):
                a = sets[(r * len(cols) + cols.index(c)) % len(sets)]
                t0 = clock()
                cpu.paged_attention_with_kvcache(*a, d ** -0.5, isa=v)
                if r >= 2:
                    times[c].append((clock() - t0) * 1e6)
        med = {c: statistics.median(t) for c, t in times.items()}
        best = med[cols[0]]
        rows = sum(n for _, n in seqs)
        flops = sum(n * (length - (n - 1) / 2) for length, n in seqs) * hq * d * 4
        print(f"{name:<40} " + " ".join(f"{med[c]:15.1f}" for c in cols)
              + f" {best / rows:7.1f} {kv / best / 1e3:6.1f} {flops / best / 1e3:7.1f}",
              flush=True)


def _quantized(kind: str, w: torch.Tensor):
    """(kernel(x, isa), torch path(x), extra columns) for weight ``w`` stored as ``kind``
    ("int8": per-channel scales; "q8_0" / "q4_0" / "q4_1": GGUF blocks, quantised by the gguf
    package, multiplied the default way: x rounded to 8-bit blocks, csrc/cpu/q8_act.c, whose
    torch path is the dispatcher's: the same rounded x, dequantise a few MiB of rows at a
    time, F.linear; extra: the fp32-activation kernel, PARALLAX_GGUF_ACTIVATIONS=f32)."""
    from parallax.ops import cpu
    if kind == "int8":
        qw, sc = ref.quantize_int8(w)
        return (lambda x, isa=None: cpu.int8_linear(x, qw, sc, isa=isa),
                lambda x: ref.int8_linear(x, qw, sc), {})
    import gguf
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    if kind in ("q4_k", "q6_k"):   # random super-blocks with sane fp16 factors
        from bench_q8_cold import random_blocks   # benchmarks/, this script's folder
        qb = random_blocks(kind, *w.shape)
    else:
        qb = torch.from_numpy(gguf.quants.quantize(w.numpy(), qtype))
    extra = {}
    if hasattr(cpu, f"{kind}_linear"):
        extra[f"{kind} x f32 us"] = lambda x, f=getattr(cpu, f"{kind}_linear"): f(x, qb)
    return (lambda x, isa=None: cpu.block_linear_q8(kind, x, qb, isa=isa),
            lambda x: cpu.block_linear_dequant(kind, x, qb, q8=True), extra)


def cpu_quant_table(kind: str, rows: list[int], reps: int) -> None:
    """Per shape and row count: the ``kind`` weight kernel in each variant, the reference
    (dequantise the weight, then F.linear), the fp32-activation block kernel where there is
    one, and the fp32 packed kernel for scale."""
    from parallax.ops import cpu
    variants = [v for v in cpu.supported_variants() if cpu.kernels(v) is not None]
    print(f"\n# {kind} weights, {torch.get_num_threads()} threads")
    head = True
    shapes = K_QUANT_SHAPES if kind in ("q4_k", "q6_k") else SMOLLM2_SHAPES
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k) * 0.02
        kernel, torch_path, extra = _quantized(kind, w)
        cols = ([f"{kind} {v} us" for v in variants] + [f"{kind} torch us", *extra]
                + ["f32 kernel us"])
        if head:
            print(f"{'weight':<8} {'N x K':>11} {'rows':>4} " + " ".join(f"{c:>15}" for c in cols)
                  + f" {'ratio':>6} {'chosen':>7}")
            head = False
        packed = cpu.pack(w)
        for m in rows:
            x = torch.randn(m, k)
            fns = {f"{kind} {v} us": (lambda v=v: kernel(x, v)) for v in variants}
            fns[f"{kind} torch us"] = lambda: torch_path(x)
            fns.update({c: (lambda f=f: f(x)) for c, f in extra.items()})
            fns["f32 kernel us"] = lambda: cpu.linear_packed(x, packed)
            times = interleaved(fns, reps if m * n * k < 2e9 else max(3, reps // 3))
            med = {c: statistics.median(t) for c, t in times.items()}
            chosen = cpu.choose(kind if kind == "int8" else f"{kind}*q8", n, k, m, kernel,
                                torch_path)
            print(f"{name:<8} {f'{n} x {k}':>11} {m:>4} "
                  + " ".join(f"{med[c]:15.0f}" for c in cols)
                  + f" {med[cols[0]] / med[f'{kind} torch us']:6.2f} {chosen:>7}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="the CPU matmul table (default without a GPU)")
    ap.add_argument("--rows", default="1,4,8,16,128", help="--cpu: row counts")
    ap.add_argument("--reps", type=int, default=15, help="--cpu: interleaved rounds")
    ap.add_argument("--threads", type=int, default=None, help="--cpu: torch threads")
    ap.add_argument("--tables", default="f32,int8,q8_0,q4_0,q4_1,paged",
                    help="--cpu: which tables (weights; paged: the paged attention kernel)")
    ap.add_argument("--quick", action="store_true", help="one case per kernel")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--sanitize-case", action="store_true",
                    help="run each kernel once on small inputs and exit")
    args = ap.parse_args()
    if args.cpu or not torch.cuda.is_available():
        if args.threads:
            torch.set_num_threads(args.threads)
        rows, tables = [int(r) for r in args.rows.split(",")], args.tables.split(",")
        if "f32" in tables:
            cpu_matmul_table(rows, args.reps)
        for kind in ("int8", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"):
            if kind in tables:
                cpu_quant_table(kind, rows, args.reps)
        if "paged" in tables:
            cpu_paged_table(args.reps)
        return
    assert C.load_extension(), C.load_error()
    if args.sanitize_case:
        sanitize_case()
        return
    torch.manual_seed(0)
    prop = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"# {prop.name}, {prop.multi_processor_count} SMs, L2 {l2_bytes() >> 20} MiB; "
          f"device copy {bw:.0f} GB/s (read + write)")
    for fn in (bench_paged, bench_decode, bench_int8, bench_norm_rotary):
        try:
            fn(args.quick)
        except Exception as e:  # noqa: BLE001 - keep the other rows
            print(f"# {fn.__name__} failed: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    print(f"{'op':<17} {'case':<42} {'kernel ms':>9} {'torch ms':>9} {'speedup':>7} "
          f"{'GB/s':>7} {'%copy':>6}")
    for name, detail, mk, mt, gb in ROWS:
        print(f"{name:<17} {detail:<42} {mk:9.4f} {mt:9.4f} {mt / mk:6.2f}x "
              f"{gb / mk * 1e3:7.0f} {100 * gb / mk * 1e3 / bw:5.1f}%")
    if not args.skip_e2e:
        res: list[str] = []
        try:
            bench_e2e(res)
        except Exception as e:  # noqa: BLE001
            res.append(f"e2e failed: {type(e).__name__}: {e}")
        print("\n".join(res))


if __name__ == "__main__":
    main()
