"""Packed fp32 weights on transparent huge pages (ops/hugepages.py, ops.cpu.panel_buffers):
the same panels as ``pack``, laid out in one 2 MiB-aligned mapping, and a loaded model's
packed weights live there; trim_heap gives freed heap memory back."""

from __future__ import annotations

import subprocess
import sys

import torch

from parallax.ops import cpu
from parallax.ops.hugepages import HUGE_PAGE, arena, huge_page_buffer


def test_huge_page_buffer_starts_on_a_huge_page_and_outlives_its_views():
    buf = huge_page_buffer(3 * HUGE_PAGE + 5)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * HUGE_PAGE + 5
    assert buf.data_ptr() % HUGE_PAGE == 0
    view = buf[100:200]
    del buf
    view.fill_(7)                      # the mapping is still there through the view
    assert int(view.sum()) == 700


def test_arena_tensors_are_page_aligned_contiguous_and_disjoint():
    shapes = [(3, 5, 32), (1, 7), (2, 2, 2)]
    ts = arena(shapes, torch.float32)
    assert [tuple(t.shape) for t in ts] == shapes
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in ts)
    assert all(t.data_ptr() % 4096 == 0 for t in ts)
    for i, t in enumerate(ts):
        t.fill_(i)
    assert [float(t.mean()) for t in ts] == [0.0, 1.0, 2.0]   # no overlap


def test_pack_into_panel_buffers_equals_pack():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) for n, k in ((64, 40), (96, 17), (32, 1))]
    outs = cpu.panel_buffers([tuple(w.shape) for w in ws])
    for w, out in zip(ws, outs):
        packed = cpu.pack(w, out=out)
        assert packed.data_ptr() == out.data_ptr()
        assert torch.equal(packed, cpu.pack(w)) and torch.equal(cpu.unpack(packed), w)


def test_loaded_model_packs_into_one_mapping(tmp_path):
    """Every packed weight of a loaded fp32 model, the tied LM head packed once with the
    embedding, lies in one mapping that starts on a huge page."""
    import parallax
    from conftest import make_checkpoint
    if cpu.kernels() is None:   # nothing is packed without the kernels: nothing to check
        return
    path = make_checkpoint(str(tmp_path / "llama"), "llama", hidden_size=64,
                           intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=True)
    with parallax.LLM(path) as llm:
        model = llm._runner.model
        packed = [m.weight for m in model.linear_layers() + [model.lm_head]]
        assert model.lm_head.weight is model.embed_tokens.weight
        assert all(w.dim() == 3 for w in packed)
        assert len({w.untyped_storage().data_ptr() for w in packed}) == 1
        assert min(w.data_ptr() for w in packed) % HUGE_PAGE == 0
        assert len(llm.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)[0].token_ids) == 4


TRIM_RUN = r"""
import ctypes, ctypes.util, sys
from parallax.ops.hugepages import trim_heap
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
blocks = [libc.malloc(64 << 10) for _ in range(2048)]   # 128 MiB on the heap (< mmap threshold)
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)
pin = libc.malloc(64 << 10)                                  # keeps the heap's top in use
for b in blocks:
    libc.free(b)
before = rss()
trim_heap()
print(before - rss())
"""


def test_trim_heap_returns_freed_heap_memory():
    out = subprocess.run([sys.executable, "-c", TRIM_RUN], capture_output=True, text=True,
                         timeout=120, check=True)
    assert int(out.stdout.strip()) > 100 << 20        # of the 128 MiB freed
