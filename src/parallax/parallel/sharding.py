"""Who holds what: the split of heads, MLP columns, vocabulary rows and layers over ranks.

Pure arithmetic on the config, no tensors, so a layout is checked before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import LayoutError


def split_evenly(n: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of part ``index`` when n items are cut into ``parts`` contiguous pieces
    whose sizes differ by at most one (the first ``n % parts`` pieces are one larger)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, base + (index < extra)


@dataclass(frozen=True)
class HeadPartition:
    """The attention heads one tp rank owns.

    ``q_heads``: the contiguous global query heads it computes.
    ``kv_heads``: the global KV head behind each local KV slot; local query head i reads
    local KV slot ``i // local_group``.
    """
    q_start: int
    n_q: int
    kv_heads: tuple[int, ...]

    @property
    def n_kv(self) -> int:
        return len(self.kv_heads)

    @property
    def local_group(self) -> int:
        return self.n_q // self.n_kv


def head_partition(cfg: ModelConfig, tp_size: int, tp_rank: int) -> HeadPartition:
    """Split attention by whole KV groups when tp <= KV heads (groups may be uneven: 3 KV
    heads over 2 ranks is 2 + 1); past that, split query heads and let each rank keep the
    KV heads its query heads need (replicated across ranks)."""
    group = cfg.group_size
    if tp_size <= cfg.num_kv_heads:
        kv_start, n_kv = split_evenly(cfg.num_kv_heads, tp_size, tp_rank)
        return HeadPartition(kv_start * group, n_kv * group, tuple(range(kv_start, kv_start + n_kv)))
    q_start, n_q = split_evenly(cfg.num_heads, tp_size, tp_rank)
    kv_of_q = [q // group for q in range(q_start, q_start + n_q)]
    distinct = sorted(set(kv_of_q))
    if all(kv_of_q.count(h) == n_q // len(distinct) for h in distinct):
        return HeadPartition(q_start, n_q, tuple(distinct))
    # Query heads straddle KV groups unevenly: give every query head its own KV slot.
    return HeadPartition(q_start, n_q, tuple(kv_of_q))


def split_layers(cfg: ModelConfig, pp_size: int, layer_split: list[int] | None = None) -> list[range]:
    """Contiguous layer blocks per pipeline stage.

    By default stages are balanced by decode cost: a layer costs its weight bytes (what a
    decode step streams) plus ``LAYER_OVERHEAD`` for what bytes miss (attention over the KV
    cache, norms, per-op dispatch). The last stage also holds the LM head, which for
    SmolLM2 (49k x 576) weighs as much as ~8 layers and costs as much as ~6.4, so it gets
    fewer layers: [18, 12] at pp=2. ``layer_split`` overrides: per-stage layer counts
    summing to num_layers.
    """
    n = cfg.num_layers
    if layer_split is not None:
        if len(layer_split) != pp_size or sum(layer_split) != n or min(layer_split) < 1:
            raise LayoutError(f"layer_split={layer_split} must have pp={pp_size} positive entries "
                              f"summing to the model's {n} layers")
        counts = list(layer_split)
    else:
        counts = _balanced_counts(cfg, pp_size)
    bounds, start = [], 0
    for c in counts:
        bounds.append(range(start, start + c))
        start += c
    return bounds


# Measured with SmolLM2 at pp=2, batch 16, 2 micro-batches on the 2-core CI machine: the
# stages' busy times were 2.08 / 1.87 s at [19, 11] (bytes alone) and 1.74 / 1.79 s at
# [18, 12], i.e. a layer costs ~1.25x what its bytes say relative to the LM head; tokens/s
# 376 -> 401 (1.57x -> 1.67x over no micro-batching).
LAYER_OVERHEAD = 1.25


def _balanced_counts(cfg: ModelConfig, pp_size: int) -> list[int]:
    """Layer counts minimising the heaviest stage, the LM head counted on the last stage."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    layer = d * cfg.head_dim * 2 * (cfg.num_heads + cfg.num_kv_heads) + 3 * d * f
    head_in_layers = cfg.vocab_size * d / (layer * LAYER_OVERHEAD)
    n = cfg.num_layers
    # Binary-search the smallest stage capacity (in layer units) that fits; fill from the back.
    if pp_size == 1:
        return [n]
    lo, hi = 1.0, n + head_in_layers + 1
    for _ in range(50):
        cap = (lo + hi) / 2
        if _fill(n, pp_size, cap, head_in_layers) is None:
            lo = cap
        else:
            hi = cap
    return _fill(n, pp_size, hi, head_in_layers)


