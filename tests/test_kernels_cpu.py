"""CPU checks of the kernel layer: the torch references against plain math, the dispatcher,
and compile checks of the CUDA sources (nvcc for sm_80 and sm_90a; the binding against the
installed torch headers, then loaded with stub launchers to check the op schemas)."""

from __future__ import annotations

import functools
import glob
import math
import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

import parallax.ops as ops
from parallax.errors import KernelInputError, ParallaxError
from parallax.ops import cpu
from parallax.ops import reference as ref

CSRC = os.path.join(os.path.dirname(__file__), "..", "src", "parallax", "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
HERE = cpu.supported_variants()   # the CPU variants this machine runs (generic always)
# Every compiler here that users may have: the default gcc, clang, and older GCCs if present.
COMPILERS = [c for c in ("gcc", "clang", "gcc-9", "gcc-10", "gcc-11") if shutil.which(c)]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def concurrently(calls: dict) -> dict:
    """Run independent calls (name -> no-argument callable, each mostly a single-threaded
    compiler process) as many at once as this process may use CPUs; name -> its finished
    future, whose ``result()`` re-raises a call's exception in the test that asserts on it."""
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        futures = {name: pool.submit(fn) for name, fn in calls.items()}
    return futures


def run_all(cmds: list[list[str]], timeout: float) -> list[subprocess.CompletedProcess]:
    """Run independent commands concurrently (``concurrently``); their results in order."""
    done = concurrently({i: functools.partial(subprocess.run, cmd, capture_output=True,
                                              text=True, timeout=timeout)
                         for i, cmd in enumerate(cmds)})
    return [done[i].result() for i in range(len(cmds))]


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    return ((out.double() - want.double()).norm() / want.double().norm()).item()


# ----------------------------------------------------------------------------- references

@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2), (8, 2), (8, 1)])
def test_prefill_attention_matches_sdpa_with_repeated_kv(hq, hk):
    g = torch.Generator().manual_seed(hq * 10 + hk)
    b, t, d = 2, 37, 16
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, t, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hk, t, d, generator=g, dtype=torch.float64)
    scale = d ** -0.5
    out = ref.prefill_attention(q, k, v, scale)
    rep = hq // hk
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                          v.repeat_interleave(rep, 1), is_causal=True,
                                          scale=scale)
    assert out.shape == (b, hq, t, d)
    assert rel_err(out, want) < 1e-12
    # and against explicit math: softmax(q k^T * scale + causal mask) v
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    assert rel_err(out, s.softmax(-1) @ v.repeat_interleave(rep, 1)) < 1e-12


