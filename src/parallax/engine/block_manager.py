"""The paged KV cache's bookkeeping: which block holds which request's tokens.

The cache itself (per-layer tensors of ``num_blocks`` blocks of ``block_size`` token slots)
lives on every rank and is allocated once (engine/runner.py); this class, on the scheduling
side only, hands out block ids.

- Every block has a reference count: the number of requests whose block table holds it.
- Blocks with count 0 sit in one free queue, which is also the LRU order: allocation takes
  from the front, a freed block goes to the back (a request's blocks are freed tail first,
  so a prompt's last blocks are evicted before its first ones).
- Prefix caching: a block whose ``block_size`` tokens are all known gets a hash chained over
  its parent's hash and its tokens, and is entered in ``cached``. A new request walks its
  prompt's full blocks and takes every consecutive block already cached (count + 1, out of
  the free queue if it was there) instead of computing it again. A freed block keeps its hash
  until allocation reuses it, so a finished request's prefix stays reusable until evicted.
- Sliding window (``window``, set when every layer of the model slides: ModelConfig
  .cache_window): a step computing tokens from position c on reads no key before
  c + 1 - window, so the blocks wholly before that are released as the request advances and
  their table entries become -1 (the attention neither reads nor checks them:
  ops.reference.first_block_read). A request then holds at most ceil(window / block_size)
  + 1 blocks at a decode step, however long it runs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..errors import ParallaxError
from ..ops.reference import first_block_read
from .request import Request


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None      # set once the block is full and cached


def hash_block(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The prefix-cache key of a full block: its tokens chained to every block before it."""
    return hash((parent, tokens))


class BlockManager:
    """Allocates KV blocks to requests, with optional prefix caching.

    Args:
        num_blocks: blocks in the cache (capacity = num_blocks * block_size tokens).
        block_size: token slots per block.
        prefix_caching: reuse cached full blocks across requests.
        window: the model's attention window when every layer slides (None: keep every
            block of a request until it ends).
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True,
                 window: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ParallaxError(f"the KV cache needs num_blocks >= 1 and block_size >= 1, got "
                                f"{num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching, self.window = prefix_caching, window
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, Block] = {}
        # request id -> its blocks in order; None where a block fell out of the window
        self.tables: dict[int, list[Block | None]] = {}
        self._hashes: dict[int, list[int]] = {}        # request id -> hashes of its full blocks
        self.prefix_cache_queries = 0                  # prompt tokens looked up
        self.prefix_cache_hits = 0                     # of those, found in the cache

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        """Fraction of blocks held by requests (cached but unreferenced blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: int) -> list[int]:
        """The request's block ids in token order, -1 for blocks released by the window."""
        return [-1 if b is None else b.block_id for b in self.tables.get(request_id, ())]

    def num_held_blocks(self, request_id: int) -> int:
        """Blocks the request holds now (those released by the window not counted)."""
        return sum(b is not None for b in self.tables.get(request_id, ()))

    # ------------------------------------------------------------------ prefix cache
    def _block_hashes(self, req: Request, upto: int) -> list[int]:
        """Hashes of req's full blocks among its first ``upto`` tokens (memoised)."""
        hashes = self._hashes.setdefault(req.request_id, [])
        bs = self.block_size
        toks = req.all_token_ids
        while (len(hashes) + 1) * bs <= upto:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tuple(toks[i * bs:(i + 1) * bs])))
        return hashes

    def get_computed_blocks(self, req: Request) -> list[Block]:
        """The longest run of req's leading full blocks already in the cache.

        The last token is never taken from the cache (its logits are needed), so at most
        ``num_tokens - 1`` tokens count.
        """
        if not self.prefix_caching:
            return []
        hashes = self._block_hashes(req, req.num_tokens - 1)
        hits: list[Block] = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count an admitted request's lookup: its tokens and those found cached."""
        if self.prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit_tokens

    # ------------------------------------------------------------------ allocation
    def allocate(self, req: Request, num_new_tokens: int,
                 computed: list[Block] | None = None) -> bool:
        """Give req blocks for ``num_computed_tokens + num_new_tokens`` tokens.

        ``computed``: cached blocks to take first (from ``get_computed_blocks``, on admission).
        Returns False, allocating nothing, when too few blocks are free (blocks that fell out
        of the window are released either way).
        """
        computed = computed or []
        self._release_out_of_window(req.request_id, req.num_computed_tokens)
        table = self.tables.get(req.request_id, [])
        have = len(table) + len(computed)
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - have
        # Cached hits with count 0 sit in the free queue: taking them uses free blocks too.
        hits_in_free = sum(1 for b in computed if b.ref_cnt == 0)
        if max(need, 0) + hits_in_free > len(self.free):
            return False
        table = self.tables.setdefault(req.request_id, table)
        for b in computed:
            if b.ref_cnt == 0:
                del self.free[b.block_id]
            b.ref_cnt += 1
            table.append(b)
        for _ in range(max(need, 0)):
            _, b = self.free.popitem(last=False)
            if b.block_hash is not None:              # evict its cached content
                if self.cached.get(b.block_hash) is b:
                    del self.cached[b.block_hash]
                b.block_hash = None
            b.ref_cnt = 1
            table.append(b)
        if self.prefix_caching:
            self._cache_full_blocks(req, req.num_computed_tokens + num_new_tokens)
        return True

    def _release(self, b: Block) -> None:
        b.ref_cnt -= 1
        if b.ref_cnt == 0:
            self.free[b.block_id] = b

    def _release_out_of_window(self, request_id: int, start: int) -> None:
        """Release the blocks no step from position ``start`` on reads (window only).
        Safe whether or not the allocation that follows succeeds: positions only advance,
        and a preempted request is recomputed from a fresh table."""
        table = self.tables.get(request_id)
        if self.window is None or not table:
            return
        # The first new token (position start) is the earliest reader: context start + 1.
        first = first_block_read(start + 1, 1, self.block_size, self.window)
        for i in range(min(first, len(table))):
            if table[i] is not None:
                self._release(table[i])
                table[i] = None

    def _cache_full_blocks(self, req: Request, num_tokens: int) -> None:
        """Enter req's blocks that are full within its first num_tokens tokens."""
        table = self.tables[req.request_id]
        hashes = self._block_hashes(req, num_tokens)[:num_tokens // self.block_size]
        for b, h in zip(table, hashes):
            if b is not None and b.block_hash is None and h not in self.cached:
                b.block_hash = h
                self.cached[h] = b

    def free_request(self, request_id: int) -> None:
        """Release a request's blocks (tail first, so they are evicted first)."""
        for b in reversed(self.tables.pop(request_id, [])):
            if b is not None:
                self._release(b)
        self._hashes.pop(request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (blocks in use keep their contents)."""
        for b in self.cached.values():
            b.block_hash = None
        self.cached.clear()
