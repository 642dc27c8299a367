"""Tensor parallelism: one model spread over N processes (one per GPU; gloo on the CPU for tests).

`shard` says which slice of each weight a rank keeps, `comm` holds the collectives a shard's
forward pass needs, `step_messages` carries rank 0's batch to the others, `worker` is a rank > 0
process, and `sharded_model` is what the engine on rank 0 holds in place of a plain model.
"""
