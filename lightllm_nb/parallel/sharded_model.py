"""Rank 0's model in a tensor-parallel engine: its own shard plus the worker processes, in lockstep.

The engine holds a `ShardedModel` where it would hold a `LlamaModel`, and takes its KV pool from
`kv_pool()` (a pool that remembers its prefix mappings for the workers): `forward(batch, kv)` first
sends the step to the workers, then runs rank 0's shard; the shards meet in the all-reduces and
the logits gather inside the forward. Everything else (device, dtype, config...) is rank 0's
shard's. A worker that dies makes every later forward raise a RuntimeError that names it, so the
engine fails the running requests instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
import weakref

import torch
import torch.distributed as dist

from ..models.config import ModelConfig
from ..models.kv_buffers import KVBuffers
from ..models.llama import ForwardBatch
from .comm import start_group, stop_group
from .shard import ShardPlan
from .step_messages import MirroredKVPool, send_pool, send_step, send_stop
from .worker import failed_key, load_shard, loaded_key, run_worker

log = logging.getLogger(__name__)

# Loading a large checkpoint from a cold disk takes minutes; a worker that crashed is seen at once.
STARTUP_TIMEOUT_SECONDS = 600.0
STOP_TIMEOUT_SECONDS = 10.0


def rank_device(device: torch.device, rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


class WorkerLostError(RuntimeError):
    """A tensor-parallel worker process ended: the engine cannot run steps any more."""


class ShardedModel:
    def __init__(self, model_source, tp: int, device: torch.device, dtype: torch.dtype, progress: bool = True,
                 checkpoint=None, startup_timeout: float = STARTUP_TIMEOUT_SECONDS, cpu_threads: int = 1):
        """`checkpoint`: `model_source` already opened on rank 0 (the workers open their own).
        `cpu_threads`: torch threads for each rank on the CPU, where the ranks share the machine."""
        if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + tp:
            raise ValueError(f"tp={tp} needs {tp} GPUs from {device} on, but {torch.cuda.device_count()} are "
                             "visible: lower tp or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
        if checkpoint is not None:  # a model that cannot be split says so before any process starts
            ShardPlan.make(ModelConfig.from_hf(checkpoint.config), 0, tp)
        self.tp = tp
        self.failure: str | None = None
        self._closing = False
        self._pool: MirroredKVPool | None = None
        self._pool_sent = False
        threads = cpu_threads if device.type == "cpu" else 1
        if device.type == "cpu" and torch.get_num_threads() > threads:
            torch.set_num_threads(threads)  # the ranks share the CPUs: more threads would wait on each other
        timeout = datetime.timedelta(seconds=startup_timeout)
        self._store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, timeout=timeout, wait_for_workers=False)
        context = multiprocessing.get_context("spawn")
        self.workers = [context.Process(target=run_worker, name=f"lightllm-nb tp rank {rank}", daemon=True,
                                        args=(rank, tp, self._store.port, model_source,
                                              str(rank_device(device, rank)), dtype, startup_timeout, threads))
                        for rank in range(1, tp)]
        for worker in self.workers:
            worker.start()
        # Collected without close(): kill the workers (they would wait for steps forever).
        self._stopper = weakref.finalize(self, _stop_workers, self.workers, 0.0)
        try:
            self._wait_for(lambda: start_group(self._store, 0, tp, device), startup_timeout, "joining the group")
            self.local = load_shard(checkpoint or model_source, 0, tp, device, dtype, progress)
            self._wait_until_loaded(startup_timeout)
        except BaseException:
            self.close()
            raise
        # The watcher holds the model only weakly, so an engine nobody references is still collected.
        threading.Thread(target=_watch_workers, args=(weakref.ref(self), self.workers),
                         name="lightllm-nb tp watcher", daemon=True).start()

    # ---- start-up ------------------------------------------------------------------------------
    def _worker_error(self) -> str | None:
        for rank, worker in enumerate(self.workers, start=1):
            if self._store.check([failed_key(rank)]):
                return f"tensor-parallel rank {rank} failed to start:\n{self._store.get(failed_key(rank)).decode()}"
            if not worker.is_alive():
                return f"tensor-parallel rank {rank} (pid {worker.pid}) exited with code {worker.exitcode} at start-up"
        return None

    def _wait_for(self, action, timeout: float, what: str) -> None:
        """Run `action` (which blocks until every rank takes part) while checking that the workers live."""
        errors: list[BaseException] = []
        thread = threading.Thread(target=lambda: _capture(action, errors), daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while thread.is_alive():
            thread.join(0.2)
            problem = self._worker_error()
            if problem is not None:
                raise RuntimeError(problem)
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel start-up: {what} took over {timeout:.0f} s; check the "
                                   "worker processes' output")
        if errors:
            raise errors[0]

    def _wait_until_loaded(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        keys = [loaded_key(rank) for rank in range(1, self.tp)]
        while not self._store.check(keys):
            problem = self._worker_error()
            if problem is not None:
                raise RuntimeError(problem)
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel workers did not load their shards within {timeout:.0f} s")
            time.sleep(0.1)

    # ---- running -------------------------------------------------------------------------------
    def _worker_lost(self, rank: int, worker) -> None:
        if self._closing:
            return
        self.failure = (f"tensor-parallel rank {rank} (pid {worker.pid}) exited with code {worker.exitcode}: "
                        "this engine cannot run steps any more; close it and start a new one")
        log.error(self.failure)
        if self.local.device.type == "cuda":  # NCCL would wait for the dead rank forever
            dist.distributed_c10d._abort_process_group()

    def kv_pool(self, **layout) -> MirroredKVPool:
        """Rank 0's KV pool (`KVPool`'s arguments): the workers build theirs from its layout and
        copy the prefix mappings it makes, so every rank's req_to_token stays the same."""
        self._pool = MirroredKVPool(**layout)
        return self._pool

    def forward(self, batch: ForwardBatch, kv: KVBuffers) -> torch.Tensor:
        if self.failure is not None:
            raise WorkerLostError(self.failure)
        try:
            if not self._pool_sent:
                send_pool(self.local.tp, self._pool.layout, self.device)
                self._pool_sent = True
            send_step(self.local.tp, batch, self._pool.take_maps(), self.device)
            return self.local.forward(batch, kv)
        except RuntimeError as err:
            # A collective broken by a dying peer: give the watcher a moment to say which one.
            for _ in range(20):
                if self.failure is not None:
                    raise WorkerLostError(self.failure) from err
                time.sleep(0.1)
            raise

    def __getattr__(self, name):
        # device, dtype, config (rank 0's shape), kernels, weight_bytes(): rank 0's shard answers.
        if name == "local":
            raise AttributeError(name)
        return getattr(self.local, name)

    def close(self) -> None:
        """Stop the workers (asking first, then killing) and leave the process group."""
        if self._closing:
            return
        self._closing = True
        if self.failure is None and "local" in vars(self):
            try:
                send_stop(self.local.tp, self.device)
            except RuntimeError:
                pass  # a broken group: the workers are killed below
        self._stopper.detach()
        _stop_workers(self.workers, STOP_TIMEOUT_SECONDS)
        stop_group()


def _capture(action, errors: list) -> None:
    try:
        action()
    except BaseException as err:
        errors.append(err)


def _watch_workers(model_ref, workers) -> None:
    sentinels = {worker.sentinel: (rank, worker) for rank, worker in enumerate(workers, start=1)}
    ready = multiprocessing.connection.wait(list(sentinels))
    rank, worker = sentinels[ready[0]]
    worker.join(1)
    model = model_ref()
    if model is not None:
        model._worker_lost(rank, worker)


def _stop_workers(workers, grace: float) -> None:
    for worker in workers:
        worker.join(grace)
        if worker.is_alive():
            worker.kill()
            worker.join()
