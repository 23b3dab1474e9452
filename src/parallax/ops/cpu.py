"""CPU fast paths: the matmul (packed fp32 and int8 weights) and, in C, the small ops of a
decode step (csrc/cpu/decode_f32.c: add + RMSNorm, SiLU-and-mul, decode attention with
rotary and the cache write), each the twin of a reference in ops/reference.py.

The C sources are built just in time, once per instruction-set variant (``VARIANTS``:
avx512, avx2, generic; csrc/cpu/isa.h), and the variant the CPU runs best is loaded
(``PARALLAX_CPU_ISA`` forces one). torch calls them as ops of the ``parallax_cpu`` library
(``torch.ops.parallax_cpu.*``: schemas, fake tensors, torch.compile, torch's thread count):
a small C++ shim (csrc/cpu/torch_ops.cpp, built once by torch.utils.cpp_extension and
cached) registers the ops and calls into whichever variant's library it was given by name.
GGUF block weights go through q8_0_f32.c's exact kernels (Q8_0, Q4_0) or, with
``PARALLAX_GGUF_ACTIVATIONS=q8``, csrc/cpu/q8_act.c (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K: x rounded
to 8-bit blocks once per matmul, integer dot products). Packed fp32 weights (fp32 CPU
weights whose shard rows are a multiple of 32), int8 and block weights go through their
kernel or through torch on the same values, whichever measured faster for that weight shape
and row count (``choose``).
Other fp32 weights take the batched-gemm form below.

For x with M <= 16 rows, MKL's sgemv/sgemm path behind ``F.linear`` streams the weight
at ~12 GB/s on this class of machine and does not use a second thread; the same product
as a batched matmul over row blocks of the weight, ``W (c, N/c, K) @ x^T (c, K, M)``,
goes through MKL's batched gemm, which runs the blocks in parallel and reaches ~45 GB/s
(benchmarks/: bench_generate.py). Same signature and result as ``reference.linear``.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import time

import torch

from ..errors import KernelInputError, ParallaxError
from . import reference as _ref

logger = logging.getLogger(__name__)

SMALL_M = 16          # with >= 2 threads the blocks run in parallel: pays up to 16 rows
SMALL_M_1_THREAD = 4  # on one thread only the better gemv kernel pays, and only for few rows


def _blocks(n: int) -> int:
    for c in (4, 2):
        if n % c == 0:
            return c
    return 1


def use_small_m(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_small_m`` applies (and pays) for this call."""
    limit = SMALL_M if torch.get_num_threads() > 1 else SMALL_M_1_THREAD
    return (not x.is_cuda and x.numel() <= limit * x.shape[-1] and weight.dim() == 2
            and weight.is_contiguous() and _blocks(weight.shape[0]) > 1)


