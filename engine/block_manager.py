"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts and the prefix cache.

The pool itself is one preallocated tensor owned by the model runner; this class only hands out block ids.
A block is in exactly one of two states:
- used: ref_count > 0, held by that many requests (more than one when a prefix is shared);
- free: ref_count == 0 and in `free` (LRU order, front evicted first). A free block may still carry the hash
  of the full block of tokens whose K/V it holds: a later request with the same prefix takes it back
  instead of recomputing it, until an allocation evicts it.
A block's hash chains its parent's hash, its token ids and the identity of every image overlapping it, so
equal placeholder tokens of two different images never share a block.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}          # hash -> block holding those tokens' K/V
        self.num_queries = self.num_hits = 0        # prefix-cache counters, in tokens

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    # ---- prefix cache ------------------------------------------------------------------------------------------
    def block_hash_of(self, req: Request, index: int, parent: bytes) -> bytes:
        bs = self.block_size
        lo, hi = index * bs, (index + 1) * bs
        h = hashlib.sha256(parent)
        h.update(req.token_ids(lo, hi).astype(np.int64, copy=False).tobytes())
        for img in req.images:
            if img.start < hi and img.end > lo:
                h.update(f"|{img.hash}@{img.start - lo}".encode())
        return h.digest()

    def _hashes(self, req: Request, num_full_blocks: int) -> list[bytes]:
        """The request's memo of block hashes, holding at least `num_full_blocks` (never copied: a decode
        step must not pay for the whole context). A full block's tokens, and so its hash, never change."""
        hashes = req.block_hashes
        while len(hashes) < num_full_blocks:
            hashes.append(self.block_hash_of(req, len(hashes), hashes[-1] if hashes else b""))
        return hashes

    def lookup(self, req: Request) -> list[int]:
        """Cached blocks holding the longest prefix of `req`'s tokens. At least one token is always left to
        compute, so that the step that follows produces logits."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        num_full = (req.num_tokens - 1) // self.block_size
        for h in self._hashes(req, num_full)[:num_full]:
            b = self.cached.get(h)
            if b is None:
                break
            hits.append(b)
        self.num_queries += req.num_tokens
        self.num_hits += len(hits) * self.block_size
        return hits

    def cache_full_blocks(self, req: Request, num_computed_tokens: int) -> None:
        """Register the blocks that became full of computed tokens; called after the step that computed them."""
        if not self.enable_prefix_caching:
            return
        full = num_computed_tokens // self.block_size
        hashes = self._hashes(req, full)
        for i in range(req.num_hashed_blocks, full):
            b, h = req.block_ids[i], hashes[i]
            if self.block_hash[b] is None and h not in self.cached:
                self.cached[h] = b
                self.block_hash[b] = h
        req.num_hashed_blocks = max(req.num_hashed_blocks, full)

    # ---- allocation --------------------------------------------------------------------------------------------
    def can_allocate(self, req: Request, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        need = cdiv(req.num_computed_tokens + len(prefix) * self.block_size + num_new_tokens, self.block_size)
        need -= len(req.block_ids) + len(prefix)
        revived = sum(1 for b in prefix if self.ref_counts[b] == 0)   # taken out of `free` by the hit
        return need <= len(self.free) - revived

    def allocate(self, req: Request, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens (after the `prefix` blocks, which it shares).
        Returns False, changing nothing, when the pool cannot hold them."""
        if not self.can_allocate(req, num_new_tokens, prefix):
            return False
        for b in prefix:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        req.block_ids.extend(prefix)
        req.num_computed_tokens += len(prefix) * self.block_size
        req.num_hashed_blocks += len(prefix)
        need = cdiv(req.num_computed_tokens + num_new_tokens, self.block_size) - len(req.block_ids)
        for _ in range(need):
            b, _ = self.free.popitem(last=False)
            if self.block_hash[b] is not None:            # evict: its tokens are no longer findable
                del self.cached[self.block_hash[b]]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            req.block_ids.append(b)
        return True

    def release(self, req: Request) -> None:
        """Drop `req`'s hold on its blocks. The last block goes to `free` first, so under pressure the end of a
        sequence is evicted before the prefix that others are more likely to share."""
        for b in reversed(req.block_ids):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
        req.block_ids = []
        req.num_hashed_blocks = 0

    def check_integrity(self, requests: list[Request]) -> None:
        """Assert the invariants above against the requests that hold blocks (tests call this)."""
        held = [0] * self.num_blocks
        for r in requests:
            assert len(set(r.block_ids)) == len(r.block_ids), f"{r.request_id} holds a block twice"
            for b in r.block_ids:
                held[b] += 1
        assert held == self.ref_counts, "reference counts differ from the blocks requests hold"
        assert set(self.free) == {b for b in range(self.num_blocks) if self.ref_counts[b] == 0}, \
            "the free list is not exactly the unreferenced blocks"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, f"block {b} is cached under a hash it does not carry"
        assert sum(h is not None for h in self.block_hash) == len(self.cached)
