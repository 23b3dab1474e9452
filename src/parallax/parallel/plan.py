"""What each rank of a tp x pp (x ep) layout holds, without reading a weight.

``rank_plan`` counts each rank's parameters by building that rank's model on the meta
device (no memory, no checkpoint): exactly what the model classes allocate, for every
family (tests/test_cli.py and tests/test_models_families.py check it against
``LLM.memory()`` byte for byte). The head / vocabulary / expert columns come from the
sharding math (parallel/sharding.py). Tied embeddings under pp live with the LM head on
the last stage (one copy instead of two), as models/llama.py does.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .sharding import expert_partition, head_partition, split_evenly, split_layers


def _bytes_per_element(dtype: str | torch.dtype) -> int:
    from ..engine.runner import parse_dtype
    return parse_dtype(dtype).itemsize


def stage_params(cfg: ModelConfig, tp: int, pp: int, rank: int, layers: range,
                 ep: int = 1) -> int:
    """Parameters the model class allocates on ``rank`` (built on the meta device)."""
    from ..models import MODEL_REGISTRY
    from .context import ParallelContext
    ctx = ParallelContext(rank=rank, world_size=tp * pp, tp_size=tp, pp_size=pp, ep_size=ep)
    with torch.device("meta"):
        model = MODEL_REGISTRY[cfg.architecture](cfg, ctx, layers, torch.float32)
    return sum(p.numel() for p in model.parameters())


def rank_plan(cfg: ModelConfig, tp: int, pp: int, layer_split: list[int] | None = None,
              dtype: str | torch.dtype = "float32", ep: int = 1) -> list[dict]:
    """One dict per rank (pp outer, tp inner, as the launcher numbers them):

    ``rank, stage, tp_rank``; ``layers`` (a range); ``q_heads`` / ``kv_heads`` held (KV heads
    replicated past tp = num_kv_heads count on every rank holding them); ``vocab_rows`` of
    the embedding / LM head shard; ``embedding`` / ``lm_head`` (whether the rank holds them;
    "tied" when one tensor serves both; under pp a tied
    matrix is held twice, by the first stage's embedding and the last stage's head); ``experts`` (a range of expert ids held, empty for a
    dense model); ``params`` and ``weight_bytes`` allocated.

    The layout must be valid (see ``sharding.check_layout``).
    """
    itemsize = _bytes_per_element(dtype)
    stages = split_layers(cfg, pp, layer_split)
    rows = []
    for stage, layers in enumerate(stages):
        for t in range(tp):
            part = head_partition(cfg, tp, t)
            vocab = split_evenly(cfg.vocab_size, tp, t)[1]
            has_embed, has_head = stage == 0, stage == pp - 1
            shared = cfg.tie_word_embeddings and has_embed and has_head
            params = stage_params(cfg, tp, pp, stage * tp + t, layers, ep)
            experts = (expert_partition(cfg.num_experts, cfg.moe_intermediate_size, tp, t, ep).experts
                       if cfg.num_experts else range(0))
            rows.append(dict(
                rank=stage * tp + t, stage=stage, tp_rank=t, layers=layers,
                q_heads=part.n_q, kv_heads=part.n_kv, vocab_rows=vocab,
                embedding=has_embed, lm_head="tied" if shared else has_head,
                experts=experts, params=params, weight_bytes=params * itemsize))
    return rows
