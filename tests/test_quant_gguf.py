"""GGUF Q8_0 weights kept quantized: the C kernel against its torch twin (every CPU variant
this machine runs) and against gguf's own dequantisation; LLM(gguf) with Q8_0 weights against
the same file dequantised to fp32 (the old path), in one process and under tp=2 / pp=2."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from parallax.ops import cpu, reference

VARIANTS = cpu.supported_variants()


def q8_0_bytes(w: np.ndarray) -> torch.Tensor:
    """(N, K) float32 -> Q8_0 rows (N, K/32*34) uint8, by gguf's own quantiser."""
    q = gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.ascontiguousarray(q))


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("m,n,k", [(1, 7, 32), (3, 33, 96), (5, 64, 256), (9, 17, 160),
                                   (17, 40, 64), (1, 1, 32)])
def test_q8_0_kernel_matches_twin(isa, m, n, k):
    if cpu.kernels(isa) is None:
        pytest.fail(f"CPU kernels ({isa}) did not build: {cpu.build_error(isa)}")
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g).numpy()
    qw = q8_0_bytes(w)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    want = reference.q8_0_linear(x, qw, bias)
    got = cpu.q8_0_linear(x, qw, bias, isa=isa)
    # Same dequantised values, different summation order: fp32 rounding only.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_q8_0_dequantize_matches_gguf():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(13, 128, generator=g) * 3).numpy()
    w[0, :32] = 0.0                    # an all-zero block (scale 0)
    w[1, 32:64] = 1e-6                 # a block whose fp16 scale is subnormal
    qw = q8_0_bytes(w)
    want = torch.from_numpy(gguf.quants.dequantize(qw.numpy(), gguf.GGMLQuantizationType.Q8_0))
    assert torch.equal(reference.q8_0_dequantize(qw), want.reshape(13, 128))
    x = torch.randn(2, 128, generator=g)
    for isa in VARIANTS:
        torch.testing.assert_close(cpu.q8_0_linear(x, qw, isa=isa), x @ want.reshape(13, 128).T,
                                   rtol=1e-5, atol=1e-5)
