"""What rank 0 tells the other ranks each step: a fixed header, then one packed int64 tensor.

The header (op and sizes) comes first because a rank must know how long the body is before it
can receive it. A step's body is the ForwardBatch's index tensors (token ids after rank 0 filled
in tokens still on the device) plus the prefix-cache mappings rank 0 made since the last step,
so every rank's `req_to_token` stays the same as rank 0's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..kv.kv_pool import KVPool
from ..models.llama import ForwardBatch
from .comm import ShardComm

OP_STEP, OP_POOL, OP_STOP = 1, 2, 3
HEADER_LEN = 8


class MirroredKVPool(KVPool):
    """Rank 0's pool: remembers the prefix mappings the scheduler makes, for the next step message.
    (Positions a step computes are sent with the step itself.)"""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.layout = {k: kwargs[k] for k in ("num_tokens", "page_size", "max_requests", "max_context")}
        self.pending_maps: list[np.ndarray] = []  # [3, n] rows, positions, slots

    def map_prefix(self, row: int, pages: list[int], length: int) -> None:
        super().map_prefix(row, pages, length)
        self.pending_maps.append(np.stack([np.full(length, row, dtype=np.int64), np.arange(length, dtype=np.int64),
                                           self.slots(pages, 0, length)]))

    def take_maps(self) -> np.ndarray:
        maps = np.concatenate(self.pending_maps, axis=1) if self.pending_maps else np.zeros((3, 0), np.int64)
        self.pending_maps = []
        return maps


@dataclass
class StepMessage:
    op: int
    batch: ForwardBatch | None = None
    maps: torch.Tensor | None = None   # [3, n] rows, positions, slots of prefix mappings
    pool_layout: dict | None = None


def _send_header(comm: ShardComm, values: list[int], device: torch.device) -> None:
    header = torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64)
    comm.broadcast(header.to(device))


def send_pool(comm: ShardComm, layout: dict, device: torch.device) -> None:
    _send_header(comm, [OP_POOL, layout["num_tokens"], layout["page_size"], layout["max_requests"],
                        layout["max_context"]], device)


def send_stop(comm: ShardComm, device: torch.device) -> None:
    _send_header(comm, [OP_STOP], device)


def send_step(comm: ShardComm, batch: ForwardBatch, maps: np.ndarray, device: torch.device) -> None:
    t, b, n, m = batch.input_ids.shape[0], batch.req_rows.shape[0], batch.logits_index.shape[0], maps.shape[1]
    _send_header(comm, [OP_STEP, t, b, n, m, batch.num_decodes, batch.max_q_len, batch.max_kv_len], device)
    body = torch.cat([batch.input_ids, batch.positions, batch.out_slots, batch.req_rows.long(),
                      batch.q_starts.long(), batch.kv_lens.long(), batch.logits_index,
                      torch.from_numpy(maps.reshape(-1)).to(device)])
    comm.broadcast(body)


def receive(comm: ShardComm, device: torch.device) -> StepMessage:
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    comm.broadcast(header)
    op, *h = header.tolist()
    if op == OP_STOP:
        return StepMessage(op)
    if op == OP_POOL:
        return StepMessage(op, pool_layout=dict(num_tokens=h[0], page_size=h[1], max_requests=h[2], max_context=h[3]))
    t, b, n, m, num_decodes, max_q_len, max_kv_len = h
    body = torch.empty(3 * t + 3 * b + 1 + n + 3 * m, dtype=torch.int64, device=device)
    comm.broadcast(body)
    ids, pos, slots, rows, q_starts, kv_lens, logits_index, maps = body.split([t, t, t, b, b + 1, b, n, 3 * m])
    batch = ForwardBatch(input_ids=ids, positions=pos, out_slots=slots, req_rows=rows.to(torch.int32),
                         q_starts=q_starts.to(torch.int32), kv_lens=kv_lens.to(torch.int32),
                         logits_index=logits_index, num_decodes=num_decodes, max_q_len=max_q_len,
                         max_kv_len=max_kv_len)
    return StepMessage(op, batch=batch, maps=maps.view(3, m))


def apply_slot_mappings(pool: KVPool, message: StepMessage) -> None:
    """What rank 0's scheduler and runner wrote into its req_to_token, written into this rank's."""
    batch = message.batch
    rows, positions, slots = message.maps
    pool.map_positions(rows, positions, slots)
    row_per_token = batch.req_rows.long().repeat_interleave((batch.q_starts[1:] - batch.q_starts[:-1]).long())
    pool.map_positions(row_per_token, batch.positions, batch.out_slots)
