"""Host<->device transfers of a step: staged uploads in one persistent buffer, and one read-back.

A step's inputs (token ids, positions, lengths, new block-table entries, sampling parameters, grammar
masks) are written into a persistent host arena and reach the device with one asynchronous copy per
`flush`, into a persistent device arena of which they are views. On a GPU the host arena is pinned, so the
copy is truly asynchronous and the host goes on preparing while the device works; nothing here waits for
the device except `reset` (below) and `ReadBack.fetch`, the step's one device->host copy.

What must hold: a host region may be rewritten only after the copy reading it has finished. `reset`, called
once at the start of every step, waits for the last flush's copy (an event recorded after it). That wait is
almost always free: a step that samples already waited for its results, and stream order puts the previous
step's copies before its forward pass.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 64     # bytes: every staged tensor starts aligned, so typed views of the byte arena are legal


def _pinned(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


class StagingArena:
    def __init__(self, device: torch.device, nbytes: int = 1 << 20):
        self.device = device
        self._host = _pinned(nbytes, device)
        self._dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._used = self._flushed = 0
        self._retired: list[tuple[torch.Tensor, torch.Tensor]] = []    # outgrown arenas still in use this step
        self._event = torch.cuda.Event() if device.type == "cuda" else None

    @property
    def capacity(self) -> int:
        return self._host.numel()

    def reset(self) -> None:
        """Start a new step: wait until the last step's uploads have been read, then reuse the arena."""
        if self._event is not None:
            self._event.synchronize()
        self._retired.clear()
        self._used = self._flushed = 0

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(host view to fill, device view valid after the next flush) of a fresh contiguous region."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        start = -(-self._used // _ALIGN) * _ALIGN
        if start + nbytes > self.capacity:
            self._grow(nbytes)
            start = 0
        self._used = start + nbytes
        host = self._host[start:start + nbytes].view(dtype).view(shape)
        dev = self._dev[start:start + nbytes].view(dtype).view(shape)
        return host, dev

    def put(self, values, dtype: torch.dtype) -> torch.Tensor:
        """Stage `values` (array-like); returns its device tensor, readable after the next flush."""
        values = np.asarray(values)
        host, dev = self.alloc(values.shape, dtype)
        if values.size:
            host.numpy()[...] = values
        return dev

    def flush(self) -> None:
        """One host->device copy of everything staged since the last flush."""
        lo, hi = self._flushed, self._used
        if hi > lo:
            self._dev[lo:hi].copy_(self._host[lo:hi], non_blocking=True)
            if self._event is not None:
                self._event.record()
        self._flushed = hi

    def _grow(self, nbytes: int) -> None:
        # rare (a long prefix-cache hit, a large grammar batch): regions handed out this step keep their old
        # buffers, which are copied now and released at the next reset
        self.flush()
        self._retired.append((self._host, self._dev))
        size = max(2 * self.capacity, nbytes + _ALIGN)
        self._host = _pinned(size, self.device)
        self._dev = torch.empty(size, dtype=torch.uint8, device=self.device)
        self._used = self._flushed = 0


class ReadBack:
    """The step's one device->host copy: a float64 [rows, cols] tensor into a persistent (pinned) buffer."""

    def __init__(self, device: torch.device, numel: int = 1 << 12):
        self.device = device
        self._host = torch.empty(numel, dtype=torch.float64, pin_memory=device.type == "cuda")
        self._event = torch.cuda.Event() if device.type == "cuda" else None

    def fetch(self, values: torch.Tensor) -> np.ndarray:
        """Copy `values` to the host and wait for it (the step's one sync point). The array is valid until the
        next fetch."""
        n = values.numel()
        if n > self._host.numel():
            self._host = torch.empty(max(n, 2 * self._host.numel()), dtype=torch.float64,
                                     pin_memory=self.device.type == "cuda")
        host = self._host[:n].view(values.shape)
        host.copy_(values, non_blocking=True)
        if self._event is not None:
            self._event.record()
            self._event.synchronize()
        return host.numpy()
