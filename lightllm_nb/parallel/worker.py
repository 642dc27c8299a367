"""A rank > 0 of a tensor-parallel engine: loads its shard, then runs every step rank 0 sends.

Started by `sharded_model` with the spawn method (a fresh interpreter: no CUDA state or threads
inherited from a notebook). It reports start-up success or its error through the rendezvous
store, so rank 0 can say what went wrong instead of waiting, and it exits when rank 0's process
goes away, so no orphan sits in a collective holding a GPU.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
import traceback

import torch
import torch.distributed as dist

# Rank 0 vanishing (killed) must end the worker even while it waits in a collective.
PARENT_POLL_SECONDS = 1.0


def loaded_key(rank: int) -> str:
    return f"lightllm-nb/loaded/{rank}"


def failed_key(rank: int) -> str:
    return f"lightllm-nb/failed/{rank}"


def load_shard(model_source, rank: int, tp: int, device: torch.device, dtype: torch.dtype, progress: bool):
    """This rank's LlamaModel with its ShardComm hook. `model_source`: a name or path, or a
    Checkpoint already opened."""
    from ..loading import Checkpoint, load_checkpoint
    from ..models.config import ModelConfig
    from ..models.kernel_set import kernels_for
    from ..models.weights import build_model
    from .comm import ShardComm
    from .shard import ShardPlan

    checkpoint = model_source if isinstance(model_source, Checkpoint) else load_checkpoint(model_source)
    config = ModelConfig.from_hf(checkpoint.config)
    plan = ShardPlan.make(config, rank, tp)
    model = build_model(plan.local_config(config), checkpoint, device=device, dtype=dtype,
                        kernels=kernels_for(device), max_positions=config.max_position_embeddings,
                        progress=progress, shard=plan.slice)
    model.tp = ShardComm(plan)
    return model


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def run_worker(rank: int, tp: int, port: int, model_source, device: str, dtype: torch.dtype,
               startup_timeout: float, threads: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    from .comm import start_group, stop_group

    torch.set_num_threads(threads)
    device = torch.device(device)
    store = dist.TCPStore("127.0.0.1", port, tp, is_master=False,
                          timeout=datetime.timedelta(seconds=startup_timeout))
    try:
        start_group(store, rank, tp, device)
        model = load_shard(model_source, rank, tp, device, dtype, progress=False)
    except BaseException:
        store.set(failed_key(rank), traceback.format_exc())
        raise
    store.set(loaded_key(rank), "ok")
    try:
        _serve_steps(model, device)
    finally:
        stop_group()


def _serve_steps(model, device: torch.device) -> None:
    from ..kv.kv_pool import KVPool
    from .step_messages import OP_POOL, OP_STOP, apply_slot_mappings, receive

    pool = None
    while True:
        message = receive(model.tp, device)
        if message.op == OP_STOP:
            return
        if message.op == OP_POOL:
            cfg = model.config
            pool = KVPool(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                          dtype=model.dtype, device=device, **message.pool_layout)
            continue
        apply_slot_mappings(pool, message)
        model.forward(message.batch, pool.buffers)
