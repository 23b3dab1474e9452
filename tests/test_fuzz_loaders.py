"""Property-based fuzzing of the checkpoint loaders (hypothesis).

Small valid checkpoints (a one-layer safetensors folder, a one-layer GGUF with a tokenizer)
are written here, then mutated: header lengths, JSON entries (dtype, shape, data_offsets,
metadata), config.json values, GGUF counts, metadata value types and lengths, tensor
dims, types and offsets, raw bytes and truncation. Loading a mutant the way ``LLM`` and a
rank do (open, tokenizer, key check, every tensor read whole and sliced) must either work
or raise CheckpointError: never another exception, a crash, a hang (pytest-timeout) or a
huge allocation (the address space is capped while the fuzz runs).

The case sets are fixed (``derandomize``), so a run is reproducible; each test prints how
many cases it ran and how they ended.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import resource
import struct
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_checkpoint
from parallax.errors import CheckpointError
from parallax.loading import load_tokenizer, open_checkpoint
from parallax.models.loader import check_tensor_names

EXAMPLES = 300
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
HEADROOM = 1 << 30          # bytes of address space a load may add


@contextlib.contextmanager
def capped_address_space(headroom: int):
    """Cap this process's address space at its current size + ``headroom``: an allocation
    sized by a corrupt header fails (MemoryError / RuntimeError, a test failure) instead
    of taking the machine."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def load_everything(path: str) -> None:
    """What LLM() and every rank do with a checkpoint, all of it."""
    ckpt = open_checkpoint(path)
    try:
        load_tokenizer(path, ckpt)
        check_tensor_names(ckpt)
        head_dim = ckpt.config.head_dim
        for name in ckpt.names():
            shape = ckpt.shape(name)
            ckpt.read(name)
            ckpt.read(name, dim=0, start=0, length=min(shape[0], head_dim))
            ckpt.read(name, dim=len(shape) - 1, start=shape[-1] // 3, length=shape[-1] // 2)
    finally:
        ckpt.close()


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` by a new file: a map of the old one (not yet collected) stays valid."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def run_cases(label: str, outcomes: collections.Counter) -> None:
    total = sum(outcomes.values())
    sys.__stdout__.write(f"\n{label} fuzz: {total} cases: {dict(outcomes)}\n")
    assert total >= EXAMPLES
    assert outcomes["CheckpointError"] > EXAMPLES // 3     # the mutations do reach the checks


def check_one(path: str, outcomes: collections.Counter) -> None:
    try:
        with capped_address_space(HEADROOM):
            load_everything(path)
    except CheckpointError:
        outcomes["CheckpointError"] += 1
    else:
        outcomes["loaded"] += 1


# ---------------------------------------------------------------------- value strategies
U64 = st.one_of(st.integers(0, 300), st.sampled_from([2**31 - 1, 2**32, 2**62, 2**63, 2**64 - 1]),
                st.integers(0, 2**64 - 1))
U32 = st.one_of(st.integers(0, 40), st.sampled_from([2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**63])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def byte_edits(size: int):
    """(position, new bytes) pairs, biased to the first 512 bytes (the headers)."""
    pos = st.one_of(st.integers(0, min(size, 512) - 1), st.integers(0, size - 1))
    return st.lists(st.tuples(pos, st.binary(min_size=1, max_size=8)), min_size=1, max_size=4)


def apply_edits(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for pos, new in edits:
        out[pos:pos + len(new)] = new
    return bytes(out[:len(data)] if len(out) > len(data) else out)


# ---------------------------------------------------------------------- safetensors
@pytest.fixture(scope="module")
def st_base(tmp_path_factory):
    path = make_checkpoint(str(tmp_path_factory.mktemp("fuzz_st")), "llama", num_hidden_layers=1,
                           vocab_size=64, hidden_size=32, intermediate_size=48,
                           num_attention_heads=4, num_key_value_heads=2)
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        blob = f.read()
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    load_everything(path)                               # the unmutated base loads
    return path, blob, config, header, n


@st.composite
def st_mutation(draw, blob: bytes, config: dict, header: dict, n: int):
    """(new safetensors bytes, new config dict)."""
    kind = draw(st.sampled_from(["entry", "entry", "metadata", "header", "header_len", "bytes",
                                 "truncate", "config", "config"]))
    body = blob[8 + n:]
    h = json.loads(json.dumps(header))
    if kind in ("entry", "metadata", "header"):
        if kind == "entry":
            name = draw(st.sampled_from(sorted(k for k in h if k != "__metadata__")))
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "rename", "whole"]))
            if field == "dtype":
                h[name]["dtype"] = draw(st.sampled_from(["F16", "BF16", "I8", "U8", "F64", "BOOL", "F8_E4M3",
                                                         "I64", "F4", "Q4", ""]) | JSON)
            elif field == "shape":
                h[name]["shape"] = draw(st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 1, 2**63]),
                                                 max_size=4) | JSON)
            elif field == "data_offsets":
                h[name]["data_offsets"] = draw(st.lists(st.integers(-2, 2**64 + 1) | st.integers(0, len(body) + 8),
                                                        min_size=0, max_size=3) | JSON)
            elif field == "delete":
                del h[name]
            elif field == "rename":
                h[draw(st.text(min_size=1, max_size=12))] = h.pop(name)
            else:
                h[name] = draw(JSON)
        elif kind == "metadata":
            h["__metadata__"] = draw(JSON)
        else:
            h = draw(JSON)
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + body, config
    if kind == "header_len":
        return struct.pack("<Q", draw(U64)) + blob[8:], config
    if kind == "bytes":
        return apply_edits(blob, draw(byte_edits(len(blob)))), config
    if kind == "truncate":
        return blob[:draw(st.integers(0, len(blob) - 1))], config
    cfg = dict(config)
    key = draw(st.sampled_from(sorted(cfg) + ["rope_scaling", "head_dim", "sliding_window"]))
    cfg[key] = draw(JSON | st.integers(-3, 2**40))
    return blob, cfg


@pytest.mark.timeout(120)
def test_fuzz_safetensors(st_base, tmp_path):
    path, blob, config, header, n = st_base
    folder = str(tmp_path / "m")
    os.makedirs(folder)
    outcomes: collections.Counter = collections.Counter()

    @SETTINGS
    @given(st.data())
    def case(data):
        new_blob, new_cfg = data.draw(st_mutation(blob, config, header, n))
        write_atomic(os.path.join(folder, "model.safetensors"), new_blob)
        write_atomic(os.path.join(folder, "config.json"), json.dumps(new_cfg).encode())
        check_one(folder, outcomes)

    case()
    run_cases("safetensors", outcomes)


# ---------------------------------------------------------------------- GGUF
GH, GF, GNH, GNKV, GHD, GVOCAB = 64, 128, 4, 2, 16, 40


def _write_gguf(path: str) -> None:
    """One llama layer (Q8_0 embedding, F16 q/k, F32 rest), rope_freqs, a tiny BPE tokenizer."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(GH)
    w.add_feed_forward_length(GF)
    w.add_head_count(GNH)
    w.add_head_count_kv(GNKV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    letters = [chr(c) for c in range(ord("a"), ord("a") + GVOCAB - 4)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(letters + ["ab", "abc", "<s>", "</s>"])
    w.add_token_types([1] * (GVOCAB - 2) + [3, 3])
    w.add_token_merges(["a b", "ab c"])
    w.add_bos_token_id(GVOCAB - 2)
    w.add_eos_token_id(GVOCAB - 1)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    mats = {"token_embd.weight": ((GVOCAB, GH), Q.Q8_0), "blk.0.attn_q.weight": ((GNH * GHD, GH), Q.F16),
            "blk.0.attn_k.weight": ((GNKV * GHD, GH), Q.F16), "blk.0.attn_v.weight": ((GNKV * GHD, GH), Q.F32),
            "blk.0.attn_output.weight": ((GH, GNH * GHD), Q.F32), "blk.0.ffn_gate.weight": ((GF, GH), Q.F32),
            "blk.0.ffn_up.weight": ((GF, GH), Q.F32), "blk.0.ffn_down.weight": ((GH, GF), Q.F32)}
    for name, (shape, qtype) in mats.items():
        x = rng.uniform(-1, 1, size=shape).astype(np.float32)
        if qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif qtype == Q.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, rng.uniform(0.5, 1.5, GH).astype(np.float32))
    w.add_tensor("rope_freqs.weight", np.linspace(1, 8, GHD // 2).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fuzz_gguf") / "m.gguf")
    _write_gguf(path)
    load_everything(path)
    with open(path, "rb") as f:
        return f.read()


KEYS = [b"general.architecture", b"llama.block_count", b"llama.embedding_length",
        b"llama.attention.head_count", b"llama.attention.head_count_kv", b"llama.context_length",
        b"llama.feed_forward_length", b"llama.rope.freq_base", b"tokenizer.ggml.tokens",
        b"tokenizer.ggml.merges", b"tokenizer.ggml.token_type", b"tokenizer.ggml.bos_token_id",
        b"tokenizer.chat_template", b"tokenizer.ggml.model"]
TENSORS = [b"token_embd.weight", b"blk.0.attn_q.weight", b"blk.0.attn_k.weight",
           b"blk.0.ffn_down.weight", b"output_norm.weight", b"rope_freqs.weight"]


def _patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt):]


@st.composite
def gguf_mutation(draw, blob: bytes) -> bytes:
    kind = draw(st.sampled_from(["count", "kv", "kv", "tensor", "tensor", "bytes", "truncate"]))
    if kind == "count":                 # version (u32 at 4), n_tensors (u64 at 8), n_kv (u64 at 16)
        at, fmt, values = draw(st.sampled_from([(4, "<I", U32), (8, "<Q", U64), (16, "<Q", U64)]))
        return _patch(blob, at, fmt, draw(values))
    if kind == "kv":                    # the key's length, its value type, or the value's first bytes
        key = draw(st.sampled_from(KEYS))
        at = blob.index(key)
        part = draw(st.sampled_from(["key_len", "type", "value", "array_len"]))
        if part == "key_len":
            return _patch(blob, at - 8, "<Q", draw(U64))
        after = at + len(key)
        if part == "type":
            return _patch(blob, after, "<I", draw(U32 | st.integers(0, 13)))
        if part == "array_len":
            return _patch(blob, after + 8, "<Q", draw(U64))
        return blob[:after + 4] + draw(st.binary(min_size=1, max_size=8)) + blob[after + 4 + 8:]
    if kind == "tensor":                # n_dims, a dim, the ggml type or the data offset
        name = draw(st.sampled_from(TENSORS))
        at = blob.index(name, 24) + len(name)
        (n_dims,) = struct.unpack_from("<I", blob, at)
        part = draw(st.sampled_from(["n_dims", "dim", "type", "offset", "name_len"]))
        if part == "n_dims":
            return _patch(blob, at, "<I", draw(U32))
        if part == "dim":
            return _patch(blob, at + 4 + 8 * draw(st.integers(0, n_dims - 1)), "<Q", draw(U64))
        if part == "type":
            return _patch(blob, at + 4 + 8 * n_dims, "<I", draw(U32 | st.sampled_from([int(q) for q in Q])))
        if part == "offset":
            return _patch(blob, at + 8 + 8 * n_dims, "<Q", draw(U64 | st.integers(0, len(blob))))
        return _patch(blob, at - len(name) - 8, "<Q", draw(U64))
    if kind == "bytes":
        return apply_edits(blob, draw(byte_edits(len(blob))))
    return blob[:draw(st.integers(0, len(blob) - 1))]


@pytest.mark.timeout(120)
def test_fuzz_gguf(gguf_base, tmp_path):
    path = str(tmp_path / "m.gguf")
    outcomes: collections.Counter = collections.Counter()

    @SETTINGS
    @given(st.data())
    def case(data):
        write_atomic(path, data.draw(gguf_mutation(gguf_base)))
        check_one(path, outcomes)

    case()
    run_cases("gguf", outcomes)


def test_address_space_cap_catches_a_huge_allocation():
    """The guard the fuzz relies on: inside it, a 2 GiB allocation fails instead of happening."""
    with capped_address_space(HEADROOM):
        with pytest.raises((MemoryError, RuntimeError)):
            np.ones(2 << 30, np.uint8)
    np.ones(1 << 20, np.uint8)      # and the cap is lifted afterwards
