"""Block manager and scheduler on their own (no model): allocation, prefix caching, LRU
eviction, chunked prefill, budgets, preemption, cancellation, refusal of what cannot fit."""

from __future__ import annotations

import pytest

from parallax import ParallaxError
from parallax.engine.block_manager import BlockManager
from parallax.engine.core import split_by_tokens
from parallax.engine.request import Request, StopConditions
from parallax.engine.scheduler import Scheduler
from parallax.sampling import SamplingParams

BS = 4


def _req(rid: int, prompt, max_new: int = 8) -> Request:
    return Request(rid, list(prompt), SamplingParams(), StopConditions(max_new))


def _run_step(sched: Scheduler, next_token: int = 7):
    """One engine step without a model: schedule, mark computed, 'sample' for finished gaps."""
    out = sched.schedule()
    sched.update(out)
    for s in out.scheduled:
        if s.samples:
            d = s.request.append_token(next_token)
            if d.finish_reason:
                sched.finish(s.request)
    return out


def test_blocks_are_refcounted_and_freed_tail_first():
    bm = BlockManager(num_blocks=6, block_size=BS, prefix_caching=False)
    a = _req(0, range(10))
    assert bm.allocate(a, 10)                     # 3 blocks
    assert bm.block_table(0) == [0, 1, 2] and bm.num_free_blocks == 3
    assert abs(bm.usage() - 0.5) < 1e-9
    bm.free_request(0)
    assert bm.num_free_blocks == 6 and bm.usage() == 0
    # LRU: the freed blocks went to the back, tail first: 3, 4, 5, then 2, 1, 0.
    b = _req(1, range(24))
    assert bm.allocate(b, 24)
    assert bm.block_table(1) == [3, 4, 5, 2, 1, 0]
    assert not bm.allocate(_req(2, [1]), 1)       # full: refused, nothing changed
    assert bm.block_table(2) == []


def test_prefix_cache_reuses_leading_full_blocks_and_stops_at_first_miss():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = _req(0, list(range(13)))                  # 3 full blocks + 1 token
    assert bm.allocate(a, 13)
    a.num_computed_tokens = 13
    b = _req(1, list(range(8)) + [99, 98, 97, 96, 95])   # shares the first 2 blocks only
    hits = bm.get_computed_blocks(b)
    assert [h.block_id for h in hits] == bm.block_table(0)[:2]
    b.num_computed_tokens = 2 * BS
    assert bm.allocate(b, 5, hits)
    assert bm.block_table(1)[:2] == bm.block_table(0)[:2]
    assert all(bm.blocks[i].ref_cnt == 2 for i in bm.block_table(0)[:2])
    # The last token is never served from the cache: a prompt of exactly 2 blocks hits 1.
    c = _req(2, list(range(8)))
    assert len(bm.get_computed_blocks(c)) == 1


def test_freed_cached_blocks_stay_reusable_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = _req(0, list(range(9)))
    assert bm.allocate(a, 9)
    bm.free_request(0)
    assert bm.usage() == 0
    b = _req(1, list(range(9)))
    assert len(bm.get_computed_blocks(b)) == 2    # still cached after a finished
    # Fill the cache with other tokens: the cached blocks are evicted (LRU), hits vanish.
    c = _req(2, list(range(100, 116)))
    assert bm.allocate(c, 16)
    assert bm.get_computed_blocks(b) == []


