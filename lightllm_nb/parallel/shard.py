"""Which slice of each checkpoint tensor a tensor-parallel rank keeps (Megatron-style).

q/k/v and gate/up are split by output rows (column-parallel), o and down by input columns
(row-parallel, summed by an all-reduce afterwards), so attention heads and MLP columns stay whole
on one rank. KV heads are split like the q heads they serve; with fewer KV heads than ranks each
rank keeps a copy of the one KV head its q heads use. The embedding and the LM head are split over
the vocabulary, padded to equal parts so the gathered logits line up. Norms are replicated.

Slicing happens on the tensor as read from the checkpoint, before it moves to the device, and the
slice is copied out so the full tensor is freed: no rank ever holds a whole sharded weight.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ..models.config import ModelConfig

_LAYER_PART = re.compile(r"model\.layers\.\d+\.(.+)")
_Q_PARTS = {"self_attn.q_proj.weight", "self_attn.q_proj.bias"}
_KV_PARTS = {"self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias"}
_MLP_IN_PARTS = {"mlp.gate_proj.weight", "mlp.up_proj.weight"}
_VOCAB_TENSORS = {"model.embed_tokens.weight", "lm_head.weight"}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    rank: int
    tp: int
    head_dim: int
    q_heads: int          # q heads on each rank
    kv_heads: int         # KV heads on each rank
    first_kv_head: int    # this rank's first KV head in the checkpoint
    intermediate: int     # MLP columns on each rank
    vocab_rows: int       # vocabulary rows on each rank (the last rank's are padded with zeros)
    vocab_size: int

    @classmethod
    def make(cls, config: ModelConfig, rank: int, tp: int) -> "ShardPlan":
        """The plan for `rank` of `tp`; ValueError, saying which tp values work, if the model cannot be split."""
        heads, kv, inter = config.num_q_heads, config.num_kv_heads, config.intermediate_size
        fits = [d for d in _divisors(heads)
                if inter % d == 0 and (kv % d == 0 if kv >= d else d % kv == 0)]
        if heads % tp or inter % tp or (kv % tp if kv >= tp else tp % kv):
            raise ValueError(
                f"tp={tp} cannot split this model evenly ({heads} attention heads, {kv} KV heads, "
                f"{inter} MLP columns): use tp in {fits}")
        if kv >= tp:
            kv_heads, first_kv = kv // tp, rank * (kv // tp)
        else:  # several ranks share (a copy of) one KV head
            kv_heads, first_kv = 1, rank // (tp // kv)
        return cls(rank=rank, tp=tp, head_dim=config.head_dim, q_heads=heads // tp, kv_heads=kv_heads,
                   first_kv_head=first_kv, intermediate=inter // tp,
                   vocab_rows=-(-config.vocab_size // tp), vocab_size=config.vocab_size)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shape this rank's decoder sees: its heads and MLP columns (the vocabulary stays whole)."""
        return dataclasses.replace(config, num_q_heads=self.q_heads, num_kv_heads=self.kv_heads,
                                   intermediate_size=self.intermediate)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_rows

    def slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the checkpoint tensor `name` (a fresh copy: the full one can be freed)."""
        if name in _VOCAB_TENSORS:
            part = tensor[self.vocab_start:self.vocab_start + self.vocab_rows]
            if part.shape[0] < self.vocab_rows:  # the last rank's padding: rows no token id reaches
                pad = tensor.new_zeros((self.vocab_rows - part.shape[0],) + tuple(tensor.shape[1:]))
                part = torch.cat([part, pad])
            return part.clone()
        match = _LAYER_PART.fullmatch(name)
        part_name = match.group(1) if match else None
        d = self.head_dim
        if part_name in _Q_PARTS:
            return tensor[self.rank * self.q_heads * d:(self.rank + 1) * self.q_heads * d].clone()
        if part_name in _KV_PARTS:
            return tensor[self.first_kv_head * d:(self.first_kv_head + self.kv_heads) * d].clone()
        if part_name == "self_attn.o_proj.weight":
            return tensor[:, self.rank * self.q_heads * d:(self.rank + 1) * self.q_heads * d].clone()
        if part_name in _MLP_IN_PARTS:
            return tensor[self.rank * self.intermediate:(self.rank + 1) * self.intermediate].clone()
        if part_name == "mlp.down_proj.weight":
            return tensor[:, self.rank * self.intermediate:(self.rank + 1) * self.intermediate].clone()
        return tensor  # norms: every rank needs all of them