def _fill(n: int, pp_size: int, cap: float, head: float) -> list[int] | None:
    counts, left = [], n
    for stage in reversed(range(pp_size)):
        room = int(cap - (head if stage == pp_size - 1 else 0) + 1e-9)
        take = min(max(room, 1), left - stage)   # leave at least one layer per earlier stage
        if take < 1:
            return None
        counts.append(take)
        left -= take
    return counts[::-1] if left == 0 else None


def check_layout(cfg: ModelConfig, tp_size: int, pp_size: int,
                 layer_split: list[int] | None = None) -> None:
    """Raise LayoutError, naming the valid choices, when the model cannot take tp x pp."""
    if tp_size < 1 or pp_size < 1:
        raise LayoutError(f"tp and pp must be >= 1, got tp={tp_size} pp={pp_size}")
    if tp_size > cfg.num_heads:
        raise LayoutError(f"tp={tp_size} exceeds the model's {cfg.num_heads} attention heads; "
                          f"choose tp in 1..{cfg.num_heads}")
    if pp_size > cfg.num_layers:
        raise LayoutError(f"pp={pp_size} exceeds the model's {cfg.num_layers} layers; "
                          f"choose pp in 1..{cfg.num_layers}")
    split_layers(cfg, pp_size, layer_split)


@dataclass(frozen=True)
class ExpertPartition:
    """The MoE expert weights one tp rank holds: whole experts ``experts`` (a contiguous
    range of global expert ids), each cut to inner columns ``[f_start, f_start + f_len)``."""
    experts: range
    f_start: int
    f_len: int


def expert_partition(num_experts: int, width: int, tp_size: int, tp_rank: int,
                     ep_size: int = 1) -> ExpertPartition:
    """Expert parallelism over the tp group: ``ep_size`` (dividing tp_size) groups of
    tp_size // ep_size consecutive ranks; group g holds experts split_evenly(E, ep, g) (uneven
    counts allowed), and within a group each expert's inner width is split as tp splits a
    dense MLP. ep_size 1: every rank holds every expert, tp-split; ep_size == tp_size: each
    rank holds whole experts."""
    inner = tp_size // ep_size
    e_start, e_len = split_evenly(num_experts, ep_size, tp_rank // inner)
    f_start, f_len = split_evenly(width, inner, tp_rank % inner)
    return ExpertPartition(range(e_start, e_start + e_len), f_start, f_len)


def check_expert_layout(cfg: ModelConfig, tp_size: int, ep_size: int) -> None:
    """Raise LayoutError unless ``ep_size`` can split this model's experts over tp ranks."""
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise LayoutError(f"ep must be an integer >= 1, got {ep_size!r}")
    if ep_size == 1:
        return
    if not cfg.num_experts:
        raise LayoutError(f"ep={ep_size} needs a mixture-of-experts model; "
                          f"{cfg.architecture} has no experts (use ep=1)")
    if tp_size % ep_size:
        raise LayoutError(f"ep={ep_size} must divide tp={tp_size}: experts are split over the "
                          f"ranks of the tp group (e.g. tp={ep_size}, ep={ep_size})")
    if ep_size > cfg.num_experts:
        raise LayoutError(f"ep={ep_size} exceeds the model's {cfg.num_experts} experts; "
                          f"choose ep in 1..{cfg.num_experts} dividing tp")
