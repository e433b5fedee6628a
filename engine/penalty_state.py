"""Token statistics behind the repetition, frequency and presence penalties, kept on the device.

A request whose sampling uses a penalty gets a row in two device tables when it joins the batch: `seen`
(every token id of its prompt and output: the repetition penalty's set) and `counts` (how often each id was
generated: frequency and presence). The row is filled once from the request's token array, then updated on
the device from each step's sampled ids, so no step rebuilds a per-token list on the host. A preempted or
finished request gives its row back; a resumed one is filled again from its (unchanged) tokens.
Row 0 stays empty: rows of requests without penalties read it.
"""

from __future__ import annotations

import torch

from engine.request import Request
from engine.staging import StagingArena


class PenaltyState:
    def __init__(self, vocab_size: int, device: torch.device, rows: int = 8):
        self.vocab_size, self.device = vocab_size, device
        self.seen = torch.zeros((rows, vocab_size), dtype=torch.bool, device=device)        # [rows, V]
        self.counts = torch.zeros((rows, vocab_size), dtype=torch.float32, device=device)   # exact below 2**24
        self.row_of: dict[Request, int] = {}
        self._free = list(range(rows - 1, 0, -1))
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def add(self, req: Request, staging: StagingArena) -> None:
        """Give `req` a row, filled from its tokens once the staged ids are flushed (`apply`)."""
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.row_of[req] = row
        ids = staging.put(req.all_token_ids, torch.int64)
        outputs = staging.put(req.token_ids(req.num_prompt_tokens, req.num_tokens), torch.int64)
        self._pending.append((row, ids, outputs))

    def apply(self) -> None:
        """Fill the rows added since the last call (after the staging arena's flush)."""
        for row, ids, outputs in self._pending:
            self.seen[row].zero_().index_fill_(0, ids, True)
            self.counts[row].zero_().index_add_(0, outputs, torch.ones_like(outputs, dtype=torch.float32))
        self._pending.clear()

    def release(self, req: Request) -> None:
        row = self.row_of.pop(req, None)
        if row is not None:
            self._free.append(row)

    def rows(self, reqs: list[Request]) -> list[int]:
        """Each request's row, 0 (empty) for those without penalties."""
        return [self.row_of.get(r, 0) for r in reqs]

    def gather(self, rows: torch.Tensor, seen: bool, counts: bool):
        """([B, V] bool | None, [B, V] float32 | None) for device row indices `rows` [B]."""
        return (self.seen.index_select(0, rows) if seen else None,
                self.counts.index_select(0, rows) if counts else None)

    def update(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record one sampled token per row: device ops only, no host sync. The rows are distinct, so each
        (row, token) cell is written once and a plain gather + put counts exactly (no accumulating scatter)."""
        self.seen.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.bool))
        self.counts.index_put_((rows, tokens), self.counts[rows, tokens] + 1)

    def _grow(self) -> None:
        n = self.seen.shape[0]
        self.seen = torch.cat([self.seen, torch.zeros_like(self.seen)])
        self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
        self._free = list(range(2 * n - 1, n - 1, -1))
