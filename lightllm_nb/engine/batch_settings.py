"""One batch's sampling settings on the device (the sampler keeps them while the same requests
fill the same rows), and the pinned upload they and the sampler's other small tables use."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .sampler import RequestSampler


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        # From pageable memory torch's copy synchronizes the stream: the host would wait for the
        # forward pass to finish before it could queue the sampling kernels behind it.
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class BatchSettings:
    """One batch's sampling settings on the device, a row per request, uploaded when first needed.

    table [rows, 4]: temperature (1 for greedy rows), top-k, top-p, greedy, for the torch path.
    For the fused race (CUDA): temperatures [rows] (0 for greedy rows), keys [rows] (a seeded row's
    seed; otherwise a random key with the top bit set, which no seed has) and draws [rows] (the
    request's draws so far, counted on the device by the kernel from here on), in one upload; and
    whether each row truncates (the torch path's draw is kept for those).
    """

    def __init__(self, requests: list["RequestSampler"], vocab: int, device: torch.device, keys: random.Random):
        self.requests, self.vocab, self.device = requests, vocab, device
        self.seeded = [r for r in requests if r.params.seed is not None]
        # What the step's path depends on, decided once per batch rather than row by row each step.
        self.greedy = all(r.params.greedy for r in requests)
        self.truncates = any(r.truncates for r in requests)
        self._keys = keys
        self._table: torch.Tensor | None = None
        self._race: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._truncating: torch.Tensor | None = None

    @property
    def table(self) -> torch.Tensor:
        if self._table is None:
            vocab = self.vocab
            self._table = to_device(
                [[1.0 if p.greedy else p.temperature, min(p.top_k, vocab) if p.top_k else vocab, p.top_p,
                  float(p.greedy)] for p in (r.params for r in self.requests)], torch.float32, self.device)
        return self._table

    @property
    def race(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(temperatures, keys, draws) on the device."""
        if self._race is None:
            params = [r.params for r in self.requests]
            rows = len(params)
            # Each part starts on 16 bytes: the race kernel is compiled for aligned pointers only.
            part = -(-8 * rows // 16) * 16  # the bytes an int64 part takes, padded
            draws_at, temps_at = part, 2 * part
            host = torch.empty(temps_at + 4 * rows, dtype=torch.uint8, pin_memory=True)
            raw = host.numpy()
            raw[:8 * rows].view(np.int64)[:] = [
                p.seed if p.seed is not None else self._keys.getrandbits(63) - 2**63 for p in params]
            raw[draws_at:draws_at + 8 * rows].view(np.int64)[:] = [r.draws for r in self.requests]
            raw[temps_at:].view(np.float32)[:] = [0.0 if p.greedy else p.temperature for p in params]
            # One copy for the three, from pinned memory: it does not wait for the forward.
            region = host.to(self.device, non_blocking=True)
            self._race = (region[temps_at:].view(torch.float32), region[:8 * rows].view(torch.int64),
                          region[draws_at:draws_at + 8 * rows].view(torch.int64))
        return self._race

    @property
    def truncating(self) -> torch.Tensor:
        if self._truncating is None:
            self._truncating = to_device([r.truncates for r in self.requests], torch.bool, self.device)
        return self._truncating
