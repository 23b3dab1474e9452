"""What each rank of a tp x pp layout holds, computed from the sharding math alone.

``rank_plan`` counts parameters exactly as ``models/llama.py`` allocates them, without
reading a weight, so ``parallax info`` can print memory per rank for a layout before anyone
builds it (tests/test_cli.py checks it against ``LLM.memory()`` byte for byte):

- per layer: fused qkv (column-parallel, this rank's query heads + KV slots, + bias for
  qwen2), o_proj (row-parallel: local query heads x hidden), fused gate_up and down_proj
  (intermediate split evenly), two norms replicated on every tp rank;
- the vocab-parallel embedding (vocab rows split evenly) on the first stage, the final norm
  and the vocab-parallel LM head on the last stage;
- tied embeddings: one tensor when embedding and head sit on the same rank. Under pp the
  model keeps the tied embedding on the last stage with the head (one copy instead of two),
  so the first stage holds no vocabulary matrix at all.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .sharding import head_partition, split_evenly, split_layers


def _bytes_per_element(dtype: str | torch.dtype) -> int:
    from ..engine.runner import parse_dtype
    return parse_dtype(dtype).itemsize


def layer_params(cfg: ModelConfig, tp_size: int, tp_rank: int) -> dict[str, int]:
    """Parameters of one decoder layer on one tp rank, by piece."""
    d, hd = cfg.hidden_size, cfg.head_dim
    part = head_partition(cfg, tp_size, tp_rank)
    ffn = split_evenly(cfg.intermediate_size, tp_size, tp_rank)[1]
    qkv_rows = hd * (part.n_q + 2 * part.n_kv)
    return {
        "qkv": d * qkv_rows + (qkv_rows if cfg.attention_bias else 0),
        "o_proj": part.n_q * hd * d,
        "gate_up": 2 * ffn * d,
        "down": ffn * d,
        "norms": 2 * d,
    }


def embeds_on_last_stage(cfg: ModelConfig, pp_size: int) -> bool:
    """Tied embeddings under pp live with the LM head (models/llama.py does the same)."""
    return cfg.tie_word_embeddings and pp_size > 1


def rank_plan(cfg: ModelConfig, tp: int, pp: int, layer_split: list[int] | None = None,
              dtype: str | torch.dtype = "float32") -> list[dict]:
    """One dict per rank (pp outer, tp inner, as the launcher numbers them):

    ``rank, stage, tp_rank``; ``layers`` (a range); ``q_heads`` / ``kv_heads`` held (KV heads
    replicated past tp = num_kv_heads count on every rank holding them); ``vocab_rows`` of
    the embedding / LM head shard; ``embedding`` / ``lm_head`` (whether the rank holds them;
    "tied" when one tensor serves both); ``params`` and ``weight_bytes`` allocated.

    The layout must be valid (see ``sharding.check_layout``).
    """
    itemsize = _bytes_per_element(dtype)
    stages = split_layers(cfg, pp, layer_split)
    d = cfg.hidden_size
    embed_stage = pp - 1 if embeds_on_last_stage(cfg, pp) else 0
    rows = []
    for stage, layers in enumerate(stages):
        for t in range(tp):
            part = head_partition(cfg, tp, t)
            vocab = split_evenly(cfg.vocab_size, tp, t)[1]
            has_embed, has_head = stage == embed_stage, stage == pp - 1
            shared = cfg.tie_word_embeddings and has_embed and has_head
            params = len(layers) * sum(layer_params(cfg, tp, t).values())
            params += vocab * d * (int(has_embed) + int(has_head and not shared))
            params += d * int(has_head)                                  # final norm
            rows.append(dict(
                rank=stage * tp + t, stage=stage, tp_rank=t, layers=layers,
                q_heads=part.n_q, kv_heads=part.n_kv, vocab_rows=vocab,
                embedding=has_embed, lm_head="tied" if shared else has_head,
                params=params, weight_bytes=params * itemsize))
    return rows
