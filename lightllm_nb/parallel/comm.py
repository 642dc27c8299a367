"""The process group of a tensor-parallel engine and the collectives a model shard's forward needs.

gloo on the CPU (tests, CI), NCCL on GPUs. The group's timeout is long because a worker waits in
a broadcast for rank 0's next step for as long as the engine sits idle; start-up is bounded
separately (the store's timeout and `sharded_model` watching the workers), and a worker that dies
at run time is noticed by rank 0's watcher, not by a collective timing out.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .shard import ShardPlan

# An idle engine sends no steps; its workers must not give up waiting for the next one.
RUN_TIMEOUT = datetime.timedelta(days=365)


def start_group(store: dist.Store, rank: int, tp: int, device: torch.device) -> None:
    """Join this process to the engine's group (the default one: one tensor-parallel engine per process)."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group (another Engine(tp>1) "
                           "or your own code): close that engine, or run this one in a fresh process")
    if device.type == "cuda":
        # NVLink multicast (NVLS) hangs on the lent GPU machines; ring/tree all-reduce is what we want anyway.
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=tp, timeout=RUN_TIMEOUT)


def stop_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ShardComm:
    """The model's hook (`LlamaModel.tp`, None at tp=1): sums partial results and joins vocabulary shards."""

    def __init__(self, plan: ShardPlan):
        self.plan = plan
        self.rank = plan.rank

    def all_reduce(self, partial: torch.Tensor) -> None:
        """In place: the row-parallel o and down projections' partial sums become the full output."""
        dist.all_reduce(partial)

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Embedding over a vocabulary shard: rows of other ranks' ids are zero here, then summed."""
        local = ids - self.plan.vocab_start
        outside = (local < 0) | (local >= self.plan.vocab_rows)
        hidden = F.embedding(local.masked_fill(outside, 0), weight)
        hidden.masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(hidden)
        return hidden

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Rank 0 gets the full [N, vocab] logits; the other ranks get their own shard back (unused)."""
        parts = [torch.empty_like(logits) for _ in range(self.plan.tp)] if self.rank == 0 else None
        dist.gather(logits.contiguous(), parts, dst=0)
        if self.rank != 0:
            return logits
        return torch.cat(parts, dim=-1)[:, :self.plan.vocab_size]

    def broadcast(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=0)
