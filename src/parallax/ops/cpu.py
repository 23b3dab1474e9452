"""CPU fast path for the decode-time matmul (few rows, large weight).

For x with M <= 16 rows, MKL's sgemv/sgemm path behind ``F.linear`` streams the weight
at ~12 GB/s on this class of machine and does not use a second thread; the same product
as a batched matmul over row blocks of the weight, ``W (c, N/c, K) @ x^T (c, K, M)``,
goes through MKL's batched gemm, which runs the blocks in parallel and reaches ~45 GB/s
(benchmarks/: bench_generate.py). Same signature and result as ``reference.linear``.
"""

from __future__ import annotations

import torch

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
