"""Decode steps replayed as CUDA graphs: one launch instead of hundreds of small kernels.

A small model's decode step is a few hundred short kernels; launched one by one from Python the
GPU idles between them. Each batch-size bucket is captured once at start, reading its inputs
from static buffers; a step copies its real inputs in (padding the rest to a dummy row whose
cache slot nobody owns) and replays the bucket. Batches larger than the largest bucket, and
steps with prefill, run eagerly.
"""

from __future__ import annotations

import bisect

import torch
from tqdm.auto import tqdm

from ..kernels import decode_num_splits
from ..kv.kv_pool import KVPool
from ..models.llama import ForwardBatch, LlamaModel

DEFAULT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, pool: KVPool, max_batch: int, progress: bool = True):
        self.model, self.pool = model, pool
        self.buckets = [b for b in DEFAULT_BUCKETS if b <= max_batch]
        if not self.buckets or self.buckets[-1] < max_batch:
            self.buckets.append(max_batch)
        top = self.buckets[-1]
        device = model.device
        # Static inputs: every graph reads slices of these.
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.out_slots = torch.full((top,), pool.dummy_slot, dtype=torch.int64, device=device)
        self.req_rows = torch.full((top,), pool.dummy_row, dtype=torch.int32, device=device)
        self.kv_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.q_starts = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.logits_index = torch.arange(top, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.mempool = torch.cuda.graph_pool_handle()
        self._capture(progress)

    def _static_batch(self, size: int) -> ForwardBatch:
        # The split count is frozen into the graph; sized for the longest context the pool allows.
        splits = decode_num_splits(size, self.model.config.num_kv_heads, self.pool.max_context, self.model.device)
        return ForwardBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size], out_slots=self.out_slots[:size],
            req_rows=self.req_rows[:size], q_starts=self.q_starts[:size + 1], kv_lens=self.kv_lens[:size],
            logits_index=self.logits_index[:size], num_decodes=size, max_q_len=1,
            max_kv_len=self.pool.max_context, decode_splits=splits)

    @torch.inference_mode()
    def _capture(self, progress: bool) -> None:
        # Largest first, so smaller graphs reuse the memory pool the largest one reserved.
        for size in tqdm(sorted(self.buckets, reverse=True), desc="capturing CUDA graphs", unit="graph",
                         disable=not progress, leave=False):
            batch = self._static_batch(size)
            self.model.forward(batch, self.pool.buffers)  # warm-up: compiles the Triton kernels outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                self.outputs[size] = self.model.forward(batch, self.pool.buffers)
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def fits(self, batch: ForwardBatch) -> bool:
        size = batch.req_rows.shape[0]
        return batch.num_decodes == size and size <= self.buckets[-1]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] of a decode-only batch that `fits`."""
        size = batch.req_rows.shape[0]
        bucket = self.buckets[bisect.bisect_left(self.buckets, size)]
        self.input_ids[:size].copy_(batch.input_ids)
        self.positions[:size].copy_(batch.positions)
        self.out_slots[:size].copy_(batch.out_slots)
        self.req_rows[:size].copy_(batch.req_rows)
        self.kv_lens[:size].copy_(batch.kv_lens)
        if size < bucket:  # padding rows attend to the dummy slot only
            self.input_ids[size:bucket].zero_()
            self.positions[size:bucket].zero_()
            self.out_slots[size:bucket].fill_(self.pool.dummy_slot)
            self.req_rows[size:bucket].fill_(self.pool.dummy_row)
            self.kv_lens[size:bucket].fill_(1)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:size]
