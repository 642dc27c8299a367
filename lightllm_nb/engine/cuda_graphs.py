"""Decode steps replayed as CUDA graphs: one launch instead of hundreds of small kernels.

A small model's decode step is a few hundred short kernels; launched one by one from Python the
GPU idles between them. Each batch-size bucket is captured once at start, reading its inputs
from one static buffer; a step writes its rows' inputs (padding the rest to a dummy row whose
cache slot nobody owns) into pinned host memory, copies them over in one transfer and replays the
bucket. Batches larger than the largest bucket, and steps with prefill, run eagerly.

The graph also does what each step used to launch from the host before the forward: it takes the
tokens the previous (overlapped) step sampled from the device where the host has only a
placeholder, points req_to_token at the new tokens' slots and narrows the indices to int32. Those
were a dozen small launches a step (~0.2 ms of host time on the H200 host), which is what an
overlapped step cannot hide once the host is the slower side (sampling, structured output).
"""

from __future__ import annotations

import bisect

import numpy as np
import torch
from tqdm.auto import tqdm

from ..kernels import decode_num_splits
from ..kv.kv_pool import KVPool
from ..models.llama import ForwardBatch, LlamaModel
from ..scheduling.request import PENDING_TOKEN, Request

DEFAULT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
FIELDS = 5  # per row: token id, position, cache slot, req_to_token row, context length


class InputStaging:
    """Pinned host buffers the steps' inputs are written to, two in turn: the copy from one may
    still be queued behind the GPU's work while the host writes the next step's into the other."""

    def __init__(self, numel: int):
        self._buffers = [torch.empty(numel, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._copied = [None, None]  # an event recorded behind each buffer's latest copy
        self._turn = 0

    def next(self) -> tuple[torch.Tensor, int]:
        """A free host buffer and its index (for `copied`)."""
        self._turn ^= 1
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()  # two steps ago: long done, normally
        return self._buffers[self._turn], self._turn

    def copied(self, index: int) -> None:
        event = self._copied[index] or torch.cuda.Event()
        event.record()
        self._copied[index] = event


class DecodeGraphs:
    def __init__(self, model: LlamaModel, pool: KVPool, max_batch: int, last_tokens: torch.Tensor,
                 progress: bool = True):
        self.model, self.pool = model, pool
        # Each row's newest sampled token (ModelRunner's), read in the graph for placeholders.
        self.last_tokens = last_tokens
        self.buckets = [b for b in DEFAULT_BUCKETS if b <= max_batch]
        if not self.buckets or self.buckets[-1] < max_batch:
            self.buckets.append(max_batch)
        top = self.buckets[-1]
        device = model.device
        # Bucket b reads its FIELDS x b inputs from the front of this buffer, field after field.
        self.inputs = torch.zeros(FIELDS * top, dtype=torch.int64, device=device)
        self._staging = InputStaging(FIELDS * top)
        # What a padding row holds: token 0 at position 0 in the dummy slot of the dummy row.
        self._padding = np.array([0, 0, pool.dummy_slot, pool.dummy_row, 1], dtype=np.int64)[:, None]
        self.q_starts = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.logits_index = torch.arange(top, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.mempool = torch.cuda.graph_pool_handle()
        self._capture(progress)

    def _fields(self, size: int) -> list[torch.Tensor]:
        return [self.inputs[i * size:(i + 1) * size] for i in range(FIELDS)]

    def _forward(self, size: int) -> torch.Tensor:
        """The captured work of bucket `size`: inputs resolved from the static buffer, then the forward."""
        ids, positions, slots, rows, kv_lens = self._fields(size)
        ids = torch.where(ids == PENDING_TOKEN, self.last_tokens[rows], ids)
        self.pool.map_positions(rows, positions, slots)
        # The split count is frozen into the graph; sized for the longest context the pool allows.
        splits = decode_num_splits(size, self.model.config.num_kv_heads, self.pool.max_context, self.model.device)
        batch = ForwardBatch(
            input_ids=ids, positions=positions, out_slots=slots, req_rows=rows.to(torch.int32),
            q_starts=self.q_starts[:size + 1], kv_lens=kv_lens.to(torch.int32),
            logits_index=self.logits_index[:size], num_decodes=size, max_q_len=1,
            max_kv_len=self.pool.max_context, decode_splits=splits)
        return self.model.forward(batch, self.pool.buffers)

    @torch.inference_mode()
    def _capture(self, progress: bool) -> None:
        # Largest first, so smaller graphs reuse the memory pool the largest one reserved.
        for size in tqdm(sorted(self.buckets, reverse=True), desc="capturing CUDA graphs", unit="graph",
                         disable=not progress, leave=False):
            # Buckets' fields overlap in the buffer: the warm-up must read this bucket's padding.
            for field, value in zip(self._fields(size), self._padding[:, 0].tolist()):
                field.fill_(value)
            self._forward(size)  # warm-up: compiles the Triton kernels outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def fits(self, items: list[tuple[Request, int]]) -> bool:
        """A decode-only step (one token per row) of at most the largest bucket's rows."""
        return len(items) <= self.buckets[-1] and all(n == 1 for _, n in items)

    def run(self, items: list[tuple[Request, int]]) -> tuple[torch.Tensor, list[Request], torch.Tensor]:
        """Launch a step that `fits`: (logits of the rows that sample, those requests, their
        req_to_token rows on the device), like ModelRunner.run."""
        size = len(items)
        bucket = self.buckets[bisect.bisect_left(self.buckets, size)]
        page = self.pool.page_size
        ids, positions, slots, rows, samplers, sampling_rows = [], [], [], [], [], []
        for i, (req, _) in enumerate(items):
            pos = req.num_computed
            ids.append(req.token_ids[pos])  # PENDING_TOKEN where the device has it: the graph looks it up
            positions.append(pos)
            slots.append(req.pages[pos // page] * page + pos % page)
            rows.append(req.row)
            if pos + 1 == len(req.token_ids):  # its newest token: sample after it
                samplers.append(req)
                sampling_rows.append(i)
        host, index = self._staging.next()
        fields = host[:FIELDS * bucket].numpy().reshape(FIELDS, bucket)
        fields[:4, :size] = (ids, positions, slots, rows)
        fields[4, :size] = fields[1, :size] + 1  # context length: through the new token
        fields[:, size:] = self._padding
        self.inputs[:FIELDS * bucket].copy_(host[:FIELDS * bucket], non_blocking=True)
        self._staging.copied(index)
        self.graphs[bucket].replay()
        logits = self.outputs[bucket][:size]
        device_rows = self.inputs[3 * bucket:3 * bucket + size]
        if len(samplers) < size:  # a one-token prefill chunk short of its prompt's end: no sample
            keep = torch.tensor(sampling_rows).pin_memory().to(logits.device, non_blocking=True)
            logits, device_rows = logits[keep], device_rows[keep]
        return logits, samplers, device_rows