@pytest.mark.parametrize("hq,hk,d", [(4, 4, 64), (9, 3, 64), (8, 2, 128), (8, 1, 32)])
def test_decode_attention_ragged_matches_per_sequence_loop(hq, hk, d):
    g = torch.Generator().manual_seed(hq + hk + d)
    b, s_cap = 5, 50
    lens = torch.tensor([1, 50, 17, 33, 2], dtype=torch.int32)
    q = torch.randn(b, hq, d, generator=g, dtype=torch.float64)
    kc = torch.randn(b, hk, s_cap, d, generator=g, dtype=torch.float64)
    vc = torch.randn(b, hk, s_cap, d, generator=g, dtype=torch.float64)
    # finite garbage past each sequence's end must not matter (the reference masks scores, so
    # a NaN there would leak through 0 * NaN; the CUDA tests check that the kernel skips it)
    for i, n in enumerate(lens.tolist()):
        kc[i, :, n:] = 1e6
        vc[i, :, n:] = -1e6
    scale = 1.0 / math.sqrt(d)
    out = ref.decode_attention(q, kc, vc, lens, scale)
    rep = hq // hk
    for i, n in enumerate(lens.tolist()):
        for h in range(hq):
            kk, vv = kc[i, h // rep, :n], vc[i, h // rep, :n]   # (n, D)
            p = torch.softmax(kk @ q[i, h] * scale, dim=0)
            assert rel_err(out[i, h], p @ vv) < 1e-6  # torch CPU SDPA masks at ~1e-7


def test_int8_linear_matches_dequantized_float():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    qw, scales = ref.quantize_int8(w)
    assert qw.dtype == torch.int8 and scales.shape == (48,)
    assert qw.abs().max().item() <= 127
    # quantisation error at most half a step per channel
    assert ((qw.double() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-12).all()
    x = torch.randn(3, 5, 64, generator=g, dtype=torch.float64)
    bias = torch.randn(48, generator=g, dtype=torch.float64)
    out = ref.int8_linear(x, qw, scales, bias)
    want = x @ (qw.double() * scales[:, None]).T + bias
    assert out.shape == (3, 5, 48)
    assert rel_err(out, want) < 1e-12


def test_rotary_matches_complex_multiplication():
    g = torch.Generator().manual_seed(1)
    b, t, hq, hk, d = 2, 7, 4, 2, 16
    q = torch.randn(b, t, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, t, hk, d, generator=g, dtype=torch.float64)
    theta = torch.rand(b, t, d // 2, generator=g, dtype=torch.float64) * 6.0
    cos, sin = theta.cos(), theta.sin()
    rq, rk = ref.rotary_embedding(q, k, cos.float(), sin.float())  # computes in fp32

    def complex_rot(x):  # rotate_half pairs (i, i + D/2) are (real, imag)
        z = torch.complex(x[..., : d // 2], x[..., d // 2:])
        z = z * torch.polar(torch.ones_like(theta), theta)[:, :, None, :]
        return torch.cat([z.real, z.imag], dim=-1)

    assert rel_err(rq, complex_rot(q)) < 1e-6
    assert rel_err(rk, complex_rot(k)) < 1e-6
    # norms are preserved by a rotation
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 96, generator=g).to(dtype)
    r = torch.randn(3, 4, 96, generator=g).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    out, res = ref.add_rms_norm(x, r, w, 1e-6)
    s = (x + r)
    assert torch.equal(res, s)
    sf = s.double()
    want = sf / torch.sqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and rel_err(out, want) < tol


# ----------------------------------------------------------------------------- dispatcher

def test_dispatch_routes_cpu_tensors_by_dtype(monkeypatch):
    """On the CPU, bf16 tensors go to the torch references and fp32 ones to the C kernels
    (where they build; see kernel_report): each path is observed, not assumed."""
    from parallax.ops import cpu
    calls = []

    def spy(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: calls.append(
            (module.__name__.rsplit(".", 1)[-1], name)) or real(*a, **k))

    for name in ("add_rms_norm", "silu_and_mul"):
        spy(cpu, name)
        spy(ref, name)
    spy(ref, "rms_norm")
    xb, wb = torch.randn(2, 16, dtype=torch.bfloat16), torch.ones(16, dtype=torch.bfloat16)
    assert torch.equal(ops.rms_norm(xb, wb, 1e-5), ref.rms_norm(xb, wb, 1e-5))
    ops.silu_and_mul(xb)
    assert calls[0] == ("reference", "rms_norm") and ("reference", "silu_and_mul") in calls
    assert not [c for c in calls if c[0] == "cpu"]
    calls.clear()
    x, w = torch.randn(2, 16), torch.ones(16)
    ops.rms_norm(x, w, 1e-5)
    ops.silu_and_mul(x)
    want = "cpu" if cpu.kernels() is not None else "reference"
    assert calls[0] == (want, "add_rms_norm") and (want, "silu_and_mul") in calls
    report = ops.kernel_report()
    if report["device"] == "cpu":
        kind = report["ops"]["silu_and_mul"]
        assert kind == ("torch" if want == "reference" else f"cpu-{cpu.best_variant()}")


def test_kernel_mode_env_is_validated():
    import sys

    def run(code: str, mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PARALLAX_KERNELS": mode}, timeout=120)
    # three independent interpreters (each mostly importing torch): started together
    fast, reference, cuda = concurrently({
        "fast": lambda: run("import parallax.ops", "fast"),
        "reference": lambda: run("import parallax.ops as o; print(o.active_backend())",
                                 "reference"),
        "cuda": lambda: run("import parallax.ops", "cuda")}).values()
    r = fast.result()
    assert r.returncode != 0 and "PARALLAX_KERNELS" in r.stderr
    r = reference.result()
    assert r.returncode == 0 and r.stdout.strip() == "reference"
    if not torch.cuda.is_available():
        r = cuda.result()
        assert r.returncode != 0 and "CUDA extension is not available" in r.stderr


# ----------------------------------------------------------------------------- compile checks

@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_every_cu_compiles_for_sm80_and_sm90a(tmp_path):
    """All .cu files in one nvcc call (nvcc is slow on small machines: one process, its
    --threads over the two targets), warnings as errors; none includes a torch header."""
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "-Werror", "all-warnings", "--threads", "2",
           "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90a,code=sm_90a",
           "--output-directory", str(tmp_path), *CU_FILES]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    objects = sorted(os.listdir(tmp_path))
    assert len(objects) == len(CU_FILES), objects
    for path in CU_FILES:
        with open(path) as f:
            src = f.read()
        assert "torch" not in src.lower().replace("torch.", ""), \
            f"{os.path.basename(path)}: no torch headers in .cu files"


def test_every_launcher_in_ops_h_is_defined():
    import re
    with open(os.path.join(CSRC, "ops.h")) as f:
        declared = set(re.findall(r"\b(parallax_\w+)\(", f.read()))
    defined = set()
    for path in CU_FILES:
        with open(path) as f:
            defined |= set(re.findall(r'extern "C"[^(]*\b(parallax_\w+)\(', f.read()))
    assert declared and declared == defined


CXX = shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_binding_compiles_against_installed_torch_headers():
    from torch.utils.cpp_extension import include_paths
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type"]
    cmd += [f"-I{p}" for p in include_paths()] + [f"-I{CSRC}", os.path.join(CSRC, "binding.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


STUB = r"""
#include "ops.h"
extern "C" {
const char* parallax_error_string(int) { return "stub"; }
int parallax_num_sms(int) { return 1; }
int parallax_add_rms_norm(void*, void*, const void*, const void*, const void*, int64_t, int64_t,
                          float, int, cudaStream_t) { return 1; }
int parallax_rotary_embedding(void*, void*, const float*, const float*, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              int64_t, int, cudaStream_t) { return 1; }
int parallax_decode_attention(void*, const void*, const void*, const void*, const int*, float*,
                              float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int64_t, float, int, int, cudaStream_t) { return 1; }
int parallax_decode_num_splits(int64_t, int64_t, int64_t, int64_t, int) { return 1; }
int parallax_int8_linear(void*, const void*, const int8_t*, const void*, const void*, int64_t,
                         int64_t, int64_t, int, cudaStream_t) { return 1; }
int parallax_paged_head_dim_ok(int64_t) { return 1; }
int parallax_paged_attention(const ParallaxPagedAttention*, cudaStream_t) { return 1; }
int parallax_paged_num_splits(int64_t, int64_t, int64_t, int64_t, int64_t, int) { return 1; }
}
"""


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the real extension is tested on GPUs")
def test_binding_registers_schemas_and_fakes(tmp_path):
    """Build binding.cpp with stub launchers, load it, and run the Python wrappers on meta
    tensors: checks the schemas parse and match the wrappers' calls and fake impls."""
    from torch.utils.cpp_extension import load

    from parallax.ops import cuda as C

    stub = tmp_path / "stub.cpp"
    stub.write_text(STUB)
    load(name="parallax_binding_stub", sources=[os.path.join(CSRC, "binding.cpp"), str(stub)],
         extra_include_paths=[CSRC], is_python_module=False, build_directory=str(tmp_path))
    C._register_fakes()
    for name, n_written in [("rms_norm", 1), ("add_rms_norm", 2), ("rotary_embedding", 2),
                            ("decode_attention", 1), ("int8_linear", 1),
                            ("paged_attention_with_kvcache", 3)]:
        schema = getattr(torch.ops.parallax, name).default._schema
        written = [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write]
        assert len(written) == n_written and not schema.returns, str(schema)
    m = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(3, 64, **m)
    assert C.rms_norm(x, torch.empty(64, **m), 1e-5).shape == x.shape
    o, r = C.add_rms_norm(x, torch.empty(3, 64, **m), torch.empty(64, **m), 1e-5)
    assert o.shape == r.shape == x.shape
    q, k = torch.empty(2, 5, 8, 64, **m), torch.empty(2, 5, 2, 64, **m)
    cs = torch.empty(2, 5, 32, device="meta")
    assert C.rotary_embedding(q, k, cs, cs)[0] is q
    lens = torch.empty(2, device="meta", dtype=torch.int32)
    out = C.decode_attention(torch.empty(2, 8, 64, **m), torch.empty(2, 2, 100, 64, **m),
                             torch.empty(2, 2, 100, 64, **m), lens, 0.125)
    assert out.shape == (2, 8, 64)
    qw = torch.empty(48, 64, device="meta", dtype=torch.int8)
    y = C.int8_linear(torch.empty(2, 3, 64, **m), qw, torch.empty(48, **m), None)
    assert y.shape == (2, 3, 48)
    i32 = dict(device="meta", dtype=torch.int32)
    qp, kp = torch.empty(7, 8, 64, **m), torch.empty(7, 2, 64, **m)
    cache = torch.empty(10, 2, 16, 64, **m)
    cs = torch.empty(7, 32, device="meta")
    out = C.paged_attention_with_kvcache(
        qp, kp, kp, cache, cache, cs, cs, torch.empty(7, device="meta", dtype=torch.long),
        torch.empty(2, 3, **i32), torch.empty(2, **i32), torch.empty(3, **i32), 0.125, 4, 30.0)
    assert out.shape == qp.shape and out.dtype == qp.dtype


@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n, k", [(960, 576), (12288, 64), (6, 10)])
def test_cpu_small_m_linear_matches_reference(m, n, k):
    """ops/cpu.py's batched-gemm decode matmul equals F.linear, with and without bias and
    for non-contiguous (column-major) inputs."""
    from parallax.ops import cpu
    w = torch.randn(n, k)
    b = torch.randn(n)
    x = torch.randn(k, m).t()                       # column-major (m, k)
    limit = cpu.SMALL_M if torch.get_num_threads() > 1 else cpu.SMALL_M_1_THREAD
    assert cpu.use_small_m(x, w) == (n % 2 == 0 and m <= limit)
    for bias in (None, b):
        got = cpu.linear_small_m(x.unsqueeze(1), w, bias)
        exact = F.linear(x.unsqueeze(1).double(), w.double(),
                         None if bias is None else bias.double())
        # Worst-case fp32 dot-product rounding bound, whatever the summation order.
        bound = (k + 1) * 2.0**-24 * (F.linear(x.unsqueeze(1).double().abs(), w.double().abs())
                                      + (0 if bias is None else bias.double().abs()))
        assert got.shape == exact.shape and got.is_contiguous()
        assert ((got.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("isa", HERE)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 13, 37, 130])
@pytest.mark.parametrize("n, k", [(64, 1), (192, 70), (960, 576), (128, 1536)])
def test_cpu_packed_kernel_matches_reference(m, n, k, threads, isa):
    """csrc/cpu/gemm_f32.c in every variant this CPU runs (every tile remainder, K blocks,
    1 and 2 threads, column-major x) equals its torch twin reference.linear_packed, which
    equals F.linear on the unpacked weight."""
    from parallax.ops import cpu
    assert cpu.kernels(isa) is not None, cpu.build_error(isa)
    w, b = torch.randn(n, k), torch.randn(n)
    packed = cpu.pack(w)
    assert torch.equal(cpu.unpack(packed), w)
    x = torch.randn(k, m).t()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu.linear_packed(x.unsqueeze(0), packed, b, isa=isa)
    finally:
        torch.set_num_threads(old)
    twin = ref.linear_packed(x.unsqueeze(0), packed, b)
    exact = F.linear(x.unsqueeze(0).double(), w.double(), b.double())
    # The worst-case rounding bound of an fp32 dot product of length K+1 (bias included),
    # whatever the summation order: (K+1) * 2^-24 * sum |x_k w_k|.
    bound = (k + 1) * 2.0**-24 * (F.linear(x.unsqueeze(0).double().abs(), w.double().abs())
                                  + b.double().abs())
    assert ((out.double() - exact).abs() <= bound).all()
    assert ((twin.double() - exact).abs() <= bound).all()
    ids = torch.randint(0, n, (3, 5))
    assert torch.equal(cpu.embedding_packed(ids, packed), w[ids])


# ----------------------------------------------------------------------------- CPU decode ops

def _decode_inputs(b, hq, hk, d, s_cap, lens, dtype=torch.float32, seed=0):
    """q, k, v as strided views of one fused qkv row per sequence (as the model makes them),
    random caches, rotary angles and per-sequence context lengths."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, (hq + 2 * hk) * d, generator=g, dtype=dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    kc = torch.randn(b, hk, s_cap, d, generator=g, dtype=dtype)
    vc = torch.randn(b, hk, s_cap, d, generator=g, dtype=dtype)
    theta = torch.rand(b, d // 2, generator=g) * 100.0
    return (q.view(b, hq, d), k.view(b, hk, d), v.view(b, hk, d), kc, vc, theta.cos(),
            theta.sin(), torch.tensor(lens, dtype=torch.int32))


def test_reference_decode_attention_with_kvcache_is_rotate_write_attend():
    """The reference equals its definition spelled out: rotate q and k, store k and v at slot
    len - 1 of each row (nothing else in the cache changes), attend over [0, len)."""
    q, k, v, kc, vc, cos, sin, lens = _decode_inputs(3, 6, 2, 16, 12, [1, 12, 5],
                                                     dtype=torch.float64)
    kc0, vc0 = kc.clone(), vc.clone()
    out = ref.decode_attention_with_kvcache(q, k, v, kc, vc, cos, sin, lens, 0.25)
    rq, rk = ref.rotary_embedding(q[:, None], k[:, None], cos[:, None], sin[:, None])
    for i, n in enumerate(lens.tolist()):
        assert torch.equal(kc[i, :, n - 1], rk[i, 0]) and torch.equal(vc[i, :, n - 1], v[i])
        keep = torch.arange(12) != n - 1
        assert torch.equal(kc[i][:, keep], kc0[i][:, keep])
        assert torch.equal(vc[i][:, keep], vc0[i][:, keep])
        kk = kc[i, :, :n].repeat_interleave(3, 0)                     # (Hq, n, D)
        vv = vc[i, :, :n].repeat_interleave(3, 0)
        p = torch.softmax((rq[i, 0][:, None] @ kk.transpose(-1, -2))[:, 0] * 0.25, -1)  # (Hq, n)
        assert rel_err(out[i], (p[:, None] @ vv)[:, 0]) < 1e-6   # rotary runs in fp32


@pytest.mark.parametrize("isa", HERE)
@pytest.mark.parametrize("hq,hk,d", [(9, 3, 64), (4, 4, 128), (8, 1, 32), (6, 2, 80)])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_decode_attention_with_kvcache_matches_reference(hq, hk, d, threads, isa):
    """csrc/cpu/decode_f32.c against its torch twin: ragged lengths from 1 to past two
    128-key blocks of the online softmax, strided q/k/v views, the same cache writes."""
    from parallax.ops import cpu
    lens = [1, 300, 128, 129, 37]
    q, k, v, kc, vc, cos, sin, lens_t = _decode_inputs(5, hq, hk, d, 300, lens, seed=hq + d)
    assert cpu.attention_layout_ok(q, k, v, kc, vc, cos, sin, lens_t)
    kc2, vc2 = kc.clone(), vc.clone()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in (kc, vc):
            t[:, :, -1] = float("nan")      # poisoned: slots past a length must not be read
        kc2[:, :, -1] = vc2[:, :, -1] = float("nan")
        lens_t[1] = 299
        out = cpu.decode_attention_with_kvcache(q, k, v, kc, vc, cos, sin, lens_t, d ** -0.5,
                                                isa=isa)
    finally:
        torch.set_num_threads(old)
    want = ref.decode_attention_with_kvcache(q, k, v, kc2, vc2, cos, sin, lens_t, d ** -0.5)
    assert out.shape == want.shape and torch.isfinite(out).all()
    assert rel_err(out, want) < 1e-5
    assert torch.allclose(kc, kc2, atol=1e-6, equal_nan=True)
    assert torch.equal(vc.nan_to_num(), vc2.nan_to_num())


def test_dispatched_decode_attention_with_kvcache_composes_where_c_does_not_apply():
    """float64 (no C kernel): the dispatcher's rotary + write + attention equals the reference."""
    args = _decode_inputs(2, 4, 2, 16, 9, [3, 9], dtype=torch.float64)
    twin = [a.clone() for a in args]
    out = ops.decode_attention_with_kvcache(*args, 0.3)
    assert torch.equal(out, ref.decode_attention_with_kvcache(*twin, 0.3))
    assert torch.equal(args[3], twin[3]) and torch.equal(args[4], twin[4])


@pytest.mark.parametrize("isa", HERE)
@pytest.mark.parametrize("d", [576, 100, 7])
def test_cpu_norms_and_silu_and_mul_match_reference(d, isa):
    g = torch.Generator().manual_seed(d)
    x, r = torch.randn(3, 5, d, generator=g), torch.randn(3, 5, d, generator=g)
    w = torch.randn(d, generator=g)
    out, res = cpu.add_rms_norm(x, r, w, 1e-5, isa=isa)
    want, want_res = ref.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(res, want_res) and rel_err(out, want) < 1e-6
    plain = cpu.add_rms_norm(x, None, w, 1e-5, isa=isa)[0]
    assert rel_err(plain, ref.rms_norm(x, w, 1e-5)) < 1e-6
    gu = torch.randn(4, 1, 2 * d, generator=g)
    assert rel_err(cpu.silu_and_mul(gu, isa=isa), ref.silu_and_mul(gu)) < 1e-6
    s = gu.double()
    assert rel_err(ref.silu_and_mul(gu), F.silu(s[..., :d]) * s[..., d:]) < 1e-6


@pytest.mark.parametrize("isa", HERE)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 7, 256, 257, 1000, 49152])
def test_cpu_argmax_rows_equals_torch_argmax(n, threads, isa):
    """Random rows, ties (the first index wins, also across the kernel's 256-value chunks),
    -inf everywhere, +inf, and NaN (the first NaN wins, before or after the maximum): the
    same index as torch.argmax, its reference twin."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(12, n, generator=g)
        x[1] = torch.randint(0, 3, (n,), generator=g).float()            # many ties
        x[2] = float("-inf")
        x[3, n // 2] = x[3, n - 1] = float("inf")
        x[4, n - 1] = float("nan")
        x[5, n // 3] = float("nan")
        x[5, 0] = 100.0
        x[6, 0] = float("nan")
        x[7] = 0.0
        x[8, n - 1] = x[8].max() + 1                                      # max in the last value
        x[9, :] = 5.0
        x[9, n // 2:] = 6.0
        x[10] = -x[10].abs() - 1                                          # all negative
        x[11] = -0.0
        x[11, n - 1] = 0.0                                                # equal to -0.0
        assert torch.equal(cpu.argmax_rows(x, isa=isa), ref.argmax_rows(x))
        assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
        assert torch.equal(cpu.argmax_rows(x[:1], isa=isa), x[:1].argmax(dim=-1))
    finally:
        torch.set_num_threads(before)


def test_argmax_rows_dispatch_falls_back_to_torch():
    x = torch.randn(3, 50, dtype=torch.float64)
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
    t = torch.randn(50, 3).t()                                            # not contiguous
    assert torch.equal(ops.argmax_rows(t), t.argmax(dim=-1))


@pytest.mark.parametrize("isa", HERE)
@pytest.mark.parametrize("bad", [0, -1, 13, 2**31 - 1])
def test_cpu_decode_attention_refuses_context_lens_outside_the_cache(bad, isa):
    """A length of 0, a negative one or one past the cache's 12 slots is an error naming the
    sequence, and nothing is written (the caches stay bitwise equal, NaN poison included)."""
    q, k, v, kc, vc, cos, sin, lens = _decode_inputs(3, 4, 2, 32, 12, [5, 12, 1])
    kc[:, :, -1] = vc[:, :, 0] = float("nan")
    kc0, vc0 = kc.clone(), vc.clone()
    lens[1] = bad
    with pytest.raises(KernelInputError, match=r"context_lens\[1\]"):
        cpu.decode_attention_with_kvcache(q, k, v, kc, vc, cos, sin, lens, 0.2, isa=isa)
    assert torch.equal(kc.nan_to_num(7.0), kc0.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), vc0.nan_to_num(7.0))
    assert issubclass(KernelInputError, ParallaxError)


# ----------------------------------------------------------------------------- CPU variants

@pytest.fixture(scope="module")
def variant_builds() -> dict:
    """``cpu.build`` of every variant (into the usual cache), all started at once: each is one
    single-threaded compiler process. Variant -> its finished future."""
    return concurrently({v: functools.partial(cpu.build, v) for v in cpu.VARIANTS})


@pytest.mark.parametrize("variant", list(cpu.VARIANTS))
def test_every_cpu_variant_builds_and_names_itself(variant, variant_builds):
    """Each variant compiles on any machine (so an AVX-512 machine also builds the AVX2
    code); the ones this CPU runs load and report the vector width they were built for."""
    path = variant_builds[variant].result()
    assert os.path.getsize(path) > 0
    if variant in HERE:
        assert cpu.kernels(variant) == variant
        assert cpu.load_library(variant, path) == variant   # what the library says it is


@pytest.mark.parametrize("cc", COMPILERS)
@pytest.mark.parametrize("variant", list(cpu.VARIANTS))
@pytest.mark.parametrize("std", ["gnu99", "gnu11"])
def test_cpu_sources_compile_warning_free(cc, variant, std, tmp_path):
    """GCC and clang, C99 and C11 with GNU extensions, -Wall -Wextra -Werror: no builtin that
    needs a recent compiler (GCC 9 lacks __builtin_shufflevector). (clang reports `omp simd`
    loops over expf it cannot vectorise without a vector expf: a hint, not an error.)"""
    quiet = ["-Wno-pass-failed"] if cc.startswith("clang") else []
    cmds = []
    for src in cpu._SOURCES:
        for i, extra in enumerate((["-fopenmp", "-DPARALLAX_MVEC", *quiet], quiet)):
            cmds.append([cc, "-c", "-O2", f"-std={std}", "-Wall", "-Wextra", "-Werror",
                         "-Wno-unknown-pragmas", *cpu.VARIANTS[variant][0], *extra,
                         os.path.join(CSRC, "cpu", src), "-o", str(tmp_path / f"{src}.{i}.o")])
        with open(os.path.join(CSRC, "cpu", src)) as f:
            assert "__builtin_shufflevector" not in f.read()
    for cmd, r in zip(cmds, run_all(cmds, timeout=120)):
        assert r.returncode == 0, (" ".join(cmd), r.stderr[-3000:])


@pytest.fixture(scope="module")
def compiler_builds(tmp_path_factory) -> dict:
    """The best variant here built afresh (an empty cache folder) by each compiler, all
    started at once: each is one single-threaded compiler process. Compiler -> its
    finished future."""
    assert cpu.torch_ops() is not None, cpu.build_error()   # the shim, from the usual cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARALLAX_CACHE_DIR", str(tmp_path_factory.mktemp("cc_builds")))
        return concurrently({cc: functools.partial(cpu.build, HERE[0], cc=shutil.which(cc))
                             for cc in COMPILERS})


@pytest.mark.parametrize("cc", COMPILERS)
def test_cpu_kernels_built_by_each_compiler_match_reference(cc, compiler_builds, monkeypatch):
    """The library each compiler builds (the best variant here) computes the same matmul and
    attention as the torch twins."""
    variant = HERE[0]
    assert cpu.torch_ops() is not None, cpu.build_error()   # the shim, from the usual cache
    monkeypatch.setitem(cpu._libs, f"{variant}-{cc}", None)   # forgotten after the test
    assert cpu.load_library(f"{variant}-{cc}", compiler_builds[cc].result()) == variant
    w, x = torch.randn(192, 70), torch.randn(11, 70)
    out = cpu.linear_packed(x, cpu.pack(w), isa=f"{variant}-{cc}")
    assert rel_err(out, ref.linear_packed(x, cpu.pack(w))) < 1e-5
    args = _decode_inputs(2, 4, 2, 32, 20, [20, 3])
    twin = [a.clone() for a in args]
    out = cpu.decode_attention_with_kvcache(*args, 0.2, isa=f"{variant}-{cc}")
    assert rel_err(out, ref.decode_attention_with_kvcache(*twin, 0.2)) < 1e-5


def test_forcing_a_variant_the_cpu_lacks_is_an_error(monkeypatch):
    missing = [v for v in cpu.VARIANTS if v not in HERE]
    monkeypatch.setenv("PARALLAX_CPU_ISA", missing[0] if missing else "sse9")
    with pytest.raises(ParallaxError, match="PARALLAX_CPU_ISA"):
        cpu.best_variant()
    monkeypatch.setenv("PARALLAX_CPU_ISA", HERE[-1])
    assert cpu.best_variant() == "generic"


def test_next_variant_loads_where_the_best_does_not_build(monkeypatch, caplog):
    """A best variant whose build fails (say, a compiler too old for -mavxvnni) gives way to
    the next one the CPU runs, with a warning, instead of turning every kernel off."""
    monkeypatch.delenv("PARALLAX_CPU_ISA", raising=False)
    real_build = cpu.build

    def build(variant, *a, **k):
        if variant == "newest":
            raise ParallaxError("cc: error: unrecognized command-line option '-mnewest'")
        return real_build(variant, *a, **k)

    monkeypatch.setattr(cpu, "build", build)
    monkeypatch.setattr(cpu, "supported_variants", lambda: ["newest", *HERE])
    monkeypatch.setattr(cpu, "_BEST", ["newest"])
    monkeypatch.setattr(cpu, "_libs", dict(cpu._libs))
    monkeypatch.setattr(cpu, "_build_errors", {})
    with caplog.at_level("WARNING", logger=cpu.logger.name):
        assert cpu.kernels() == HERE[0]
    assert cpu._BEST == [HERE[0]] and "-mnewest" in cpu.build_error("newest")
    assert f"using {HERE[0]} (newest did not build)" in caplog.text


def test_build_failure_keeps_the_compiler_message(tmp_path, monkeypatch):
    """A compiler that fails: kernels() is None, the message is kept for kernel_report and
    logged once, and the ops fall back to torch."""
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal error: no such header frobnicate.h' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PARALLAX_CC", str(fake))
    monkeypatch.setenv("PARALLAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "_libs", {})
    monkeypatch.setattr(cpu, "_build_errors", {})
    assert cpu.kernels("generic") is None and cpu.kernels("generic") is None
    assert "frobnicate.h" in cpu.build_error("generic")


@pytest.mark.parametrize("forced", ["kernel", "torch"])
def test_packed_matmul_path_can_be_forced(forced, monkeypatch):
    monkeypatch.setenv("PARALLAX_CPU_MATMUL", forced)
    w = torch.randn(64, 40)
    assert cpu.matmul_path(3, cpu.pack(w)) == forced
    x = torch.randn(3, 40)
    bound = 41 * 2.0**-24 * (x.double().abs() @ w.double().abs().t())
    out = cpu.linear_packed_auto(x, cpu.pack(w))
    assert ((out.double() - x.double() @ w.double().t()).abs() <= bound).all()


def test_packed_matmul_takes_the_faster_path_once_per_shape_and_bucket(monkeypatch):
    """The choice is measured once per (N, K, row bucket, threads), cached, reported, and
    followed: here torch is made to look faster for rows 5-8 only."""
    monkeypatch.delenv("PARALLAX_CPU_MATMUL", raising=False)
    monkeypatch.setattr(cpu, "_choices", {})
    timed = []

    def fake_time(kernel, torch_path, rows, k, weights=()):
        timed.append(rows)
        return {"kernel_us": 10.0, "torch_us": 5.0 if rows == 8 else 20.0,
                "path": "torch" if rows == 8 else "kernel"}

    monkeypatch.setattr(cpu, "_time_paths", fake_time)
    used = []
    monkeypatch.setattr(cpu, "linear_packed", lambda *a, **k: used.append("kernel"))
    monkeypatch.setattr(cpu._ref, "linear_packed", lambda *a, **k: used.append("torch"))
    packed = cpu.pack(torch.randn(96, 24))
    for rows in (1, 6, 8, 1, 7, 3):
        cpu.linear_packed_auto(torch.randn(rows, 24), packed)
    assert used == ["kernel", "torch", "torch", "kernel", "torch", "kernel"]
    assert timed == [1, 8, 4]
    rows = {c["rows"]: c["path"] for c in cpu.matmul_choices()}
    assert rows == {1: "kernel", 8: "torch", 4: "kernel"}
    assert {(c["weight"], c["n"], c["k"]) for c in cpu.matmul_choices()} == {("f32", 96, 24)}
    assert ops.kernel_report()["matmul"] == cpu.matmul_choices()


def test_measured_choice_times_both_paths():
    """The real timer returns both medians and the path its margin implies."""
    packed = cpu.pack(torch.randn(64, 32))
    c = cpu._time_paths(lambda x: cpu.linear_packed(x, packed),
                        lambda x: ref.linear_packed(x, packed), 4, 32)
    assert c["kernel_us"] > 0 and c["torch_us"] > 0 and 5 <= c["rounds"] <= 11
    won = (c["torch_us"] < cpu.TORCH_MARGIN * c["kernel_us"]
           and c["torch_won_rounds"] > c["rounds"] / 2)
    assert c["path"] == ("torch" if won else "kernel")


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_decode_choices_are_timed_on_weights_flushed_from_cache(rows, monkeypatch):
    """A decode step reads each weight from memory once, so up to COLD_ROWS rows each timed
    call of either path follows a flush of the weight from the caches (no copies: choosing
    costs no memory); prefill row counts, bound by arithmetic, are timed on the weight as
    it is."""
    if cpu.torch_ops() is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("cache flushing is an x86 instruction; other CPUs time on copies (below)")
    packed = cpu.pack(torch.randn(64, 256))
    events = []
    flush = cpu._flush
    monkeypatch.setattr(cpu, "_flush", lambda w: events.append("flush") or flush(w))

    def runner(name, fn):
        def run(x, p):
            assert p.data_ptr() == packed.data_ptr()
            events.append(name)
            return fn(x, p)
        return run

    c = cpu._time_paths(runner("kernel", cpu.linear_packed),
                        runner("torch", ref.linear_packed), rows, 256, (packed,))
    if rows <= cpu.COLD_ROWS:
        timed = events[3:]      # after a warm-up call of each path and the first flush
        assert c["flushed"] and c["copies"] == 1
        assert timed[1::2] == ["kernel", "torch"] * c["rounds"]      # every call ...
        assert timed[0::2] == ["flush"] * (2 * c["rounds"])          # ... right after a flush
    else:
        assert not c["flushed"] and "flush" not in events


def test_flush_cache_keeps_the_values():
    """The flush op writes cache lines back before dropping them: the tensor is unchanged."""
    if cpu.torch_ops() is None:
        pytest.skip("the torch ops shim did not build here")
    t = torch.randn(1000, 77)[:, :64].contiguous()
    before = t.clone()
    t.add_(1.0)                         # dirty lines in cache
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert cpu.torch_ops().flush_cache(t) is x86
    assert torch.equal(t, before + 1.0)


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_decode_choices_are_timed_on_weight_copies_where_no_flush(rows, monkeypatch):
    """Where the caches cannot be flushed, up to COLD_ROWS rows both paths are timed
    round-robin over copies of the weight that together overflow the last-level cache 1.5
    times (here made 1 MiB), each copy equal to the weight (and alive: distinct addresses);
    prefill row counts are timed on the weight itself."""
    monkeypatch.setattr(cpu, "_flush", lambda w: False)
    monkeypatch.setattr(cpu, "last_level_cache_bytes", lambda: 1 << 20)
    monkeypatch.setattr(cpu, "COLD_SWEEP_S", 60.0)      # no time cap on the copies here
    packed = cpu.pack(torch.randn(64, 256))             # 64 KiB: 24 copies make 1.5 MiB
    seen = {"kernel": {}, "torch": {}}

    def runner(name, fn):
        def run(x, p):
            seen[name][p.data_ptr()] = torch.equal(p, packed)
            return fn(x, p)
        return run

    c = cpu._time_paths(runner("kernel", cpu.linear_packed),
                        runner("torch", ref.linear_packed), rows, 256, (packed,))
    want = 24 if rows <= cpu.COLD_ROWS else 1
    for name in seen:
        assert len(seen[name]) == want and all(seen[name].values())
        assert packed.data_ptr() in seen[name]
    assert c["copies"] == want and c["kernel_us"] > 0 and c["torch_us"] > 0


def test_cold_copies_stop_at_the_sweep_budget(monkeypatch):
    """Slow calls get fewer copies, so that one round stays within COLD_SWEEP_S."""
    monkeypatch.setattr(cpu, "last_level_cache_bytes", lambda: 1 << 30)
    w = (torch.zeros(16),)
    assert len(cpu._cold_copies(w, cpu.COLD_SWEEP_S / 5)) == 5
    assert len(cpu._cold_copies(w, 1.0)) == 1


def test_choice_needs_torch_to_win_most_rounds(monkeypatch):
    """One fast torch run among slow ones (an unlucky kernel round on a busy machine) does
    not make torch the choice; torch winning every round does."""
    clock = iter(range(10**6))
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: float(next(clock)))
    # each call advances the fake clock by its sleep: kernel 10 ticks, torch 20 except once
    ticks = {"kernel": [10] * 20, "torch": [20, 2] + [20] * 18}

    def runner(name):
        def run(x):
            for _ in range(ticks[name].pop(0) - 1):
                next(clock)
        return run

    c = cpu._time_paths(runner("kernel"), runner("torch"), 1, 8)
    assert c["torch_us"] < c["kernel_us"] and c["path"] == "kernel"
    ticks.update(kernel=[10] * 20, torch=[5] * 20)
    assert cpu._time_paths(runner("kernel"), runner("torch"), 1, 8)["path"] == "torch"


@pytest.mark.parametrize("bad", [0, -3, 10])
def test_dispatched_decode_attention_refuses_bad_lens_where_c_does_not_apply(bad):
    """float64 (the torch path, whose cache write would wrap a slot of -1 to the end): the
    dispatcher refuses the length before writing, for both decode entry points."""
    args = list(_decode_inputs(2, 4, 2, 16, 9, [3, 9], dtype=torch.float64))
    args[-1][0] = bad
    kc0 = args[3].clone()
    with pytest.raises(KernelInputError, match=r"context_lens\[0\]"):
        ops.decode_attention_with_kvcache(*args, 0.3)
    assert torch.equal(args[3], kc0)
    with pytest.raises(KernelInputError, match=r"outside \[1, 9\]"):
        ops.decode_attention(args[0], args[3], args[4], args[-1], 0.3)


@pytest.mark.parametrize("isa", HERE)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 17])
@pytest.mark.parametrize("n, k", [(64, 48), (37, 70), (192, 576), (6, 9)])
def test_cpu_int8_kernel_matches_reference(m, n, k, isa):
    """csrc/cpu/int8_f32.c in every variant this CPU runs (row and k tails, bias, strided x)
    against reference.int8_linear, both within the fp32 dot-product rounding bound of the
    exact product with the dequantised weight."""
    g = torch.Generator().manual_seed(m * n + k)
    qw, sc = ref.quantize_int8(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g)
    x = torch.randn(k, m, generator=g).t()
    out = cpu.int8_linear(x, qw, sc, b, isa=isa)
    w = qw.double() * sc.double()[:, None]
    exact = x.double() @ w.t() + b.double()
    bound = (k + 2) * 2.0**-24 * (x.double().abs() @ w.abs().t() + b.double().abs())
    assert out.shape == (m, n)
    assert ((out.double() - exact).abs() <= bound).all()
    assert ((ref.int8_linear(x, qw, sc, b).double() - exact).abs() <= bound).all()


def test_int8_linear_dispatches_to_the_cpu_kernel(monkeypatch):
    monkeypatch.setenv("PARALLAX_CPU_MATMUL", "kernel")
    used = []
    real = cpu.int8_linear
    monkeypatch.setattr(cpu, "int8_linear", lambda *a, **k: used.append(1) or real(*a, **k))
    qw, sc = ref.quantize_int8(torch.randn(40, 32))
    x = torch.randn(3, 32)
    assert rel_err(ops.int8_linear(x, qw, sc), ref.int8_linear(x, qw, sc)) < 1e-6
    assert used == ([1] if cpu.kernels() is not None else [])
