import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. This must be set
# before triton is first imported, which is why it lives here and not in a test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
