"""ModelConfig: the architecture facts parallax needs, read from HF ``config.json`` or GGUF metadata.

One dataclass for every family parallax runs (llama, mistral, qwen2, qwen3, phi3, gemma2/3,
mixtral, qwen2_moe, qwen3_moe): the Llama family differs in which projections carry a bias,
the gate activation, the rope variant, a sliding window and their defaults, so one model
file serves all three (``models/llama.py``);
Qwen3 (per-head q/k norms) and Phi-3 (fused qkv / gate_up tensors) are small subclasses of it
(``models/qwen3.py``, ``models/phi3.py``; docs/models.md).

Every field that changes the math is either honoured or refused here, in the calling
process, before any weight is read or any worker starts:
- Defaults for absent keys are HF's for each ``model_type`` (``_HF_DEFAULTS``).
- Biases follow HF's modeling code: llama's ``attention_bias`` covers q/k/v *and* o_proj
  and ``mlp_bias`` gate/up/down; qwen2 hard-codes q/k/v bias on, o_proj and MLP off;
  mistral and phi3 hard-code all off (a key in its config.json is ignored, as HF ignores it);
  qwen3's and gemma's ``attention_bias`` cover q/k/v and o_proj, like llama's.
- Rotary over part of each head (``partial_rotary_factor`` != 1, GGUF
  ``rope.dimension_count`` < head_dim) is refused.
- ``rope_scaling`` types other than linear and llama3 are refused (CheckpointError).
- A sliding window is run in the attention (``layer_types``, ``layer_window``) by the
  families whose layers parallax knows: Gemma 2 / 3 (alternating layers), and Mistral,
  Mixtral and Phi-3 (``SLIDING_FAMILIES``: every layer slides, so the engine frees the KV
  blocks that fall out of the window, ``cache_window``). For qwen2 / qwen3 / their MoE
  (``use_sliding_window``, whose sliding layers differ between transformers versions) and
  for GGUF files, a window shorter than ``max_position_embeddings`` still clamps the usable
  context to it: within it, sliding attention equals full attention, so a longer prompt is
  a PromptError rather than a silently different answer.
- Gemma and MoE fields are read by ``_hf_gemma`` / ``_hf_moe``; see docs/models.md.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError

logger = logging.getLogger(__name__)

# HF `architectures[0]` / `model_type` -> our family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
}

# Mixture-of-experts families (models/moe.py).
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")

# Families whose sliding-window layers parallax runs windowed (models/gemma.py), instead of
# clamping the context to the window.
WINDOWED_FAMILIES = ("gemma2", "gemma3")

# Families whose every layer attends over ``sliding_window`` (HF's Mistral, Mixtral and
# Phi-3 modules): parallax runs the window in every layer, with no context clamp.
SLIDING_FAMILIES = ("mistral", "mixtral", "phi3")

# GGUF ``general.architecture`` values parallax reads, and llama.cpp's names that differ from
# our family names (llama.cpp writes Mixtral as "llama" with an expert count).
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3",
                      "qwen2moe", "qwen3moe")
_GGUF_FAMILY = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}

# Gate activations of the gated MLP (HF ``hidden_act`` names; "swish" is HF's alias of silu).
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
_ACTIVATION_ALIASES = {"swish": "silu"}

# rope_scaling types models/llama.py:rope_inv_freq implements, with the keys each needs.
SUPPORTED_ROPE_TYPES = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# HF's defaults for keys a config.json may omit (transformers' *Config classes).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048, num_key_value_heads=None, rms_norm_eps=1e-6,
                  rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False),
    "mistral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, rms_norm_eps=1e-6,
                    rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                    sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32, rms_norm_eps=1e-6,
                  rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                  sliding_window=4096, max_window_layers=28),
    "qwen3": dict(max_position_embeddings=32768, num_key_value_heads=32, rms_norm_eps=1e-6,
                  rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                  sliding_window=4096, max_window_layers=28, head_dim=128),
    "phi3": dict(max_position_embeddings=4096, num_key_value_heads=None, rms_norm_eps=1e-5,
                 rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                 sliding_window=None),
    "gemma2": dict(max_position_embeddings=8192, num_key_value_heads=4, rms_norm_eps=1e-6,
                   rope_theta=10000.0, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                   sliding_window=4096, head_dim=256, query_pre_attn_scalar=256,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, layer_period=2),
    "gemma3": dict(max_position_embeddings=131072, num_key_value_heads=4, rms_norm_eps=1e-6,
                   rope_theta=1_000_000.0, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                   sliding_window=4096, head_dim=256, query_pre_attn_scalar=256,
                   final_logit_softcapping=None, attn_logit_softcapping=None, layer_period=6,
                   rope_local_base_freq=10000.0),
    "mixtral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, rms_norm_eps=1e-5,
                    rope_theta=1e6, hidden_act="silu", tie_word_embeddings=False,
                    sliding_window=None, num_experts_per_tok=2),
    "qwen2_moe": dict(max_position_embeddings=32768, num_key_value_heads=16, rms_norm_eps=1e-6,
                      rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                      sliding_window=4096, max_window_layers=28, num_experts_per_tok=4,
                      num_experts=60, moe_intermediate_size=1408, norm_topk_prob=False,
                      shared_expert_intermediate_size=5632, decoder_sparse_step=1),
    "qwen3_moe": dict(max_position_embeddings=32768, num_key_value_heads=4, rms_norm_eps=1e-6,
                      rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                      sliding_window=4096, max_window_layers=28, num_experts_per_tok=8,
                      num_experts=128, moe_intermediate_size=768, norm_topk_prob=False,
                      shared_expert_intermediate_size=0, decoder_sparse_step=1),
}


# Upper bounds that no real model reaches, so a corrupt value is refused before it sizes
# anything (the loader builds the whole model on the meta device to check the key set).
_LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 20, "intermediate_size": 1 << 22,
           "num_layers": 1024, "num_heads": 4096, "num_kv_heads": 4096, "head_dim": 4096,
           "max_position_embeddings": 1 << 40}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class ModelConfig:
    """The architecture of a checkpoint, as parallax uses it (``LLM.config``).

    Built by :meth:`from_json` / :meth:`from_hf_dict` (HF ``config.json``) or
    :meth:`from_gguf_metadata` (GGUF); the field comments say what each holds.

    Attributes:
        architecture: the model family: "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" |
            "gemma2" | "gemma3" | "mixtral" | "qwen2_moe" | "qwen3_moe".
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
        rope_freq_factors: None, or (head_dim/2,) divisors of the rotary frequencies (GGUF
            ``rope_freqs.weight``, Llama 3.x rope scaling).
        max_position_embeddings: the usable context in tokens (prompt + new tokens), clamped
            to the sliding window where the checkpoint has one.
        tie_word_embeddings: whether the LM head reuses the embedding matrix.
        hidden_act: the gate activation of the MLP (HF ``hidden_act``: silu, gelu, ...).
        attention_bias: whether q/k/v carry a bias (qwen2; llama ``attention_bias``).
        o_proj_bias: whether the attention output projection carries a bias.
        mlp_bias: whether gate/up/down carry a bias (llama ``mlp_bias``).
        sliding_window: the checkpoint's attention window in tokens, or None.
        layer_types: "sliding_attention" or "full_attention" per layer, where some layer
            runs a sliding window (Gemma; Mistral, Mixtral, Phi-3 with a window); else None.
        query_pre_attn_scalar: Gemma: the attention scale is its inverse square root.
        attn_logit_softcapping: Gemma 2: attention scores s become c * tanh(s / c).
        final_logit_softcapping: Gemma 2: logits z become c * tanh(z / c).
        rope_local_theta: Gemma 3: rope base of the sliding-window layers (the global layers
            use rope_theta and rope_scaling).
        num_experts: MoE: experts per sparse layer (0: a dense model).
        num_experts_per_tok: MoE: experts each token is routed to (top-k).
        moe_intermediate_size: MoE: inner width of one expert's gated MLP.
        norm_topk_prob: MoE: whether the top-k router probabilities are renormalised to 1.
        shared_expert_intermediate_size: Qwen2-MoE: the shared expert's width (0: none).
        dense_layers: MoE: layers with a dense MLP (intermediate_size) instead of experts.
        bos_token_id: the beginning-of-sequence token, if the checkpoint names one.
        eos_token_ids: tokens that end generation (unless ``ignore_eos``).
        pad_token_id: the padding token, if the checkpoint names one.
    """

    architecture: str                 # a family of SUPPORTED_ARCHITECTURES' values
    vocab_size: int
    hidden_size: int                  # d_model
    intermediate_size: int            # gated-MLP inner width
    num_layers: int
    num_heads: int                    # query heads
    num_kv_heads: int                 # key/value heads (GQA when < num_heads)
    head_dim: int                     # may differ from hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # {"rope_type": "llama3"|"linear", ...}
    rope_freq_factors: list[float] | None = None  # (head_dim/2,) divisors of the rope
                                                  # frequencies (GGUF ``rope_freqs.weight``)
    max_position_embeddings: int = 2048  # usable context (clamped to a sliding window)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"          # gate activation, one of SUPPORTED_ACTIVATIONS
    attention_bias: bool = False      # q/k/v bias (qwen2; llama attention_bias)
    o_proj_bias: bool = False         # attention output bias (llama attention_bias)
    mlp_bias: bool = False            # gate/up/down bias (llama mlp_bias)
    sliding_window: int | None = None  # attention window of the checkpoint, if any
    layer_types: list[str] | None = None   # per layer "sliding_attention" | "full_attention"
    # Gemma 2 / 3 (models/gemma.py); None elsewhere.
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power
    attn_logit_softcapping: float | None = None  # scores -> c * tanh(scores / c)
    final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c)
    rope_local_theta: float | None = None  # rope base of the sliding layers (Gemma 3)
    # Mixture of experts (models/moe.py); num_experts 0 = dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0      # top-k
    moe_intermediate_size: int = 0    # inner width of one expert
    norm_topk_prob: bool = False      # renormalise the top-k router probabilities
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert
    dense_layers: list[int] = field(default_factory=list)  # layers with a dense MLP instead
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise CheckpointError(f"config value {name}={value!r} must be an integer in 1..{limit}")
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                raise CheckpointError(f"config value {name}={getattr(self, name)!r} must be an integer")
        if not all(map(_is_int, self.eos_token_ids)):
            raise CheckpointError(f"config value eos_token_id={self.eos_token_ids!r} must be integers")
        if not isinstance(self.hidden_act, str):
            raise CheckpointError(f"config value hidden_act={self.hidden_act!r} must be a string")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; the config is inconsistent")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim={self.head_dim} is odd; rotary embeddings need pairs")
        act = _ACTIVATION_ALIASES.get(self.hidden_act, self.hidden_act)
        if act not in SUPPORTED_ACTIVATIONS:
            raise CheckpointError(
                f"hidden_act={self.hidden_act!r} is not implemented; parallax supports "
                f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        self.hidden_act = act
        self._check_rope()

    def _check_rope(self) -> None:
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type")
            if kind not in SUPPORTED_ROPE_TYPES:
                raise CheckpointError(
                    f"rope scaling type {kind!r} is not implemented; parallax supports "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)} (and GGUF rope_freqs factors). Running "
                    f"the model without it would give wrong answers")
            lacking = [k for k in SUPPORTED_ROPE_TYPES[kind] if not isinstance(rs.get(k), (int, float))]
            if lacking:
                raise CheckpointError(f"rope scaling {kind!r} lacks numeric {lacking} in the config")
        ff = self.rope_freq_factors
        if ff is not None and len(ff) != self.head_dim // 2:
            raise CheckpointError(f"rope frequency factors have {len(ff)} entries; head_dim "
                                  f"{self.head_dim} needs {self.head_dim // 2}")
        if ff is not None and not all(0 < f < float("inf") for f in ff):
            raise CheckpointError("rope frequency factors (rope_freqs) must be finite and positive")

    def layer_window(self, index: int) -> int | None:
        """The attention window of layer ``index`` (None: it attends to every position)."""
        if self.layer_types is None or self.layer_types[index] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def cache_window(self) -> int | None:
        """The window when every layer slides (then KV blocks wholly before it can be freed:
        engine/block_manager.py), else None (some layer reads every position)."""
        if self.layer_types is None or self.sliding_window is None:
            return None
        return self.sliding_window if all(t == "sliding_attention"
                                          for t in self.layer_types) else None

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
        if self.o_proj_bias:
            attn += d
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        norms = 4 * d if self.architecture in WINDOWED_FAMILIES else 2 * d   # Gemma: sandwich
        if self.architecture in ("qwen3", "qwen3_moe", "gemma3"):
            norms += 2 * hd                                                  # q/k norms
        layer = attn + norms
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        if not self.num_experts:
            return self.num_layers * (layer + mlp) + emb + d
        fm, fs = self.moe_intermediate_size, self.shared_expert_intermediate_size
        sparse = self.num_experts * (3 * d * fm + d) + (3 * d * fs + d if fs else 0)
        dense = len(self.dense_layers)
        return self.num_layers * layer + dense * mlp + (self.num_layers - dense) * sparse + emb + d

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from ``cfg``, the dict in a HF ``config.json``.

        Raises:
            CheckpointError: an architecture parallax does not support, or an inconsistent
                config.
        """
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        family = SUPPORTED_ARCHITECTURES.get(archs[0]) if isinstance(archs[0], str) else None
        family = family or SUPPORTED_ARCHITECTURES.get(str(cfg.get("model_type", "")))
        if family is None:
            raise CheckpointError(
                f"unsupported architecture {archs[0]!r} (model_type={cfg.get('model_type')!r}); "
                f"parallax supports {sorted(k for k in SUPPORTED_ARCHITECTURES if 'For' in k)}")
        defaults = _HF_DEFAULTS[family]

        def get(key: str) -> Any:
            value = cfg.get(key)
            return defaults.get(key) if value is None else value

        n_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_theta, rope_scaling = _hf_rope(cfg, defaults["rope_theta"])
        _check_partial_rotary(cfg)
        if family in ("llama", "qwen3", "gemma2", "gemma3", "qwen3_moe"):
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
            mlp_bias = bool(cfg.get("mlp_bias", False)) and family == "llama"
        elif family == "qwen2_moe":
            qkv_bias, o_bias, mlp_bias = bool(cfg.get("qkv_bias", True)), False, False
        else:   # HF's Mistral, Qwen2 and Phi-3 modules hard-code their biases
            qkv_bias, o_bias, mlp_bias = family == "qwen2", False, False
        window = _hf_sliding_window(cfg, family, defaults)
        max_pos = get("max_position_embeddings")
        gemma = _hf_gemma(cfg, family, defaults) if family in WINDOWED_FAMILIES else {}
        if gemma:
            rope_theta, rope_scaling = gemma.pop("rope")
        if window is not None and window < 1:
            raise CheckpointError(f"sliding_window={window} must be positive")
        if window is not None and family in SLIDING_FAMILIES:
            gemma = {"layer_types": ["sliding_attention"] * cfg["num_hidden_layers"]}
        elif window is not None and window < max_pos and family not in WINDOWED_FAMILIES:
            logger.info("the checkpoint attends over a sliding window of %d tokens; parallax "
                        "limits the context to it (max_position_embeddings %d)", window, max_pos)
            max_pos = window
        return cls(
            architecture=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=get("num_key_value_heads") or n_heads,
            head_dim=get("head_dim") or hidden // n_heads,
            rms_norm_eps=float(get("rms_norm_eps")),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            # HF's Gemma MLP reads hidden_activation (its hidden_act is a legacy key).
            hidden_act=(cfg.get("hidden_activation") or defaults["hidden_act"]
                        if family in WINDOWED_FAMILIES else get("hidden_act")),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            **gemma,
            **(_hf_moe(cfg, family, defaults) if family in MOE_FAMILIES else {}),
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path} holds a JSON {type(cfg).__name__}, not an object")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "vocab_size") if k not in cfg]
        if missing:
            raise CheckpointError(f"{path} lacks required keys {missing}")
        try:
            return cls.from_hf_dict(cfg)
        except CheckpointError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, AttributeError,
                OverflowError) as e:
            raise CheckpointError(f"{path} has a malformed value ({type(e).__name__}: {e})") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any],
                           rope_freq_factors: list[float] | None = None) -> "ModelConfig":
        """Build from ``meta``, a GGUF file's key/value metadata (``general.architecture`` =
        one of ``GGUF_ARCHITECTURES``).

        ``rope_freq_factors``: the file's ``rope_freqs.weight`` (Llama 3.x rope scaling).

        Raises:
            CheckpointError: an architecture parallax does not support.
        """
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise CheckpointError(f"unsupported GGUF architecture {arch!r}; parallax supports "
                                  f"{', '.join(GGUF_ARCHITECTURES)}")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        family = _GGUF_FAMILY.get(arch, arch)
        if get("expert_count") and arch == "llama":
            family = "mixtral"
        elif get("expert_count") and family not in MOE_FAMILIES:
            raise CheckpointError(
                f"this GGUF {arch} file declares a mixture of experts ({get('expert_count')} "
                f"experts), which llama.cpp never writes for {arch}; parallax reads MoE GGUF "
                f"files as llama (Mixtral), qwen2moe and qwen3moe")
        try:
            n_heads = int(get("attention.head_count"))
            hidden = int(get("embedding_length"))
            n_vocab = get("vocab_size", meta.get("parallax.embedding_rows"))
            if n_vocab is None:
                n_vocab = len(meta.get("tokenizer.ggml.tokens", []))
            rope_scaling = _gguf_rope(get("rope.scaling.type"), get("rope.scaling.factor"))
            head_dim = int(get("attention.key_length", hidden // n_heads))
            rotary = get("rope.dimension_count")
            if rotary is not None and int(rotary) != head_dim:
                raise CheckpointError(
                    f"rope.dimension_count={rotary} < head_dim={head_dim} (rotary over part of "
                    f"each head) is not implemented; parallax rotates whole heads")
            eos_ids = []
            for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
                if meta.get(key) is not None and int(meta[key]) not in eos_ids:
                    eos_ids.append(int(meta[key]))
            max_pos = int(get("context_length", 2048))
            window = get("attention.sliding_window")
            extra: dict[str, Any] = {}
            if family in WINDOWED_FAMILIES:
                extra = _gguf_gemma(family, get, hidden, n_heads, head_dim)
            elif window is not None and 0 < int(window) < max_pos:
                max_pos = int(window)
            if family in MOE_FAMILIES:
                extra = _gguf_moe(family, get, meta.get("parallax.dense_layers", []))
            return cls(
                architecture=family,
                vocab_size=int(n_vocab),
                hidden_size=hidden,
                intermediate_size=int(get("feed_forward_length")),
                num_layers=int(get("block_count")),
                num_heads=n_heads,
                num_kv_heads=int(get("attention.head_count_kv", n_heads)),
                head_dim=head_dim,
                rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(get("rope.freq_base", 10000.0)),
                rope_scaling=rope_scaling,
                rope_freq_factors=rope_freq_factors,
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(meta.get("parallax.tied_embeddings", True)),
                attention_bias=bool(meta.get("parallax.qkv_bias", arch == "qwen2")),
                hidden_act="gelu_pytorch_tanh" if family in WINDOWED_FAMILIES else "silu",
                o_proj_bias=bool(meta.get("parallax.o_proj_bias", False)),
                mlp_bias=bool(meta.get("parallax.mlp_bias", False)),
                sliding_window=None if window is None else int(window),
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_ids=eos_ids,
                pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
                **extra,
            )
        except CheckpointError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, AttributeError,
                OverflowError) as e:
            raise CheckpointError(f"GGUF metadata of the {arch} model is missing or malformed "
                                  f"({type(e).__name__}: {e})") from None


def _hf_rope(cfg: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from a HF config, old or new (transformers >= 5
    folds theta and scaling into ``rope_parameters``)."""
    rope_scaling = cfg.get("rope_scaling")
    rope_params = cfg.get("rope_parameters")
    rope_theta = cfg.get("rope_theta")
    if isinstance(rope_params, dict):
        rope_theta = rope_params.get("rope_theta", rope_theta)
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    if rope_scaling is not None:
        if not isinstance(rope_scaling, dict):
            raise CheckpointError(f"rope_scaling must be an object, got {rope_scaling!r}")
        rope_scaling = dict(rope_scaling)
        rope_scaling.setdefault("rope_type", rope_scaling.get("type", "default"))
        rope_scaling.pop("rope_theta", None)
        if rope_scaling["rope_type"] == "default":
            rope_scaling = None
    return float(rope_theta if rope_theta is not None else default_theta), rope_scaling


def _hf_sliding_window(cfg: dict[str, Any], family: str, defaults: dict[str, Any]) -> int | None:
    """The attention window some layer of the model uses, as HF's modeling code decides it."""
    if family in ("mistral", "phi3", "gemma2", "gemma3", "mixtral"):
        window = cfg["sliding_window"] if "sliding_window" in cfg else defaults["sliding_window"]
        return None if window is None else int(window)
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        if not cfg.get("use_sliding_window", False):
            return None
        window = cfg["sliding_window"] if "sliding_window" in cfg else defaults["sliding_window"]
        if window is None:
            return None
        types = cfg.get("layer_types")
        if types is None:
            first = cfg.get("max_window_layers", defaults["max_window_layers"])
            types = ["sliding_attention" if i >= first else "full_attention"
                     for i in range(cfg["num_hidden_layers"])]
        return int(window) if "sliding_attention" in types else None
    return None


def _hf_gemma(cfg: dict[str, Any], family: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The Gemma 2 / 3 fields of ModelConfig (and "rope": (theta, scaling) of the global
    layers), as HF's Gemma*Config reads them; variants parallax does not run are refused."""
    def get(key: str) -> Any:
        return cfg[key] if key in cfg else defaults.get(key)

    if cfg.get("use_bidirectional_attention"):
        raise CheckpointError("use_bidirectional_attention (Gemma as an encoder) is not supported; "
                              "parallax runs causal decoders")
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        period = cfg.get("sliding_window_pattern") or defaults["layer_period"]
        types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
        raise CheckpointError(f"layer_types={types!r} must name sliding_attention or "
                              f"full_attention for each of the {n} layers")
    if "sliding_attention" in types and not cfg.get("sliding_window", defaults["sliding_window"]):
        raise CheckpointError("layer_types has sliding_attention layers but sliding_window is unset")
    out: dict[str, Any] = dict(layer_types=list(types))
    for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
        value = get(key)
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise CheckpointError(f"config value {key}={value!r} must be a positive number")
        out[key] = None if value is None else float(value)
    params = cfg.get("rope_parameters")
    if family == "gemma3" and isinstance(params, dict) and "full_attention" in params:
        # transformers >= 5: one rope dict per layer type.
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise CheckpointError(f"rope scaling {local.get('rope_type')!r} of the sliding-window "
                                  f"layers is not implemented (only their rope base is)")
        out["rope_local_theta"] = float(local.get("rope_theta", defaults["rope_local_base_freq"]))
        out["rope"] = _hf_rope({"rope_parameters": params.get("full_attention") or {}},
                               defaults["rope_theta"])
    else:
        out["rope"] = _hf_rope(cfg, defaults["rope_theta"])
        if family == "gemma3":
            out["rope_local_theta"] = float(get("rope_local_base_freq"))
    return out


def _hf_moe(cfg: dict[str, Any], family: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts fields of ModelConfig, as HF's Mixtral / Qwen*Moe read them."""
    def get(key: str) -> Any:
        return cfg[key] if cfg.get(key) is not None else defaults.get(key)

    n = cfg["num_hidden_layers"]
    if family == "mixtral":     # every layer sparse; experts as wide as intermediate_size
        out = dict(num_experts=cfg.get("num_local_experts", 8), norm_topk_prob=True,
                   moe_intermediate_size=cfg["intermediate_size"],
                   shared_expert_intermediate_size=0, dense_layers=[])
    else:
        step, only = get("decoder_sparse_step"), cfg.get("mlp_only_layers") or []
        if not _is_int(step) or step < 1:
            raise CheckpointError(f"decoder_sparse_step={step!r} must be a positive integer")
        # Hub configs say num_experts; transformers >= 5 saves it as num_local_experts.
        experts = cfg.get("num_experts") or cfg.get("num_local_experts") or defaults["num_experts"]
        out = dict(num_experts=experts, norm_topk_prob=bool(get("norm_topk_prob")),
                   moe_intermediate_size=get("moe_intermediate_size"),
                   shared_expert_intermediate_size=(get("shared_expert_intermediate_size")
                                                    if family == "qwen2_moe" else 0),
                   dense_layers=[i for i in range(n) if i in only or (i + 1) % step])
    out["num_experts_per_tok"] = get("num_experts_per_tok")
    return _checked_moe(out)


def _checked_moe(out: dict[str, Any]) -> dict[str, Any]:
    """``out`` (the MoE fields of ModelConfig) after checking the expert counts and width."""
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        if not _is_int(out[key]) or out[key] < 1:
            raise CheckpointError(f"config value {key}={out[key]!r} must be a positive integer")
    if out["num_experts_per_tok"] > out["num_experts"]:
        raise CheckpointError(f"num_experts_per_tok={out['num_experts_per_tok']} exceeds the "
                              f"{out['num_experts']} experts")
    return out


def _gguf_gemma(family: str, get, hidden: int, n_heads: int, head_dim: int) -> dict[str, Any]:
    """The Gemma 2 / 3 fields of ModelConfig from GGUF metadata (``get(key)`` reads
    ``{arch}.key``), as llama.cpp runs these files: sliding layers by
    ``attention.sliding_window_pattern`` (a period n: layer i slides when i % n < n - 1; or
    one bool per layer), else llama.cpp's fixed periods (2 for Gemma 2, 6 for Gemma 3); the
    attention scale from head_dim, except hidden / heads for the 27B models (46 / 62 layers),
    which is what llama.cpp does in place of HF's query_pre_attn_scalar; the sliding layers'
    rope base ``rope.freq_base_swa`` (Gemma 3, default 10000)."""
    n = int(get("block_count"))
    window = get("attention.sliding_window")
    pattern = get("attention.sliding_window_pattern", 2 if family == "gemma2" else 6)
    if window is None:
        types = ["full_attention"] * n
    elif isinstance(pattern, list):
        if len(pattern) != n:
            raise CheckpointError(f"attention.sliding_window_pattern has {len(pattern)} "
                                  f"entries for {n} layers")
        types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        period = int(pattern)
        types = ["sliding_attention" if period and i % period < period - 1 else "full_attention"
                 for i in range(n)]
    big = n == (46 if family == "gemma2" else 62)
    out: dict[str, Any] = dict(
        layer_types=types, query_pre_attn_scalar=float(hidden // n_heads if big else head_dim),
        attn_logit_softcapping=get("attn_logit_softcapping"),
        final_logit_softcapping=get("final_logit_softcapping"))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if out[key] is not None:
            out[key] = float(out[key])
    if family == "gemma3":
        out["rope_local_theta"] = float(get("rope.freq_base_swa", 10000.0))
    return out


def _gguf_moe(family: str, get, dense_layers: list[int]) -> dict[str, Any]:
    """The MoE fields of ModelConfig from GGUF metadata, as llama.cpp runs the file: top-k
    weights renormalised for Mixtral and Qwen3-MoE, not for Qwen2-MoE (llama.cpp's graphs;
    ``expert_weights_norm`` overrides); ``dense_layers``: layers whose file holds a dense
    MLP (GGUFCheckpoint finds them)."""
    ffn = get("expert_feed_forward_length", get("feed_forward_length"))
    shared = get("expert_shared_feed_forward_length", 0) if family == "qwen2_moe" else 0
    return _checked_moe(dict(
        num_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
        moe_intermediate_size=int(ffn),
        norm_topk_prob=bool(get("expert_weights_norm", family != "qwen2_moe")),
        shared_expert_intermediate_size=int(shared), dense_layers=list(dense_layers)))


def _check_partial_rotary(cfg: dict[str, Any]) -> None:
    """Refuse rotary embeddings over part of each head (Phi-3's ``partial_rotary_factor``)."""
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    for source in (cfg, params, cfg.get("rope_scaling") or {}):
        factor = source.get("partial_rotary_factor", 1.0) if isinstance(source, dict) else 1.0
        if factor not in (None, 1, 1.0):
            raise CheckpointError(
                f"partial_rotary_factor={factor!r} (rotary over part of each head) is not "
                f"implemented; parallax rotates whole heads")


def _gguf_rope(kind: Any, factor: Any) -> dict[str, Any] | None:
    """rope_scaling from GGUF ``rope.scaling.type`` / ``.factor``; unknown types refused."""
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor if factor is not None else 1.0)}
    raise CheckpointError(f"GGUF rope scaling type {kind!r} is not implemented; parallax supports "
                          f"none, linear and rope_freqs factors. Running the model without it "
                          f"would give wrong answers")


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")
