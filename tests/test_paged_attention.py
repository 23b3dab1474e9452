"""Paged attention twins: the C kernel (ops/cpu.py) and the torch reference against a dense
oracle built without block tables, on ragged mixed prefill/decode batches that cross block
boundaries and share prefix blocks; and their refusal of out-of-range metadata."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from paged_cases import make_case
from parallax import ParallaxError
from parallax.ops import cpu as cpu_ops
from parallax.ops import reference as ref

BS = 16


def _rot(x, cos, sin):
    """rotate_half rotary; x (T, H, D), cos/sin (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _case(seed, seqs, hq=8, hk=2, d=64, shared_blocks=0, num_blocks=64):
    """seqs: [(context_len, new_tokens)]. Sequences 0 and 1 share their first
    ``shared_blocks`` blocks (same ids, same cached contents), as after a prefix-cache hit."""
    return make_case(seed, seqs, hq=hq, hk=hk, d=d, bs=BS, num_blocks=num_blocks,
                     shared_blocks=shared_blocks)


def _args(c):
    return (c["q"], c["k"], c["v"], c["k_cache"].clone(), c["v_cache"].clone(), c["cos"],
            c["sin"], c["slot_mapping"], c["block_tables"], c["context_lens"],
            c["query_start_loc"])


def _oracle(c, scale, window=None, softcap=None):
    """Dense attention per sequence: old keys read from the cache by position, new keys
    rotated here; no block table walk, no paged write. ``window``: keys within the last
    ``window`` positions only; ``softcap``: scores c * tanh(s / c), spelled out."""
    outs = []
    qsl = c["query_start_loc"].tolist()
    q = _rot(c["q"], c["cos"], c["sin"])
    k_new = _rot(c["k"], c["cos"], c["sin"])
    for b, length in enumerate(c["context_lens"].tolist()):
        s, e = qsl[b], qsl[b + 1]
        old = length - (e - s)
        ks = [c["k_cache"][c["block_tables"][b, p // BS], :, p % BS] for p in range(old)]
        vs = [c["v_cache"][c["block_tables"][b, p // BS], :, p % BS] for p in range(old)]
        k = torch.cat([torch.stack(ks), k_new[s:e]]) if ks else k_new[s:e]
        v = torch.cat([torch.stack(vs), c["v"][s:e]]) if vs else c["v"][s:e]
        kpos, qpos = torch.arange(length)[None, :], torch.arange(old, length)[:, None]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        qh, kh, vh = q[s:e].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        rep = qh.shape[0] // kh.shape[0]
        kh, vh = kh.repeat_interleave(rep, 0), vh.repeat_interleave(rep, 0)
        scores = qh @ kh.transpose(1, 2) * scale                         # (Hq, n, L)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        o = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vh
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


# The C kernel in every variant this CPU runs (an AVX-512 machine also checks AVX2).
IMPLS = {"reference": ref.paged_attention_with_kvcache,
         **{f"c-{v}": functools.partial(cpu_ops.paged_attention_with_kvcache, isa=v)
            for v in cpu_ops.supported_variants()}}

CASES = {
    "decode-ragged": [(1, 1), (17, 1), (16, 1), (33, 1), (100, 1)],
    "prefill-ragged": [(5, 5), (16, 16), (40, 40), (129, 129)],
    "mixed-chunked": [(47, 1), (64, 30), (200, 7), (3, 3), (18, 2)],
    "block-boundaries": [(15, 1), (16, 1), (17, 1), (32, 16), (33, 17)],
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_paged_attention_matches_dense_oracle(impl, name):
    if impl.startswith("c-") and cpu_ops.kernels() is None:
        pytest.fail("the CPU kernels did not build (gcc missing?)")
    c = _case(hash(name) % 1000, CASES[name])
    scale = 64 ** -0.5
    args = _args(c)
    out = IMPLS[impl](*args, scale)
    torch.testing.assert_close(out, _oracle(c, scale), atol=2e-5, rtol=1e-5)
    # The new tokens' keys (rotated) and values landed in their slots, nothing else moved.
    kc, vc = args[3], args[4]
    bs_idx, off = c["slot_mapping"] // BS, c["slot_mapping"] % BS
    torch.testing.assert_close(kc[bs_idx, :, off], _rot(c["k"], c["cos"], c["sin"]), atol=1e-6,
                               rtol=1e-6)
    assert torch.equal(vc[bs_idx, :, off], c["v"])
    untouched = torch.ones(kc.shape[0] * BS, dtype=torch.bool)
    untouched[c["slot_mapping"]] = False
    flat = lambda x: x.transpose(1, 2).reshape(-1, *x.shape[1:2], x.shape[-1])  # noqa: E731
    assert torch.equal(flat(kc)[untouched], flat(c["k_cache"])[untouched])


# Head layouts the C kernel handles on different paths: SmolLM2's 9 query / 3 KV heads
# (decode rows summed 16 keys at a time, prefill tiles of 16 tokens x 3 heads), head dims
# with unrolled loops (64, 128) and without (80, 256), the most query heads per KV head (16:
# tiles of 4 tokens), no GQA. Prefill tails of every length below a tile, decodes and
# chunks that start mid-block, a context longer than a round of 128 keys.
HEAD_LAYOUTS = [(9, 3, 64), (4, 1, 128), (16, 1, 80), (2, 2, 256), (3, 3, 48)]
LAYOUT_SEQS = [(300, 1), (37, 37), (21, 5), (140, 23), (16, 16), (150, 2), (1, 1), (48, 3)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hk,d", HEAD_LAYOUTS)
def test_head_layouts_match_dense_oracle(impl, hq, hk, d):
    if impl.startswith("c-") and cpu_ops.kernels() is None:
        pytest.fail("the CPU kernels did not build (gcc missing?)")
    c = _case(hq * 100 + d, LAYOUT_SEQS, hq=hq, hk=hk, d=d, num_blocks=64)
    scale = d ** -0.5
    out = IMPLS[impl](*_args(c), scale)
    torch.testing.assert_close(out, _oracle(c, scale), atol=2e-5, rtol=1e-5)


def test_batch_split_over_threads_matches_reference():
    """A step large enough for the kernel to split its work items over threads (48 decode
    rows at contexts 100-400 and a 100-token prefill chunk, SmolLM2's heads), each variant
    against the torch twin, with 2 threads."""
    if cpu_ops.kernels() is None:
        pytest.fail("the CPU kernels did not build (gcc missing?)")
    g = torch.Generator().manual_seed(7)
    seqs = [(int(x), 1) for x in torch.randint(100, 401, (48,), generator=g)] + [(260, 100)]
    c = _case(17, seqs, hq=9, hk=3, d=64, num_blocks=sum(-(-n // BS) for n, _ in seqs) + 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expect = ref.paged_attention_with_kvcache(*_args(c), 0.125)
        for v in cpu_ops.supported_variants():
            out = cpu_ops.paged_attention_with_kvcache(*_args(c), 0.125, isa=v)
            torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-5, msg=v)
    finally:
        torch.set_num_threads(threads)


# Sliding windows that are and are not a multiple of the block size, over lengths that
# cross the window and block boundaries, mixed prefill (longer than the window) and decode.
WINDOW_SEQS = [(1, 1), (19, 1), (20, 1), (21, 1), (32, 1), (33, 1), (47, 2), (70, 40),
               (130, 1), (64, 64)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window,softcap", [(20, None), (32, None), (16, 5.0), (None, 3.0),
                                            (7, 50.0)])
def test_windowed_soft_capped_attention_matches_dense_oracle(impl, window, softcap):
    if impl.startswith("c-") and cpu_ops.kernels() is None:
        pytest.fail("the CPU kernels did not build (gcc missing?)")
    c = _case(11, WINDOW_SEQS, num_blocks=80)
    c["q"] *= 3   # larger scores, so the soft-cap bends them
    expect = _oracle(c, 0.125, window, softcap)
    if window is not None:   # blocks wholly before every window are never read: poison them
        for b, (length, n) in enumerate(WINDOW_SEQS):
            first = ref.first_block_read(length, n, BS, window)
            for i in range(first):
                blk = int(c["block_tables"][b, i])
                c["k_cache"][blk] = float("nan")
                c["v_cache"][blk] = float("nan")
            if b % 2:
                c["block_tables"][b, :first] = -1     # as the engine leaves freed entries
    out = IMPLS[impl](*_args(c), 0.125, window, softcap)
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_prefix_blocks_give_the_same_answer_as_private_copies(impl):
    """Two sequences reading the same physical prefix blocks equal the same sequences with
    private copies of those blocks."""
    seqs = [(70, 1), (70, 6)]
    shared = _case(3, seqs, shared_blocks=4)
    private = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in shared.items()}
    used = set(shared["block_tables"].flatten().tolist())
    spare = [i for i in range(shared["k_cache"].shape[0]) if i not in used]
    for i in range(4):      # give sequence 1 its own copies of the 4 shared blocks
        src, dst = int(shared["block_tables"][1, i]), spare[i]
        private["k_cache"][dst] = shared["k_cache"][src]
        private["v_cache"][dst] = shared["v_cache"][src]
        private["block_tables"][1, i] = dst
    assert shared["block_tables"][1, :4].tolist() == shared["block_tables"][0, :4].tolist()
    private["slot_mapping"] = shared["slot_mapping"]          # new tokens land in block 4
    a = IMPLS[impl](*_args(shared), 0.125)
    b = IMPLS[impl](*_args(private), 0.125)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", ["negative-slot", "slot-beyond-capacity", "zero-length",
                                 "block-beyond-cache", "negative-block"])
def test_out_of_range_metadata_is_an_error_and_writes_nothing(impl, bad):
    c = _case(5, [(20, 1), (9, 9)])
    if bad == "negative-slot":
        c["slot_mapping"][3] = -1
    elif bad == "slot-beyond-capacity":
        c["slot_mapping"][0] = c["k_cache"].shape[0] * BS
    elif bad == "zero-length":
        c["context_lens"][0] = 0
    elif bad == "block-beyond-cache":
        c["block_tables"][1, 0] = c["k_cache"].shape[0]
    else:
        c["block_tables"][0, 1] = -3
    args = _args(c)
    with pytest.raises(ParallaxError):
        IMPLS[impl](*args, 0.125)
    assert torch.equal(args[3], c["k_cache"]) and torch.equal(args[4], c["v_cache"])
