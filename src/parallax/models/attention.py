"""The attention backend and the paged KV-cache contract, as every model layer sees them.

A model computes q, k, v for a flat batch of new tokens (the tokens of all scheduled
requests, concatenated) and hands them to ``PagedAttention`` with the step's
``AttentionMetadata``; the layer rotates q and k, writes the new k and v into the cache
blocks named by ``slot_mapping`` and attends, per sequence and causally, over the blocks of
its block table. The model never sees a cache layout: caches are (num_blocks, Hk,
block_size, D) tensors handed in per layer by the runner (engine/runner.py), so that one
KV head's keys of one block are ``block_size`` contiguous rows for the CPU kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops


@dataclass
class AttentionMetadata:
    """One step's flat batch, shared by every layer (all int tensors on the model's device).

    positions:       (T,) long, each new token's position in its sequence.
    slot_mapping:    (T,) long, each new token's cache slot (block * block_size + offset).
    block_tables:    (B, max_blocks) int32, each sequence's cache blocks in order.
    context_lens:    (B,) int32, tokens in the cache per sequence after this step.
    query_start_loc: (B+1,) int32, sequence b's new tokens are [qsl[b], qsl[b+1]).
    """
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @classmethod
    def build(cls, seqs: list[tuple[int, int, list[int]]], block_size: int,
              device: torch.device | str = "cpu") -> "AttentionMetadata":
        """From (num_computed_tokens, num_new_tokens, block_table) per sequence. Built in
        Python lists, then one tensor each: per-sequence tensor writes cost more than the
        rest of a decode step's host work (~5 us each, 64 sequences)."""
        positions, slots, qsl, lens, rows = [], [], [0], [], []
        width = max(len(t) for _, _, t in seqs)
        for start, n, table in seqs:
            end = start + n
            positions += range(start, end)
            slots += [table[p // block_size] * block_size + p % block_size
                      for p in range(start, end)]
            qsl.append(end - start + qsl[-1])
            lens.append(end)
            rows.append([*table, *[0] * (width - len(table))])
        return cls(torch.tensor(positions, dtype=torch.long, device=device),
                   torch.tensor(slots, dtype=torch.long, device=device),
                   torch.tensor(rows, dtype=torch.int32, device=device),
                   torch.tensor(lens, dtype=torch.int32, device=device),
                   torch.tensor(qsl, dtype=torch.int32, device=device))


class PagedAttention(nn.Module):
    """Rotary + paged cache write + causal GQA attention of a flat token batch
    (ops.paged_attention_with_kvcache). No parameters.

    ``window``: attend only to the last ``window`` positions (sliding-window layers);
    ``softcap``: soft-cap the scaled scores, c * tanh(s / c) (Gemma 2).

    forward(q (T, Hq, D), k (T, Hk, D), v (T, Hk, D), cos, sin (T, D/2) float32, meta,
    k_cache, v_cache (num_blocks, Hk, block_size, D)) -> (T, Hq, D).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 window: int | None = None, softcap: float | None = None,
                 rope_base: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale
        self.window, self.softcap = window, softcap
        self.rope_base = rope_base   # PARALLAX_NUMERICS=ggml rotates by position (ops/ggml.py)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, meta: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        if ops.ggml.enabled():
            return ops.ggml.paged_attention_with_kvcache(q, k, v, k_cache, v_cache, meta,
                                                         self.scale, self.rope_base)
        return ops.paged_attention_with_kvcache(q, k, v, k_cache, v_cache, cos, sin,
                                                meta.slot_mapping, meta.block_tables,
                                                meta.context_lens, meta.query_start_loc,
                                                self.scale, self.window, self.softcap)
