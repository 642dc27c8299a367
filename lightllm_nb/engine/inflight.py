"""A step's sampled tokens on their way from the GPU to the host, for overlapped steps, and a
constrained step's sampling that waits for its mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scheduling.request import Request


class InflightTokens:
    """Tokens sampled on the device for `requests`, copied back to the host without blocking.
    Without `tokens` the placeholders exist before the sampling is queued; `attach` gives them."""

    def __init__(self, requests: list[Request], tokens: torch.Tensor | None = None):
        self.requests = requests
        # Each request's newest token becomes a placeholder now, so the scheduler already sees
        # one more uncomputed token and the next step can run before the value arrives.
        self.indices = [req.add_pending_token() for req in requests]
        self._host = self._ready = None
        if tokens is not None:
            self.attach(tokens)

    def attach(self, tokens: torch.Tensor) -> None:
        if tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tokens

    def tokens(self) -> list[int]:
        if self._host is None:
            raise RuntimeError("these tokens were never sampled: the engine lost a deferred sampling")
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


@dataclass
class DeferredSampling:
    """A constrained overlapped step's sampling, queued only when the next step's inputs are about
    to be (engine.py): its mask (`pending`, a grammar.PendingMask, None when no row needs one) is
    filled on the mask threads meanwhile."""

    logits: torch.Tensor
    samplers: list
    pending: object | None
    sample_rows: torch.Tensor
    inflight: InflightTokens
