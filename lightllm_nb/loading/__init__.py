"""Model loading: turns "demo", a .gguf file or a Hugging Face folder into a `Checkpoint`."""

from lightllm_nb.loading.checkpoint import Checkpoint, load_checkpoint
from lightllm_nb.loading.demo import demo_model_path

__all__ = ["Checkpoint", "demo_model_path", "load_checkpoint"]
