"""Programmatic dependent launch (PDL, Hopper and later): a kernel may start while the one before
it on the stream is still finishing, and waits for that kernel's results before it reads anything.

A decode step at batch 1 is ~140 small kernels inside a CUDA graph; between two of them the card
drains the first, then launches and ramps up the second. With PDL the second is launched as soon
as every program of the first has started (`gdc_launch_dependents()`), and its programs wait in
`gdc_wait()` until the first has finished and its writes are visible: the launch latency hides
behind the first kernel's tail. Rules every kernel launched this way keeps: nothing written, and
nothing read that an earlier kernel of the step writes, before the wait (a kernel two back may
still be running: waiting on the one before covers it, since that one waited too); and every
program reaches the wait. Each kernel waits first thing: the GEMV loading its first weight tile
before the wait (the weights depend on nothing) compiled to a slower loop and lost more than it hid
(H200, bench/RESULTS.md).
"""

import functools

import torch


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def dependent_launch(requested: bool, tensor: torch.Tensor) -> bool:
    """Whether a launch on `tensor`'s device may use PDL: asked for, on CUDA (not the Triton
    interpreter, whose tensors live on the CPU; nor ROCm, whose torch also says "cuda"), and on
    compute capability 9.0 or newer. Eager launches use it too: a CUDA graph's capture then finds
    the kernel variant already compiled."""
    if not requested or not tensor.is_cuda or torch.version.hip is not None:
        return False
    # An index, not "cuda": the current device may change between calls.
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] >= 9