def linear_small_m(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias. x: (..., K) with few rows; weight: (N, K) contiguous."""
    n, k = weight.shape
    c = _blocks(n)
    # Row-major x matters: MKL's batched gemm is ~2.5x slower when x^T arrives contiguous.
    rows = x.reshape(-1, k).contiguous()                               # (M, K)
    w = weight.view(c, n // c, k)                                      # (c, N/c, K)
    y = torch.bmm(w, rows.t().unsqueeze(0).expand(c, k, rows.shape[0]))  # (c, N/c, M)
    y = y.view(n, -1).t().contiguous()                                 # (M, N)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------
# Building csrc/cpu: one shared library per instruction-set variant.

PANEL = 32

# Every C source of the library. The torch ops (csrc/cpu/torch_ops.cpp) call its entry points.
_SOURCES = ["gemm_f32.c", "decode_f32.c", "int8_f32.c", "q8_0_f32.c", "q8_act.c",
            "paged_attention_f32.c", "layer_f32.c", "ggml_pointwise.c", "ggml_attention.c"]

# variant -> (compiler flags, /proc/cpuinfo flags the code needs); best first. The x86
# variants are separate builds of the same sources (csrc/cpu/isa.h picks the vector width
# from these flags), so each is compiled and tested on any x86 machine that can run it.
_AVX512 = (["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
           {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"})
_AVX2 = (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"})
VARIANTS = {
    # the VNNI variants: the same code but for the 8-bit dot products (csrc/cpu/q8_act.c)
    "avx512vnni": (_AVX512[0] + ["-mavx512vnni"], _AVX512[1] | {"avx512_vnni"}),
    "avx512": _AVX512,
    "avxvnni": (_AVX2[0] + ["-mavxvnni"], _AVX2[1] | {"avx_vnni"}),   # GCC 11+, clang 12+
    "avx2": _AVX2,
    "generic": ([], set()),
}
# -ffp-contract=fast: fused multiply-adds also under -std=c11 (GCC's ISO modes turn them off).
_CFLAGS = ["-O3", "-std=gnu11", "-ffp-contract=fast", "-fPIC", "-shared"]

_libs: dict[str, str | None] = {}   # variant -> its name in the torch ops, or None
_build_errors: dict[str, str] = {}   # variant (or "torch_ops", the shim) -> why it is off
_loaded: dict[str, tuple[str, str]] = {}   # name -> (library path, ISA it was built for)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        line = ""
    return set(line.partition(":")[2].split())


def supported_variants() -> list[str]:
    """The variants this CPU can run, best first ("generic" always)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    flags = cpu_flags()
    return [v for v, (cflags, need) in VARIANTS.items()
            if not cflags or (x86 and need <= flags)]


def best_variant() -> str:
    """``PARALLAX_CPU_ISA`` when set (it must be one this CPU runs), else the best variant."""
    ok = supported_variants()
    want = os.environ.get("PARALLAX_CPU_ISA", "").strip().lower()
    if not want:
        return ok[0]
    if want not in ok:
        raise ParallaxError(f"PARALLAX_CPU_ISA={want!r}: this CPU runs {ok}; unset it or pick "
                            "one of those")
    return want


def compiler() -> str | None:
    """``PARALLAX_CC`` when set, else the first of gcc, cc, clang on the PATH."""
    cc = os.environ.get("PARALLAX_CC")
    if cc:
        return shutil.which(cc) or cc
    return next((p for p in map(shutil.which, ("gcc", "cc", "clang")) if p), None)


def build(variant: str, cc: str | None = None, extra_flags: tuple[str, ...] = ()) -> str:
    """Compile csrc/cpu into ``cpu_kernels-<variant>-<hash>.so`` under the cache folder
    (``PARALLAX_CACHE_DIR`` or ~/.cache/parallax; keyed by sources, compiler and flags) and
    return its path. Tries, in order: OpenMP with glibc's vector math (libmvec), OpenMP
    alone, neither (single-threaded kernels). Raises ParallaxError with the compiler's
    message when nothing builds."""
    cc = cc or compiler()
    if cc is None:
        raise ParallaxError("no C compiler found (gcc, cc or clang; or set PARALLAX_CC)")
    folder = os.path.join(os.path.dirname(__file__), "..", "csrc", "cpu")
    srcs = [os.path.join(folder, name) for name in _SOURCES]
    flags = _CFLAGS + VARIANTS[variant][0] + list(extra_flags)
    digest = hashlib.sha256(" ".join([cc, *flags]).encode())
    for path in sorted(srcs + glob.glob(os.path.join(folder, "*.h"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    cache = _cache_dir()
    out = os.path.join(cache, f"cpu_kernels-{variant}-{digest.hexdigest()[:16]}.so")
    if os.path.exists(out):
        return out
    os.makedirs(cache, exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    gomp = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    omp = ["-fopenmp", gomp if os.path.exists(gomp) else "-lgomp"]
    errors = []
    for opts in (["-DPARALLAX_MVEC", *omp, "-lmvec"], omp, ["-Wno-unknown-pragmas"]):
        cmd = [cc, *flags, *srcs, *opts, "-lm", "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            if opts[-1] == "-Wno-unknown-pragmas":
                logger.warning("CPU kernels (%s) built without OpenMP: single-threaded. %s",
                               variant, errors[-1].strip()[-2000:])
            os.replace(tmp, out)   # atomic: concurrent ranks may build at once
            return out
        errors.append(f"$ {' '.join(cmd)}\n{r.stderr}")
    raise ParallaxError(f"could not build the CPU kernels ({variant}):\n" + errors[-1][-4000:])


def build_torch_ops() -> str:
    """Compile csrc/cpu/torch_ops.cpp (the ``parallax_cpu`` torch ops) with
    torch.utils.cpp_extension into ``<cache>/torch_ops/<name>/<name>.so`` (name keyed by the
    source and torch's version) and return its path; an existing build is reused, so each
    machine compiles it once. Raises where it cannot be built (no C++ compiler or ninja)."""
    src = os.path.join(os.path.dirname(__file__), "..", "csrc", "cpu", "torch_ops.cpp")
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read() + torch.__version__.encode()).hexdigest()[:16]
    name = f"parallax_cpu_ops_{digest}"
    folder = os.path.join(_cache_dir(), "torch_ops", name)
    out = os.path.join(folder, f"{name}.so")
    # cpp_extension holds `lock` while it builds: a library seen without it is complete.
    if os.path.exists(out) and not os.path.exists(os.path.join(folder, "lock")):
        return out
    os.makedirs(folder, exist_ok=True)
    from torch.utils.cpp_extension import load
    logger.info("building the CPU kernels' torch ops (once per machine) in %s", folder)
    t0 = time.perf_counter()
    load(name=name, sources=[os.path.abspath(src)], build_directory=folder,
         is_python_module=False, extra_cflags=["-O2"], extra_ldflags=["-ldl"])
    logger.info("built the CPU kernels' torch ops in %.1f s", time.perf_counter() - t0)
    return out


_TORCH_OPS: list = []


def torch_ops():
    """``torch.ops.parallax_cpu`` once the shim is built and loaded in this process, or None
    where it cannot be (logged once; the ops then fall back to torch)."""
    if not _TORCH_OPS:
        ns = None
        try:
            torch.ops.load_library(build_torch_ops())
            from . import cpu_fakes  # noqa: F401  (fake tensor rules, for torch.compile)
            ns = torch.ops.parallax_cpu
        except Exception as e:   # no C++ compiler, no ninja, ...: fall back, loudly
            _build_errors["torch_ops"] = str(e)
            logger.warning("CPU kernels' torch ops unavailable, using torch: %s", e)
        _TORCH_OPS.append(ns)
    return _TORCH_OPS[0]


def load_library(name: str, path: str) -> str:
    """Load the kernel library at ``path`` (a ``build`` output) into the torch ops as
    ``name``, the ``isa`` the ops then take; returns the vector ISA the library was built for
    (its ``parallax_cpu_isa()``)."""
    built_for = torch_ops().load_variant(name, path)
    _libs[name] = name
    _loaded[name] = (path, built_for)
    return built_for


def loaded_library(name: str) -> tuple[str, str] | None:
    """(path, the vector ISA it was built for) of the kernel library loaded as ``name``
    (a variant), or None when none is."""
    return _loaded.get(name)


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result (torch.compile: a constant of the process, not
    traced) without its ``import torch._dynamo``, ~1.3 s of CPU in every process that
    imports parallax (workers and ranks too): the marker that function sets."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def kernels(variant: str | None = None) -> str | None:
    """The name under which the torch ops call ``variant``'s kernels (default:
    ``best_variant()``), or None where they cannot be built: the failure and the compiler's
    message are logged once and kept for ``kernel_report``. ``PARALLAX_KERNELS=reference``
    turns them off. The op wrappers below call it before they look up their op: the first
    call loads the ops into ``torch.ops.parallax_cpu``."""
    if variant is None:
        variant = _best()
        if (_load(variant) is None and variant in _build_errors and compiler() is not None
                and not os.environ.get("PARALLAX_CPU_ISA", "").strip()):
            # e.g. a compiler too old for -mavxvnni: the next variant this CPU runs
            ok = supported_variants()
            for other in ok[ok.index(variant) + 1:]:
                if _load(other, quiet=True) is not None:
                    logger.warning("CPU kernels: using %s (%s did not build)", other, variant)
                    _BEST[:] = [other]
                    return _libs[other]
        return _libs[variant]
    return _load(variant)


def _load(variant: str, quiet: bool = False) -> str | None:
    """Build and load ``variant`` once; a failure is kept and logged (a warning, or with
    ``quiet``, a fallback after the best variant's warning, at debug level)."""
    if variant not in _libs:
        _libs[variant] = None
        if _mode() != "reference" and torch_ops() is not None:
            try:
                load_library(variant, build(variant))
            except Exception as e:   # no compiler, sandboxed /tmp, ...: fall back, loudly
                _build_errors[variant] = str(e)
                logger.log(logging.DEBUG if quiet else logging.WARNING,
                           "CPU kernels (%s) unavailable, using torch: %s", variant, e)
    return _libs[variant]


def build_error(variant: str | None = None) -> str | None:
    """Why ``kernels(variant)`` is None (the compiler's message), or None."""
    return _build_errors.get(variant or _best()) or _build_errors.get("torch_ops")


def _cache_dir() -> str:
    return os.environ.get("PARALLAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "parallax")


def _mode() -> str:
    return os.environ.get("PARALLAX_KERNELS", "auto").strip().lower()


_BEST: list[str] = []


def _best() -> str:
    if not _BEST:
        _BEST.append(best_variant())
    return _BEST[0]


def can_pack(weight: torch.Tensor) -> bool:
    """fp32 CPU weights whose row count is a whole number of panels."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.shape[0] % PANEL == 0 and kernels() is not None)


def _panels(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    return weight.t().reshape(k, n // PANEL, PANEL).permute(1, 0, 2)


def pack(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) -> (N/32, K, 32) panels of W^T, contiguous (written into ``out`` if given,
    e.g. one of ``panel_buffers``)."""
    if out is None:
        return _panels(weight).contiguous()
    return out.copy_(_panels(weight))


def panel_buffers(shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Uninitialised fp32 buffers for ``pack(out=)`` of (N, K) weights of ``shapes``, laid
    out one after another in one mapping on transparent huge pages (ops/hugepages.py: a
    decode step streams the panels, and on 4 KiB pages it pays a TLB miss and a hardware
    prefetcher restart every 4 KiB)."""
    from .hugepages import arena
    return arena([(n // PANEL, k, PANEL) for n, k in shapes], torch.float32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(N/32, K, 32) panels -> the (N, K) weight (a copy)."""
    p, k, _ = packed.shape
    return packed.permute(1, 0, 2).reshape(k, p * PANEL).t().contiguous()


def linear_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
                  *, isa: str | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W given as panels (see pack), by the C kernel of variant
    ``isa`` (default: the one in use). x: (..., K) float32."""
    lib = kernels(isa)
    return torch.ops.parallax_cpu.gemm_packed_f32.default(x, packed, bias, lib)


def linear_packed_auto(x: torch.Tensor, packed: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear_packed by whichever of the C kernel and torch's matmul on the same panels
    (reference.linear_packed) was faster for this weight shape and row count (see
    ``choose``)."""
    if matmul_path(x.numel() // x.shape[-1], packed) == "kernel":
        return linear_packed(x, packed, bias)
    return _ref.linear_packed(x, packed, bias)


def matmul_path(rows: int, packed: torch.Tensor) -> str:
    """``choose`` for the packed fp32 matmul of ``rows`` rows by this weight."""
    p, k, _ = packed.shape
    return choose("f32", p * PANEL, k, rows, linear_packed, _ref.linear_packed, (packed,))


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None, *, isa: str | None = None) -> torch.Tensor:
    """reference.int8_linear by csrc/cpu/int8_f32.c: x (..., K) float32, qweight (N, K) int8
    contiguous, scales (N,) float32. The weight is widened in registers, never in memory."""
    lib = kernels(isa)
    return torch.ops.parallax_cpu.int8_linear_f32.default(x, qweight, scales, bias, lib)


def int8_linear_auto(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """int8_linear by the C kernel or the reference (dequantise, then F.linear), whichever
    measured faster for this shape and row count (``choose``)."""
    n, k = qweight.shape
    path = choose("int8", n, k, x.numel() // k, int8_linear, _ref.int8_linear,
                  (qweight, scales))
    if path == "kernel":
        return int8_linear(x, qweight, scales, bias)
    return _ref.int8_linear(x, qweight, scales, bias)


def int8_fits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether int8_linear's C kernel takes these tensors."""
    return (fits(x, scales) and qweight.dtype == torch.int8 and qweight.device.type == "cpu"
            and qweight.dim() == 2 and qweight.is_contiguous() and scales.is_contiguous())


def _block_linear(kind: str, x: torch.Tensor, qweight: torch.Tensor,
                  bias: torch.Tensor | None = None, isa: str | None = None) -> torch.Tensor:
    """y = x @ W^T + bias, W in GGUF ``kind`` blocks ("q8_0", "q4_0": reference.GGUF_BLOCKS),
    x as it is (fp32), by the C kernel ``parallax_<kind>_linear_f32`` (csrc/cpu/q8_0_f32.c)."""
    lib = kernels(isa)
    n_el, nbytes = _ref.GGUF_BLOCKS[kind]
    op = torch.ops.parallax_cpu.block_linear_f32.default
    return op(x, qweight, bias, kind, n_el, nbytes, lib)


def q8_0_linear(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None,
                *, isa: str | None = None) -> torch.Tensor:
    """reference.q8_0_linear by csrc/cpu/q8_0_f32.c: x (..., K) float32, qweight
    (N, K/32*34) uint8 Q8_0 rows, contiguous. Blocks are dequantised in registers."""
    return _block_linear("q8_0", x, qweight, bias, isa)


def q4_0_linear(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None,
                *, isa: str | None = None) -> torch.Tensor:
    """reference.q4_0_linear by csrc/cpu/q8_0_f32.c: qweight (N, K/32*18) uint8 Q4_0 rows."""
    return _block_linear("q4_0", x, qweight, bias, isa)


def quantize_act(kind: str, x: torch.Tensor, *, isa: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.quantize_act by csrc/cpu/q8_act.c (what the *_linear_q8 kernels do to x):
    x (M, K) float32 contiguous -> (codes (M, K) int8, scales, sums) of ``kind`` ("q8_0",
    "q8_1", "q8_k") activation blocks."""
    lib = kernels(isa)
    return torch.ops.parallax_cpu.quantize_act.default(x, kind, lib)


def quantize_q8(x: torch.Tensor, *, isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.quantize_q8 by csrc/cpu/q8_act.c: x (M, K) float32 contiguous -> (codes
    (M, K) int8, scales (M, K/32) float32) of ggml's block_q8_0."""
    return quantize_act("q8_0", x, isa=isa)[:2]


def block_linear_q8(kind: str, x: torch.Tensor, qweight: torch.Tensor,
                    bias: torch.Tensor | None = None, *, isa: str | None = None) -> torch.Tensor:
    """reference.{kind}_linear_q8 by csrc/cpu/q8_act.c: x (..., K) float32 rounded to 8-bit
    blocks, then integer dot products with the ``kind`` ("q8_0", "q4_0", "q4_1", "q4_k",
    "q6_k") blocks of qweight (N, K/32 * block bytes; K-quants K/256 * super-block bytes)
    uint8, as llama.cpp does. Raises torch.OutOfMemoryError when the int8 codes of x
    cannot be allocated."""
    lib = kernels(isa)
    n_el, nbytes = _ref.GGUF_BLOCKS[kind]
    return torch.ops.parallax_cpu.block_linear_q8.default(x, qweight, bias, kind, n_el, nbytes, lib)


def q8_0_linear_ggml(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None,
                     *, isa: str | None = None) -> torch.Tensor:
    """block_linear_q8("q8_0", ...) in llama.cpp's order of arithmetic (csrc/cpu/q8_act.c
    EXACT_Q8_0; the twin reference.q8_0_linear_ggml): x (..., K) float32, qweight
    (N, K/32*34) uint8 -> (..., N) float32, bit-equal to llama.cpp's CPU build of the same
    ISA level (PARALLAX_NUMERICS=ggml)."""
    lib = kernels(isa)   # first: it loads the torch ops
    return torch.ops.parallax_cpu.block_linear_ggml.default(
        x, qweight, bias, "q8_0", *_ref.GGUF_BLOCKS["q8_0"], lib)


DEQUANT_CHUNK_BYTES = 2 << 20   # fp32 bytes of weight rows dequantised at a time (its
# temporaries are a few times this: the peak RSS of timing the torch path, ops.cpu.choose)


def block_linear_dequant(kind: str, x: torch.Tensor, qweight: torch.Tensor,
                         bias: torch.Tensor | None = None, *, q8: bool = False) -> torch.Tensor:
    """The torch path of a ``kind`` block matmul: dequantise a few MiB of weight rows at a
    time and F.linear them into their output columns, so no full fp32 copy of the weight
    is ever made (reference.{kind}_linear's result, column block by column block; with
    ``q8``, x is first rounded to 8-bit blocks: reference.{kind}_linear_q8's)."""
    n = qweight.shape[0]
    k = _ref.gguf_k(kind, qweight)
    rows, s = x.reshape(-1, k), None
    if q8:
        rows, s = _ref.q8_activations(kind, rows)
    step = max(1, DEQUANT_CHUNK_BYTES // (4 * k))
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        y[:, r0:r1] = _ref.linear_q8_values(kind, rows, s, qweight[r0:r1],
                                            None if bias is None else bias[r0:r1])
    return y.view(*x.shape[:-1], n)


ACTIVATIONS = ("f32", "q8")
_Q8_NAMES = {kind: f"{kind}*q8" for kind in _ref.GGUF_BLOCKS}   # choose()'s weight kinds


def block_activations() -> str:
    """How block-weight matmuls take x on the CPU: ``PARALLAX_GGUF_ACTIVATIONS``, "f32"
    (default: x as it is, the weights dequantised in registers: exact up to fp32 rounding)
    or "q8" (rounded to 8-bit blocks, integer dot products, as llama.cpp: faster, but on
    SmolLM2-135M it changes a chat answer, as it does in llama.cpp: docs/kernels.md)."""
    mode = os.environ.get("PARALLAX_GGUF_ACTIVATIONS") or "f32"
    if mode == "f32" and os.environ.get("PARALLAX_NUMERICS", "").strip().lower() == "ggml":
        return "q8"   # ops/ggml.py: llama.cpp's activations
    if mode not in ACTIVATIONS:
        mode = mode.strip().lower() or "f32"
    if mode not in ACTIVATIONS:
        raise ParallaxError(f"PARALLAX_GGUF_ACTIVATIONS={mode!r}: use f32 (default) or q8")
    return mode


F32_KERNELS = ("q8_0", "q4_0")   # block kinds with an fp32-activation kernel (q8_0_f32.c)


def block_linear_auto(kind: str, x: torch.Tensor, qweight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """The ``kind`` ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k") matmul with x taken as
    ``block_activations()`` says, by the C kernel or by block_linear_dequant on the same
    values, whichever measured faster for this shape and row count (``block_kernel``)."""
    k = x.shape[-1]
    q8 = block_activations() == "q8"
    if block_kernel(kind, qweight, k, x.numel() // k, q8) is not None:
        return (block_linear_q8 if q8 else _block_linear)(kind, x, qweight, bias)
    return block_linear_dequant(kind, x, qweight, bias, q8=q8)


def block_kernel(kind: str, qweight: torch.Tensor, k: int, rows: int,
                 q8: bool | None = None) -> str | None:
    """The ``choose`` weight kind whose C kernel takes a ``kind`` block matmul of ``rows``
    rows ("q8_0", or "q8_0*q8" with 8-bit activations, ...), or None when torch's
    dequantising path does (it measured faster, or with f32 activations only Q8_0 and
    Q4_0 have a kernel). ``q8``: 8-bit activations (default: ``block_activations()``)."""
    n = qweight.shape[0]
    if q8 is None:
        q8 = block_activations() == "q8"
    if q8:
        path = choose(_Q8_NAMES[kind], n, k, rows, functools.partial(block_linear_q8, kind),
                      functools.partial(block_linear_dequant, kind, q8=True), (qweight,))
        return _Q8_NAMES[kind] if path == "kernel" else None
    if kind not in F32_KERNELS:
        return None
    path = choose(kind, n, k, rows, functools.partial(_block_linear, kind),
                  functools.partial(block_linear_dequant, kind), (qweight,))
    return kind if path == "kernel" else None


def block_fits(kind: str, x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether the ``kind`` block kernel takes these tensors (x fp32 on the CPU, qweight
    uint8 (N, K/32 * block bytes) contiguous, the kernels built)."""
    return (x.dtype == torch.float32 and not x.is_cuda and qweight.dtype == torch.uint8
            and not qweight.is_cuda and qweight.dim() == 2 and qweight.is_contiguous()
            and qweight.shape[1] * _ref.GGUF_BLOCKS[kind][0]
            == x.shape[-1] * _ref.GGUF_BLOCKS[kind][1]
            and kernels() is not None)


# Row-count buckets (inclusive upper bound, rows timed): decode batches, then prefill chunks.
ROW_BUCKETS = ((1, 1), (4, 4), (8, 8), (16, 16), (64, 64), (None, 256))
TORCH_MARGIN = 0.95   # torch is chosen only when clearly faster: ties keep the kernel
_choices: dict[tuple[str, int, int, int | None, int], dict] = {}


def row_bucket(rows: int) -> tuple[int | None, int]:
    """(inclusive upper bound or None, rows timed) of the bucket holding ``rows``."""
    return next(b for b in ROW_BUCKETS if b[0] is None or rows <= b[0])


_BUCKET_OF = {r: row_bucket(r) for r in range(1, 257)}   # the per-call lookup, precomputed


def choose(kind: str, n: int, k: int, rows: int, kernel, torch_path, weights: tuple = ()) -> str:
    """"kernel" or "torch" for a ``kind`` ("f32", "int8", "q8_0", "q8_0*q8": Q8_0
    weights by 8-bit activations, ...) matmul of ``rows`` rows by an (n, k) weight held
    in the tensors ``weights``: both paths are timed once per (kind, n, k, row bucket,
    threads) on this machine (``kernel(x, *weights)``, ``torch_path(x, *weights)`` on random
    x; decode buckets on weights not in cache, as a decode step reads them: ``_time_paths``),
    the choice cached, logged and listed by ``matmul_choices``.
    ``PARALLAX_CPU_MATMUL=kernel|torch`` fixes it instead."""
    forced = os.environ.get("PARALLAX_CPU_MATMUL")
    if forced and forced.strip().lower() in ("kernel", "torch"):
        return forced.strip().lower()
    hi, timed = _BUCKET_OF.get(rows) or row_bucket(rows)
    key = (kind, n, k, hi, torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _time_paths(kernel, torch_path, timed, k, weights)
        copies = choice.get("copies", 1)
        how = ("weight flushed from cache" if choice.get("flushed")
               else f"{copies} weight copies" if copies > 1 else "in cache")
        logger.info("CPU %s matmul %d x %d, rows <= %s: kernel %.0f us, torch %.0f us -> %s "
                    "(%s)", kind, n, k, hi if hi is not None else "any",
                    choice["kernel_us"], choice["torch_us"], choice["path"], how)
    return choice["path"]


COLD_ROWS = 16            # row buckets up to this are decode steps: timed with cold weights
COLD_SWEEP_S = 0.008      # at most this long per path per round over the weight copies


def last_level_cache_bytes() -> int:
    """The CPU's largest cache in bytes (sysfs; 32 MiB where unknown)."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KM")) * scale)
        except (OSError, ValueError):
            pass
    return max(sizes, default=32 << 20)


def _cold_copies(weights: tuple, seconds_per_call: float) -> list[tuple]:
    """``weights`` and enough copies of them to overflow the last-level cache 1.5 times
    (so that each call in a round-robin reads its weight from memory, as each matmul of a
    decode step does), fewer where one sweep would exceed COLD_SWEEP_S. Only where the
    cache cannot be flushed (``_flush``): the copies cost memory while they are timed."""
    nbytes = sum(t.numel() * t.element_size() for t in weights)
    if nbytes == 0:
        return [weights]
    want = -(-int(1.5 * last_level_cache_bytes()) // nbytes)
    count = max(1, min(want, int(COLD_SWEEP_S / max(seconds_per_call, 1e-7))))
    return [weights] + [tuple(t.clone() for t in weights) for _ in range(count - 1)]


def _flush(weights: tuple) -> bool:
    """Drop ``weights`` from every cache (x86 clflush, the ``flush_cache`` op) so the next
    call reads them from memory; False where that cannot be done."""
    ops = torch_ops()
    return (ops is not None and all(t.is_contiguous() for t in weights)
            and all(ops.flush_cache(t) for t in weights))


def _time_paths(kernel, torch_path, rows: int, k: int, weights: tuple = ()) -> dict:
    """Time both paths on random (rows, k) input in interleaved rounds (5 at least, up to
    11 within ~0.3 s). Up to COLD_ROWS rows a matmul streams its weight from memory, so
    each call is timed on ``weights`` just dropped from the caches (``_flush``; where that
    cannot be done, each round calls each path once per copy of ``weights``, 3 to 11 rounds
    within ~0.1 s: ``_cold_copies``): timed on a weight in cache, both paths would run
    several times faster than a decode step ever sees them. torch is chosen only when it
    wins both ways: its fastest round beats the kernel's fastest by TORCH_MARGIN, and it
    wins that margin in most rounds. Load from other processes only ever adds time, and on
    a shared machine it can hit either side of a round; requiring both keeps one unlucky
    run from flipping the choice for good."""
    x = torch.randn(rows, k)
    paths = {"kernel": kernel, "torch": torch_path}
    for fn in paths.values():   # warm up: first touches, MKL's buffers
        fn(x, *weights)
    cold = bool(weights) and rows <= COLD_ROWS
    flushed = cold and _flush(weights)
    sets = [weights]
    if cold and not flushed:
        slowest = 0.0
        for fn in paths.values():
            t0 = time.perf_counter()
            fn(x, *weights)
            slowest = max(slowest, time.perf_counter() - t0)
        sets = _cold_copies(weights, slowest)
    times: dict[str, list[float]] = {name: [] for name in paths}
    first, budget = (3, 0.1) if len(sets) > 1 else (5, 0.3)
    t_end = time.perf_counter() + budget
    for rep in range(11):
        for name, fn in paths.items():
            if flushed:
                _flush(weights)
            t0 = time.perf_counter()
            for w in sets:
                fn(x, *w)
            times[name].append((time.perf_counter() - t0) / len(sets))
        if rep >= first - 1 and time.perf_counter() > t_end:
            break
    kernel_us, torch_us = (min(times[n]) * 1e6 for n in ("kernel", "torch"))
    wins = sum(t < TORCH_MARGIN * kt for t, kt in zip(times["torch"], times["kernel"]))
    torch_wins = torch_us < TORCH_MARGIN * kernel_us and wins > len(times["torch"]) / 2
    return {"kernel_us": kernel_us, "torch_us": torch_us, "rounds": len(times["torch"]),
            "torch_won_rounds": wins, "copies": len(sets), "flushed": flushed,
            "path": "torch" if torch_wins else "kernel"}


def matmul_choices() -> list[dict]:
    """Every measured choice so far: weight kind, N, K, rows (bucket bound), threads,
    times, path."""
    return [{"weight": kind, "n": n, "k": k, "rows": hi, "threads": t, **c}
            for (kind, n, k, hi, t), c in sorted(_choices.items(), key=lambda kv: str(kv[0]))]


def embedding_packed(ids: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of W (an embedding tied to a packed LM head). ids: (...) -> (..., K)."""
    return packed[ids // PANEL, :, ids % PANEL]


# ---------------------------------------------------------------------------------------
# The small ops of a decode step (csrc/cpu/decode_f32.c). Callers check ``fits``.

def fits(*tensors: torch.Tensor) -> bool:
    """All fp32 CPU tensors and the kernels built: the C ops below apply."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) \
        and kernels() is not None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, *, isa: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rms_norm(x + residual) * weight, x + residual); residual None: (rms_norm(x), None).
    x, residual: (..., D) contiguous; weight: (D,)."""
    lib = kernels(isa)
    out, res = torch.ops.parallax_cpu.add_rms_norm_f32.default(x, residual, weight, eps, lib)
    return out, None if residual is None else res


def silu_and_mul(x: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
    """x (..., 2N) contiguous -> silu(x[..., :N]) * x[..., N:], (..., N)."""
    lib = kernels(isa)
    return torch.ops.parallax_cpu.silu_and_mul_f32.default(x, lib)


def ggml_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                  isa: str | None = None) -> torch.Tensor:
    """ggml_reference.rms_norm by csrc/cpu/ggml_pointwise.c: x (..., D) contiguous, weight
    (D,) float32 -> (..., D), llama.cpp's RMS_NORM then MUL bit for bit."""
    lib = kernels(isa)
    return torch.ops.parallax_cpu.ggml_rms_norm_f32.default(x, weight, eps, lib)


def ggml_swiglu(x: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
    """ggml_reference.swiglu by csrc/cpu/ggml_pointwise.c: x (..., 2N) = [gate | up]
    contiguous float32 -> (..., N), llama.cpp's SWIGLU bit for bit."""
    lib = kernels(isa)
    return torch.ops.parallax_cpu.ggml_swiglu_f32.default(x, lib)


def ggml_rope(x: torch.Tensor, positions: torch.Tensor, freq_base: float, neox: bool = True,
              *, isa: str | None = None) -> torch.Tensor:
    """ggml_reference.rope by csrc/cpu/ggml_pointwise.c: x (T, H, D) float32 rotated at
    positions (T,) int32 -> a new (T, H, D), llama.cpp's ROPE bit for bit; ``neox``: pairs
    (i, i + D/2) (HF's head layout), else (2i, 2i + 1) (GGUF's)."""
    lib = kernels(isa)
    return torch.ops.parallax_cpu.ggml_rope_f32.default(x, positions, freq_base, neox, lib)


def ggml_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   scale: float, step_rows: int, n_kv: int = 0, n_threads: int = 1, *,
                   isa: str | None = None) -> torch.Tensor:
    """ggml_reference.ggml_attention by csrc/cpu/ggml_attention.c: one sequence, q (T, Hq, D)
    in GGUF's head-dim order, k, v (S, Hk, D) holding fp16 values, positions (T,) int32
    (row t sees keys 0..positions[t]) -> (T, Hq, D) float32, llama.cpp's FLASH_ATTN_EXT
    over an F16 cache bit for bit: its algorithm for a call of ``step_rows`` query rows, and
    for one row with its padded KV length ``n_kv`` >= 512 its split over ``n_threads``."""
    lib = kernels(isa)
    return torch.ops.parallax_cpu.ggml_attention_f32.default(q, k, v, positions, scale,
                                                              step_rows, n_kv, n_threads, lib)


def argmax_rows(x: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
    """x (M, N) contiguous, N >= 1 -> (M,) int64, the first index of each row's largest
    value (a NaN counting as the largest): reference.argmax_rows."""
    lib = kernels(isa)
    return torch.ops.parallax_cpu.argmax_rows_f32.default(x, lib)


def decode_attention_with_kvcache(q, k, v, k_cache, v_cache, cos, sin, context_lens, scale,
                                  *, isa: str | None = None):
    """reference.decode_attention_with_kvcache in one call. Requires unit stride along D,
    heads D apart in q/k/v, cache slots D apart, cos/sin contiguous (B, D/2), int32 lens.
    Raises KernelInputError (and writes nothing) when a context length is outside
    [1, cache slots]."""
    lib = kernels(isa)
    return _checked(
        torch.ops.parallax_cpu.decode_attention_kv_f32.default,
        (q, k, v, k_cache, v_cache, cos, sin, context_lens, scale, lib),
        lambda bad: f"decode attention: context_lens[{bad - 1}] = {int(context_lens[bad - 1])} "
                    f"is outside [1, {k_cache.shape[2]}] (the cache's slots); nothing was written")


def attention_layout_ok(q, k, v, k_cache, v_cache, cos, sin, context_lens) -> bool:
    """Whether decode_attention_with_kvcache's C kernel can read these tensors as they are."""
    d = q.shape[-1]
    rows = all(t.stride(-1) == 1 and t.stride(-2) == d for t in (q, k, v, k_cache, v_cache))
    return (rows and d % 16 == 0 and d <= 256 and q.shape[1] // k.shape[1] <= 16
            and k_cache.stride() == v_cache.stride() and cos.is_contiguous()
            and sin.is_contiguous() and context_lens.dtype == torch.int32
            and context_lens.is_contiguous() and context_lens.shape[0] == q.shape[0])


_PAGED_ERRORS = {-1: "a slot in slot_mapping is negative or beyond the cache's capacity",
                 -2: "a context length is shorter than its new tokens or needs more blocks "
                     "than the block table has",
                 -3: "a block id in a block table is negative or beyond the cache",
                 -4: "query_start_loc does not cover the tokens (or a sequence has none)",
                 -5: "unsupported shape (head dim a multiple of 16 up to 256, <= 16 query "
                     "heads per KV head, block size dividing 128)"}


def paged_attention_with_kvcache(q, k, v, k_cache, v_cache, cos, sin, slot_mapping,
                                 block_tables, context_lens, query_start_loc, scale,
                                 window: int | None = None, softcap: float | None = None,
                                 *, isa: str | None = None):
    """reference.paged_attention_with_kvcache in one C call (csrc/cpu/paged_attention_f32.c),
    sliding ``window`` and score ``softcap`` included. Needs ``paged_layout_ok``; raises
    KernelInputError on out-of-range metadata, writing nothing."""
    lib = kernels(isa)
    return _checked(
        torch.ops.parallax_cpu.paged_attention_kv_f32.default,
        (q, k, v, k_cache, v_cache, cos, sin, slot_mapping, block_tables, context_lens,
         query_start_loc, scale, window or 0, softcap or 0.0, lib),
        lambda err: f"paged attention: {_PAGED_ERRORS.get(err, err)}")


def _checked(op, args: tuple, explain) -> torch.Tensor:
    """``op(*args)`` for an attention op whose C kernel refuses bad metadata with a code
    (the op's ValueError "parallax_cpu error <code>", nothing written): that becomes
    KernelInputError(explain(code)). Under torch.compile the op is traced as is."""
    if torch.compiler.is_compiling():
        return op(*args)
    try:
        return op(*args)
    except ValueError as e:
        m = re.search(r"parallax_cpu error (-?\d+)", str(e))
        if m is None:
            raise
        raise KernelInputError(explain(int(m.group(1)))) from None


def paged_layout_ok(q, k, v, k_cache, v_cache, cos, sin, slot_mapping, block_tables,
                    context_lens, query_start_loc) -> bool:
    """Whether the paged C kernel can read these tensors as they are."""
    d, bs = q.shape[-1], k_cache.shape[2]
    rows = all(t.stride(-1) == 1 and t.stride(-2) == d for t in (q, k, v))
    shape = (d % 16 == 0 and d <= 256 and q.shape[1] % k.shape[1] == 0
             and q.shape[1] // k.shape[1] <= 16 and 128 % bs == 0)
    return (rows and shape and k_cache.is_contiguous() and v_cache.is_contiguous()
            and k_cache.shape == v_cache.shape and cos.is_contiguous() and sin.is_contiguous()
            and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
            and all(x.dtype == torch.int32 and x.is_contiguous()
                    for x in (block_tables, context_lens, query_start_loc)))


# ---------------------------------------------------------------------------------------
# The halves of a Llama decoder layer in one op each (csrc/cpu/layer_f32.c).

def attention_half(x, residual, norm_weight, eps, w_qkv, qkv_kind, b_qkv, w_o, o_kind, k_cache,
                   v_cache, cos, sin, slot_mapping, block_tables, context_lens,
                   query_start_loc, num_heads, num_kv_heads, scale, window=0, softcap=0.0,
                   *, isa: str | None = None):
    """reference.fused_attention_half in one C call: add + RMSNorm, q|k|v matmul, paged
    attention (needs ``paged_layout_ok``'s layouts), o_proj matmul; weight kinds "f32"
    (packed), "q8_0" / "q4_0" (fp32 activations) or "<block>*q8". Raises KernelInputError
    on out-of-range metadata, writing nothing into the cache."""
    lib = kernels(isa)
    return _checked(
        torch.ops.parallax_cpu.attention_half_f32.default,
        (x, residual, norm_weight, eps, w_qkv, qkv_kind, b_qkv, w_o, o_kind, k_cache, v_cache,
         cos, sin, slot_mapping, block_tables, context_lens, query_start_loc, num_heads,
         num_kv_heads, scale, window, softcap, lib),
        lambda err: f"paged attention: {_PAGED_ERRORS.get(err, err)}")


def mlp_half(x, residual, norm_weight, eps, w_gate_up, gate_up_kind, w_down, down_kind,
             intermediate, *, isa: str | None = None):
    """reference.fused_mlp_half in one C call: add + RMSNorm, gate|up matmul, SiLU-and-mul,
    down matmul."""
    lib = kernels(isa)
    return torch.ops.parallax_cpu.mlp_half_f32.default(
        x, residual, norm_weight, eps, w_gate_up, gate_up_kind, w_down, down_kind,
        intermediate, lib)
