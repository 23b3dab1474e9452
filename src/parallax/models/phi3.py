"""Phi-3 decoder: the Llama-family layer whose checkpoint stores q|k|v as one ``qkv_proj``
and gate|up as one ``gate_up_proj``.

Under tp a rank reads only its rows of the fused tensors: its q heads' rows, then its KV
heads' rows at offset ``Hq*D`` (k) and ``(Hq+Hk)*D`` (v); its gate columns at 0 and up
columns at ``intermediate_size``. Each is a ``Chunk`` row range of the one checkpoint tensor,
so the fused tensor is never materialised whole. Rope scaling ("longrope"/"su") and partial
rotary are refused in config.py.
"""

from __future__ import annotations

from ..config import ModelConfig
from .llama import MLP, Attention, DecoderLayer, LlamaForCausalLM, kv_row_runs


class Phi3Attention(Attention):
    @staticmethod
    def qkv_pieces(cfg: ModelConfig, part, prefix: str) -> list[tuple[str, int, int]]:
        d, name = cfg.head_dim, f"{prefix}.qkv_proj"
        k_off, v_off = cfg.num_heads * d, (cfg.num_heads + cfg.num_kv_heads) * d
        kv = kv_row_runs(part.kv_heads, d)
        return ([(name, part.q_start * d, part.n_q * d)]
                + [(name, k_off + s, n) for s, n in kv]
                + [(name, v_off + s, n) for s, n in kv])


class Phi3MLP(MLP):
    def gate_up_pieces(self, cfg: ModelConfig, prefix: str, start: int, n: int) -> list[tuple[str, int, int]]:
        name = f"{prefix}.gate_up_proj"
        return [(name, start, n), (name, cfg.intermediate_size + start, n)]


class Phi3DecoderLayer(DecoderLayer):
    attention_cls = Phi3Attention
    mlp_cls = Phi3MLP


class Phi3ForCausalLM(LlamaForCausalLM):
    layer_cls = Phi3DecoderLayer
