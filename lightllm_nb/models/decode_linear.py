"""Which kernel runs each projection at decode batch size 1: cuBLAS or the Triton GEMV.

Chosen once at start by timing both on this card, per weight shape, with every layer's weight of
that shape in turn (as a decode step reads them: from memory, not from L2) and the launches
captured in a CUDA graph (as the engine replays them: no Python launch cost in the numbers).
The GEMV is used only where it is measurably faster, so no shape gets slower than cuBLAS. The
down projection is also timed with the SiLU-mul folded into the GEMV's read of its input (one
launch where there were two) against SiLU-mul followed by whichever projection won above. Where a
one-row projection runs as a GEMV and an add_rmsnorm follows it (o, down), the GEMV's last column
block does that add_rmsnorm too: one launch fewer, the same bits.

Measured on an H200 (Llama-3.2-1B shape, 16 layers per shape): qkv 105 -> 94 us, o 100 -> 80 us
with the GEMV; gate_up, down and the vocabulary head tied with or beat it, and at 4 rows cuBLAS won
every shape, so only one row is tried and only the configurations that ever won. The GEMVs launch
with programmatic dependent launch (kernels/dependent_launch.py), which is timed here as it runs:
with it the narrower 2 x 1024 tiling won o (66 against 75 us for 4 x 1024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels as triton_kernels
from ..kernels import gemv, norm_warps
from .packed_linear import packed_linear

# (block_n, block_k, num_warps) tried for each shape; split_k comes from the shape (below).
GEMV_CONFIGS = ((4, 1024, 4), (2, 1024, 4), (8, 512, 4))
# Split K until about this many programs per SM run, so a short N (2048 outputs) still fills the card.
PROGRAMS_PER_SM = 4
# The GEMV must beat cuBLAS by this much to be chosen: smaller differences are timing noise.
MIN_GAIN = 0.03


def _split_k(n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    programs = -(-n // block_n)
    wanted = -(-PROGRAMS_PER_SM * sms // programs)
    return max(1, min(wanted, k // (2 * block_k)))


def _graph_time(fn, repeats: int = 5) -> float:
    """Median GPU seconds of fn() replayed from a CUDA graph."""
    fn()  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


class DecodeLinear:
    """F.linear (on weights packed for the CPU, oneDNN's), except for one-row inputs of the weight shapes where a GEMV configuration measured
    faster; and the MLP's down projection of silu(gate) * up, in one fused GEMV where that measured
    faster than SiLU-mul followed by the projection."""

    def __init__(self, choices: dict[tuple[int, int], dict] | None = None,
                 swiglu_choices: dict[tuple[int, int], dict] | None = None,
                 split_counters: torch.Tensor | None = None):
        self.choices = choices or {}                # (N, K) -> gemv keyword arguments
        self.swiglu_choices = swiglu_choices or {}  # (N, K) -> gemv keyword arguments, swiglu input
        # Zeros that every split-K GEMV leaves zero: allocated once, so no launch zeroes them per call.
        self.split_counters = split_counters
        self.timings: list[dict] = []  # what was measured, for benchmarks

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if weight.is_mkldnn:  # packed for the CPU at load (packed_linear.py)
            return packed_linear(x, weight, bias)
        if x.shape[0] == 1:
            config = self.choices.get(tuple(weight.shape))
            if config is not None:
                return gemv(x, weight, bias, split_counters=self.split_counters, **config)
        return F.linear(x, weight, bias)

    def swiglu(self, gate_up: torch.Tensor, weight: torch.Tensor, silu_mul) -> torch.Tensor:
        """weight applied to silu(gate) * up of the fused gate_up rows (silu_mul: the kernel set's)."""
        if gate_up.shape[0] == 1:
            config = self.swiglu_choices.get(tuple(weight.shape))
            if config is not None:
                return gemv(gate_up, weight, swiglu=True, split_counters=self.split_counters, **config)
        return self(silu_mul(gate_up), weight)

    def then_add_rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                         norm_weight: torch.Tensor, eps: float, kernels, swiglu: bool = False):
        """kernels.add_rmsnorm(projection of x, residual, norm_weight, eps), the projection as
        __call__ (or swiglu) runs it; in the projection's own launch where that is a GEMV whose
        warps match the norm's, so the fused result has the same bits as the pair."""
        config = (self.swiglu_choices if swiglu else self.choices).get(tuple(weight.shape)) if x.shape[0] == 1 else None
        if config is not None and config["num_warps"] == norm_warps(weight.shape[0]):
            return gemv(x, weight, swiglu=swiglu, add_rmsnorm=(residual, norm_weight, eps),
                        split_counters=self.split_counters, **config)
        projected = self.swiglu(x, weight, kernels.silu_mul) if swiglu else self(x, weight)
        return kernels.add_rmsnorm(projected, residual, norm_weight, eps)

    @classmethod
    def measured(cls, weights: list[tuple[torch.Tensor, torch.Tensor | None]],
                 swiglu_weights: list[torch.Tensor] = ()) -> "DecodeLinear":
        """Time cuBLAS and each GEMV configuration at one row on these (weight, bias) pairs, grouped
        by shape; then, for the swiglu_weights (down projections, followed by add_rmsnorm), the
        projection chosen so far after the SiLU-mul kernel against the GEMV that folds it in."""
        device = weights[0][0].device
        widest = max(w.shape[0] for w, _ in weights)
        # A counter per column block of the widest projection, and one for a fused add_rmsnorm.
        counters = torch.zeros(-(-widest // min(c[0] for c in GEMV_CONFIGS)) + 1, dtype=torch.int32, device=device)
        chooser = cls(split_counters=counters)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        for (n, k), group in _by_shape(weights).items():
            x = torch.randn(1, k, device=device).to(group[0][0].dtype)
            chooser._choose(chooser.choices, n, k, group, sms, lambda: [F.linear(x, w, b) for w, b in group],
                            lambda config: [gemv(x, w, b, split_counters=counters, **config) for w, b in group])
        for (n, k), group in _by_shape([(w, None) for w in swiglu_weights]).items():
            # As the model runs them: SiLU-mul, down and the add_rmsnorm after it, each path as
            # fused as its configuration allows.
            gate_up = torch.randn(1, 2 * k, device=device).to(group[0][0].dtype)
            residual = torch.zeros(1, n, device=device, dtype=gate_up.dtype)
            norm_weight = torch.ones(n, device=device, dtype=gate_up.dtype)

            def down(linear):
                return [linear.then_add_rmsnorm(gate_up, w, residual, norm_weight, 1e-5, triton_kernels, swiglu=True)
                        for w, _ in group]

            chooser._choose(chooser.swiglu_choices, n, k, group, sms, lambda: down(chooser),
                            lambda config: down(cls(chooser.choices, {(n, k): config}, counters)))
        return chooser

    def _choose(self, choices: dict, n: int, k: int, group: list, sms: int, baseline, fused) -> None:
        """Record in `choices` the GEMV configuration that beats `baseline` by MIN_GAIN, if any."""
        base = _graph_time(baseline)
        best, best_time = None, base
        # Split K as the shape wants, and not at all: fewer, longer programs may beat a fuller card.
        # pdl: each GEMV is launched while the kernel before it finishes, and waits for its input
        # (kernels/dependent_launch.py; a no-op before Hopper).
        configs = [dict(block_n=block_n, block_k=block_k, num_warps=warps, split_k=split_k, pdl=True)
                   for block_n, block_k, warps in GEMV_CONFIGS
                   for split_k in sorted({_split_k(n, k, block_n, block_k, sms), 1})]
        for config in configs:
            t = _graph_time(lambda: fused(config))
            if t < best_time:
                best, best_time = config, t
        if best is not None and best_time < base * (1 - MIN_GAIN):
            choices[(n, k)] = best
        self.timings.append({"n": n, "k": k, "layers": len(group), "swiglu": choices is self.swiglu_choices,
                             "cublas_us": base * 1e6, "gemv_us": best_time * 1e6,
                             "gemv": best if best_time < base else None})


def _by_shape(weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[tuple[int, int], list]:
    by_shape: dict[tuple[int, int], list] = {}
    for weight, bias in weights:
        by_shape.setdefault(tuple(weight.shape), []).append((weight, bias))
    return by_shape
