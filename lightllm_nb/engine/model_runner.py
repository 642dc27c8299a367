"""Turns a scheduled batch into the model's flat input tensors, runs the model, returns logits."""

from __future__ import annotations

import numpy as np
import torch

from ..kv.kv_pool import KVPool
from ..models.llama import ForwardBatch, LlamaModel
from ..scheduling.request import Request, fill_pending, has_pending


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool, *, cuda_graphs: bool = False, max_batch: int = 1,
                 progress: bool = True):
        self.model = model
        self.pool = pool
        self.device = model.device
        # Each row's newest sampled token, kept on the device so an overlapped next step can
        # read it before the host has seen it.
        self.last_tokens = torch.zeros(pool.max_requests + 1, dtype=torch.int64, device=self.device)
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, pool, max_batch, self.last_tokens, progress)

    def prepare(self, items: list[tuple[Request, int]]) -> tuple[ForwardBatch, list[Request], torch.Tensor]:
        """Flat tensors for a step run eagerly (prefill, or more rows than the CUDA graphs hold), the
        requests that sample a token after it (in logits order) and their rows of req_to_token (on
        the device).

        Also maps each new token's position to its slot in req_to_token, on the device, in one
        scatter: the kernels only ever look slots up there.
        """
        pool, page = self.pool, self.pool.page_size
        ids, positions, slots, rows, q_starts, kv_lens, logits_index, samplers = [], [], [], [], [0], [], [], []
        chunks = []  # (positions, slots) arrays of multi-token rows
        num_decodes = 0
        for req, n in items:
            start, end = req.num_computed, req.num_computed + n
            if n == 1:
                # Plain Python for the common one-token row: numpy's per-call cost would dominate
                # a large decode batch (measured: 4.5 ms of host time at batch 128 on an H200).
                ids.append(req.token_ids[start])
                positions.append(start)
                slots.append(req.pages[start // page] * page + start % page)
                num_decodes += 1
            else:
                ids.extend(req.token_ids[start:end])
                chunks.append((np.arange(start, end, dtype=np.int64), pool.slots(req.pages, start, end)))
            rows.append(req.row)
            kv_lens.append(end)
            q_starts.append(q_starts[-1] + n)
            if end == len(req.token_ids):  # the chunk reaches the newest token: sample after it
                logits_index.append(q_starts[-1] - 1)
                samplers.append(req)
        # Decodes come first in `items`, so their scalars precede the chunks' arrays.
        positions_np = np.concatenate([np.asarray(positions, dtype=np.int64)] + [c[0] for c in chunks])
        slots_np = np.concatenate([np.asarray(slots, dtype=np.int64)] + [c[1] for c in chunks])
        row_per_token = np.repeat(np.asarray(rows, dtype=np.int64), np.diff(q_starts))
        # One host->device copy for everything, then views.
        packed = torch.from_numpy(np.concatenate([
            np.asarray(ids, dtype=np.int64), positions_np, slots_np, row_per_token,
            np.asarray(rows, dtype=np.int64), np.asarray(q_starts, dtype=np.int64),
            np.asarray(kv_lens, dtype=np.int64), np.asarray(logits_index, dtype=np.int64),
            np.asarray([r.row for r in samplers], dtype=np.int64)]))
        packed = packed.to(self.device, non_blocking=True)
        t, b, s = len(ids), len(rows), len(samplers)
        offsets = np.cumsum([0, t, t, t, t, b, b + 1, b, s, s])
        ids_t, pos_t, slot_t, row_tok_t, rows_t, qs_t, kv_t, li_t, sample_rows_t = (
            packed[offsets[i]:offsets[i + 1]] for i in range(9))
        if has_pending(ids):  # tokens the previous (overlapped) step sampled are only on the device
            ids_t = fill_pending(ids_t, self.last_tokens[row_tok_t])
        pool.map_positions(row_tok_t, pos_t, slot_t)
        batch = ForwardBatch(
            input_ids=ids_t, positions=pos_t, out_slots=slot_t, req_rows=rows_t.to(torch.int32),
            q_starts=qs_t.to(torch.int32), kv_lens=kv_t.to(torch.int32), logits_index=li_t,
            num_decodes=num_decodes, max_q_len=max(n for _, n in items), max_kv_len=max(kv_lens))
        return batch, samplers, sample_rows_t

    def run(self, items: list[tuple[Request, int]]) -> tuple[torch.Tensor, list[Request], torch.Tensor]:
        """Launch the step; returns logits (still being computed), the sampling requests and their rows."""
        if self.graphs is not None and self.graphs.fits(items):
            return self.graphs.run(items)
        batch, samplers, sample_rows = self.prepare(items)
        return self.model.forward(batch, self.pool.buffers), samplers, sample_rows

    def remember_tokens(self, sample_rows: torch.Tensor, tokens: torch.Tensor) -> None:
        self.last_tokens[sample_rows] = tokens
