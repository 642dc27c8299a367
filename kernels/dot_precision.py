"""How the attention kernels multiply: half types on the tensor cores as they are; float32 in full
IEEE precision rather than Triton's default TF32, so a float32 engine can be checked token for
token against a float64 reference (TF32 keeps 10 mantissa bits, enough to flip a close argmax)."""

import torch


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"
