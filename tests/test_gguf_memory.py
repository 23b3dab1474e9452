"""GGUF weights held once: block weights are views of the file's map, copies drop the
file's pages, the file is never written, and loading a larger file grows RSS by about the
file's size (not twice it, as when every tensor was copied out of a resident map)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from test_quant_gguf import PROMPTS, tiny_gguf

import parallax
from parallax.loading.gguf import GGUFCheckpoint

# Block weights read whole and in file order are views; fused (several chunks) and
# llama-permuted (q/k, inside qkv_proj) ones are copies.
VIEWS = ("embed_tokens", "o_proj", "down_proj", "lm_head")
COPIES = ("qkv_proj", "gate_up_proj")


def mapped_ranges(path: str) -> list[tuple[int, int]]:
    """[start, end) of this process's mappings of ``path`` (/proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(path):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_block_weights_are_views_of_the_file(tmp_path, monkeypatch, fmt):
    """LLM(gguf): the unfused block weights (embedding, o_proj, down_proj, untied head) lie
    inside the file's mapping, the fused ones outside it; the logits equal those of the same
    file with every block tensor copied out (same bytes, same kernels: bit-equal); writing
    to a view changes neither the file nor a fresh load (the map is copy-on-write)."""
    monkeypatch.setenv("PARALLAX_GGUF_ACTIVATIONS", "f32")
    path = os.path.realpath(tiny_gguf(tmp_path, False, fmt))
    digest = sha256(path)
    with parallax.LLM(path) as llm:
        ranges = mapped_ranges(path)
        assert ranges, "the file is not mapped while its weights are in use"
        weights = {n: b for n, b in llm._runner.model.named_buffers() if b.dtype == torch.uint8}
        inside = {n: any(lo <= b.data_ptr() and b.data_ptr() + b.numel() <= hi
                         for lo, hi in ranges) for n, b in weights.items()}
        for name, is_view in inside.items():
            if any(k in name for k in VIEWS):
                assert is_view, f"{name} was copied, expected a view of the file"
            elif any(k in name for k in COPIES):
                assert not is_view, f"{name} is a view, expected own memory (fused)"
        assert sum(inside.values()) == 2 + 2 * llm.config.num_layers
        logits = llm.logits(PROMPTS)
        o_proj = llm._runner.model.layers[0].self_attn.o_proj.weight
        before = o_proj.clone()
        o_proj.zero_()                          # a private page: the file keeps its bytes
        o_proj.copy_(before)
    assert sha256(path) == digest

    read = GGUFCheckpoint.read_quantized
    monkeypatch.setattr(GGUFCheckpoint, "read_quantized",
                        lambda self, *a, copy=False: read(self, *a, copy=True))
    with parallax.LLM(path) as llm:
        assert not any(any(lo <= b.data_ptr() < hi for lo, hi in mapped_ranges(path))
                       for b in llm._runner.model.buffers())
        torch.testing.assert_close(llm.logits(PROMPTS), logits, rtol=0, atol=0, equal_nan=True)


def test_copied_reads_drop_the_files_pages(tmp_path):
    """A float read or a copied block read leaves the file's pages it copied from out of
    this process's resident memory; a view's pages are resident once touched. (The kernel
    maps up to 64 KiB of cached neighbours around each fault, hence the slack.)"""
    path = os.path.realpath(tiny_gguf(tmp_path, False, "q8_0", vocab_size=32768))
    name = "model.embed_tokens.weight"        # (32768, 64) Q8_0: 2.1 MiB
    with GGUFCheckpoint(path) as ckpt:
        size_kib = ckpt.read_quantized(name).numel() / 1024
        before = resident_kib(path)
        ckpt.read(name)
        ckpt.read_quantized(name, copy=True)
        assert resident_kib(path) - before < 0.25 * size_kib
        ckpt.read_quantized(name).sum()
        assert resident_kib(path) - before > 0.95 * size_kib


def resident_kib(path: str) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, mine = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:          # a mapping's header line
                mine = line.rstrip().endswith(path)
            elif mine and head[0] == "Rss:":
                total += int(head[1])
    return total


# ------------------------------------------------------------- RSS on a larger file
RSS_SCRIPT = r"""
import json, sys, torch
from parallax.loading import open_checkpoint
from parallax.models.loader import build_model, check_tensor_names
from parallax.parallel.context import ParallelContext
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
ckpt = open_checkpoint(sys.argv[1])
check_tensor_names(ckpt)
base = status("VmRSS")
model = build_model(ckpt, ParallelContext.single(), torch.float32)
ckpt.close()
for t in list(model.parameters()) + list(model.buffers()):   # touch every page
    t.detach().reshape(-1).view(torch.uint8)[::1024].sum()
print(json.dumps({"base": base, "peak": status("VmHWM"), "now": status("VmRSS")}))
"""


def write_random_llama(path: str, qtype, hidden=512, layers=8, ffn=2048, vocab=8192) -> None:
    """A random llama GGUF (untied head, every 2-D weight ``qtype``), without transformers."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    heads, head_dim = 8, hidden // 8
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)

    def mat(name, n, k):
        x = (0.05 * rng.standard_normal((n, k))).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    mat("token_embd.weight", vocab, hidden)
    mat("output.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for stem, n, k in (("attn_q", hidden, hidden), ("attn_k", hidden, hidden),
                           ("attn_v", hidden, hidden), ("attn_output", hidden, hidden),
                           ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden),
                           ("ffn_down", hidden, ffn)):
            mat(f"blk.{i}.{stem}.weight", n, k)
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q8_0,
                                   gguf.GGMLQuantizationType.Q4_0], ids=["q8_0", "q4_0"])
def test_load_grows_rss_by_the_file_size(tmp_path, qtype):
    """Loading a ~24-45 MiB GGUF and touching every weight raises this process's peak RSS
    by at most 1.15x the file + 8 MiB over the RSS before the first weight is read (the
    old reader: ~2x, a copy of each tensor beside the map's resident pages)."""
    path = str(tmp_path / "random.gguf")
    write_random_llama(path, qtype)
    size = os.path.getsize(path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
           "PARALLAX_GGUF_ACTIVATIONS": "f32"}
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, path], capture_output=True,
                       text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grown = m["peak"] - m["base"]
    assert grown <= 1.15 * size + (8 << 20), (
        f"peak RSS grew {grown / 2**20:.1f} MiB loading a {size / 2**20:.1f} MiB file")
    assert m["now"] - m["base"] >= 0.9 * size       # the weights are all there, resident