def test_chunked_prefill_respects_the_token_budget_and_decodes_go_first():
    bm = BlockManager(num_blocks=64, block_size=BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    short = _req(0, range(3), max_new=20)
    sched.add(short)
    _run_step(sched)                              # short prefilled, 1 token out
    long = _req(1, range(100, 125))
    sched.add(long)
    chunks = []
    for _ in range(4):
        out = _run_step(sched)
        assert out.num_tokens <= 10
        got = {s.request.request_id: s.num_tokens for s in out.scheduled}
        assert got[0] == 1                        # the decode is never stalled
        chunks.append(got.get(1, 0))
    assert chunks == [9, 9, 7, 1]                 # 25 prompt tokens in chunks, then decode
    assert long.num_computed_tokens == 26 and len(long.output_ids) == 2


def test_max_num_seqs_and_fcfs_admission():
    bm = BlockManager(num_blocks=64, block_size=BS)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    reqs = [_req(i, range(5)) for i in range(4)]
    for r in reqs:
        sched.add(r)
    out = _run_step(sched)
    assert [s.request.request_id for s in out.scheduled] == [0, 1]
    assert [r.request_id for r in sched.waiting] == [2, 3]


def test_preemption_takes_the_most_recent_request_and_everything_finishes():
    # 6 blocks of 4 = 24 tokens; three requests of 6 + 10 tokens need 12 blocks at the end.
    bm = BlockManager(num_blocks=6, block_size=BS, prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    reqs = [_req(i, range(10 * i, 10 * i + 6), max_new=10) for i in range(3)]
    for r in reqs:
        sched.add(r)
    first_preempted = None
    for _ in range(200):
        out = _run_step(sched)
        if out.preempted and first_preempted is None:
            first_preempted = out.preempted[0].request_id
        if not sched.has_work:
            break
    assert sched.num_preemptions > 0
    assert first_preempted == 2                   # the most recently admitted
    assert all(r.finish_reason == "length" and len(r.output_ids) == 10 for r in reqs)
    assert bm.usage() == 0


def test_a_request_too_big_for_the_cache_is_refused_with_the_numbers():
    bm = BlockManager(num_blocks=4, block_size=BS)
    sched = Scheduler(bm)
    sched.check_fits(10, 6)                       # 16 tokens = 4 blocks: fits
    with pytest.raises(ParallaxError, match=r"needs 5 KV blocks.*holds 4 blocks \(16 tokens\)"):
        sched.check_fits(10, 7)


def test_cancel_frees_blocks_before_the_next_step():
    bm = BlockManager(num_blocks=16, block_size=BS)
    sched = Scheduler(bm, max_num_batched_tokens=64)
    a, b = _req(0, range(12), max_new=50), _req(1, range(20, 30), max_new=50)
    sched.add(a)
    sched.add(b)
    _run_step(sched)
    used = bm.usage()
    a.abort()
    sched.finish(a)
    assert bm.usage() < used and bm.block_table(0) == []
    out = _run_step(sched)
    assert [s.request.request_id for s in out.scheduled] == [1]
    b.abort()
    sched.finish(b)
    assert bm.usage() == 0 and not sched.has_work


@pytest.mark.parametrize("sizes, parts, want", [
    ([1] * 5, 2, [3, 2]), ([100, 1, 1, 1], 2, [1, 3]), ([1, 1, 1, 1, 100], 2, [4, 1]),
    ([1, 1], 4, [1, 1]), ([3], 2, []), ([5] * 4, 1, [])])
def test_micro_batches_split_by_tokens(sizes, parts, want):
    """Pipeline micro-batches: contiguous groups of about equal tokens, never empty."""
    assert split_by_tokens(sizes, parts) == want


def test_steps_in_flight_take_disjoint_balanced_requests():
    """pp=2: two steps in flight at once over disjoint halves of the running requests; a
    request in flight is neither scheduled again nor preempted until its step is done."""
    bm = BlockManager(num_blocks=64, block_size=BS)
    sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=64, steps_in_flight=2)
    reqs = [_req(i, range(10 * i, 10 * i + 3)) for i in range(5)]
    for r in reqs:
        sched.add(r)
    a = sched.schedule()
    b = sched.schedule()
    ids = lambda out: [s.request.request_id for s in out.scheduled]   # noqa: E731
    assert ids(a) == [0, 1, 2] and ids(b) == [3, 4]          # ceil(5 / 2) = 3 per step
    assert sched.schedule().scheduled == []                  # everyone is in flight
    sched.update(a)
    for s in a.scheduled:
        s.request.append_token(7)
    assert ids(sched.schedule()) == [0, 1, 2]                # a's requests, b still in flight
    assert sched.in_flight == {0, 1, 2, 3, 4}


def test_a_request_in_flight_is_never_preempted():
    """When blocks run out, the victim is the most recent request not in flight (possibly
    the one asking); a request whose step is still running keeps its blocks."""
    bm = BlockManager(num_blocks=4, block_size=BS)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, steps_in_flight=2)
    first, second = _req(0, range(4)), _req(1, range(10, 14))
    for r in (first, second):
        sched.add(r)
    a = sched.schedule()                          # first: 1 block
    b = sched.schedule()                          # second (admitted later): 1 block
    assert len(a.scheduled) == len(b.scheduled) == 1
    sched.update(a)
    first.append_token(7)
    bm.allocate(_req(9, range(8)), 8)             # someone else takes the last 2 blocks
    out = sched.schedule()                        # first needs a 2nd block: none free
    assert out.scheduled == [] and out.preempted == [first]   # not second, in flight
    assert bm.block_table(1) == b.scheduled[0].block_table and 1 in sched.in_flight
