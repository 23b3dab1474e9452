"""Static KV cache: per-layer K and V buffers of shape (B, Hk_local, S, D), allocated once
per generate() call for the batch's longest prompt plus max_new_tokens.

Slot s of sequence b holds the key/value of the token at position s, so the valid part of
row b is ``[0, context_len[b])`` and ragged batches need only per-sequence lengths.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        # Zeros, not empty: masked-out slots are multiplied by 0 in attention, and 0 * NaN
        # from uninitialised memory would poison the output.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def layer(self, i: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (k, v) for the sequences in ``rows`` (a view: writes land in the cache)."""
        return self.k[i][rows], self.v[i][rows]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
