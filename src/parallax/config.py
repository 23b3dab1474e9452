"""ModelConfig: the architecture facts parallax needs, read from HF ``config.json`` or GGUF metadata.

One dataclass for the whole Llama family (llama, mistral, qwen2): they differ only in
whether q/k/v carry a bias, the rope variant and the default theta, so one model file
serves all three (see ``models/llama.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError

# HF `architectures[0]` / `model_type` -> our family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
}


@dataclass
class ModelConfig:
    """The architecture of a checkpoint, as parallax uses it (``LLM.config``).

    Built by :meth:`from_json` / :meth:`from_hf_dict` (HF ``config.json``) or
    :meth:`from_gguf_metadata` (GGUF); the field comments say what each holds.

    Attributes:
        architecture: the model family, "llama" | "mistral" | "qwen2".
        vocab_size: rows of the embedding and of the LM head.
        hidden_size: the model width (d_model).
        intermediate_size: the inner width of the SwiGLU MLP.
        num_layers: transformer blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer than num_heads).
        head_dim: width of one attention head.
        rms_norm_eps: epsilon of the RMSNorms.
        rope_theta: base of the rotary position embedding.
        rope_scaling: None, or the HF rope scaling dict ({"rope_type": "llama3" | "linear", ...}).
        max_position_embeddings: the context length, in tokens (prompt + new tokens).
        tie_word_embeddings: whether the LM head reuses the embedding matrix.
        attention_bias: whether q/k/v carry a bias (qwen2).
        bos_token_id: the beginning-of-sequence token, if the checkpoint names one.
        eos_token_ids: tokens that end generation (unless ``ignore_eos``).
        pad_token_id: the padding token, if the checkpoint names one.
    """

    architecture: str                 # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int                  # d_model
    intermediate_size: int            # SwiGLU inner width
    num_layers: int
    num_heads: int                    # query heads
    num_kv_heads: int                 # key/value heads (GQA when < num_heads)
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # {"rope_type": "llama3"|"linear", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # q/k/v bias (qwen2)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; the config is inconsistent")

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from ``cfg``, the dict in a HF ``config.json``.

        Raises:
            CheckpointError: an architecture parallax does not support, or an inconsistent
                config.
        """
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        family = SUPPORTED_ARCHITECTURES.get(archs[0]) or SUPPORTED_ARCHITECTURES.get(
            cfg.get("model_type", ""))
        if family is None:
            raise CheckpointError(
                f"unsupported architecture {archs[0]!r} (model_type={cfg.get('model_type')!r}); "
                f"parallax supports {sorted(k for k in SUPPORTED_ARCHITECTURES if 'For' in k)}")
        n_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_scaling = cfg.get("rope_scaling")
        rope_params = cfg.get("rope_parameters")   # transformers >= 5 folds theta + scaling here
        rope_theta = cfg.get("rope_theta")
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling.setdefault("rope_type", rope_scaling.get("type", "default"))
            if rope_scaling["rope_type"] == "default":
                rope_scaling = None
        return cls(
            architecture=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or hidden // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
        )

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        """Build from the HF ``config.json`` file at ``path``.

        Raises:
            CheckpointError: the file is missing, not valid JSON or lacks a required key;
                or see ``from_hf_dict``.
        """
        try:
            with open(path) as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"no config.json at {path}; a HF checkpoint folder needs one") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from None
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "vocab_size") if k not in cfg]
        if missing:
            raise CheckpointError(f"{path} lacks required keys {missing}")
        return cls.from_hf_dict(cfg)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "ModelConfig":
        """Build from ``meta``, a GGUF file's key/value metadata (``general.architecture`` =
        llama | qwen2 | mistral).

        Raises:
            CheckpointError: an architecture parallax does not support.
        """
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2", "mistral"):
            raise CheckpointError(
                f"unsupported GGUF architecture {arch!r}; parallax supports llama, mistral, qwen2")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        n_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        n_vocab = get("vocab_size")
        if n_vocab is None:
            n_vocab = len(meta.get("tokenizer.ggml.tokens", []))
        rope_scaling = None
        if get("rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [int(eos)] if eos is not None else []
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None and int(eot) not in eos_ids:
            eos_ids.append(int(eot))
        return cls(
            architecture=arch,
            vocab_size=int(n_vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=n_heads,
            num_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=int(get("attention.key_length", hidden // n_heads)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings=bool(meta.get("parallax.tied_embeddings", True)),
            attention_bias=arch == "qwen2",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")
