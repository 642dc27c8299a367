"""A step's sampled tokens on their way from the GPU to the host, for overlapped steps."""

from __future__ import annotations

import torch

from ..scheduling.request import Request


class InflightTokens:
    """Tokens sampled on the device for `requests`, copied back to the host without blocking."""

    def __init__(self, requests: list[Request], tokens):
        self.requests = requests
        # Each request's newest token becomes a placeholder now, so the scheduler already sees
        # one more uncomputed token and the next step can run before the value arrives.
        self.indices = [req.add_pending_token() for req in requests]
        if tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = tokens, None

    def tokens(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()
