"""A Hugging Face model folder: config.json, safetensors shard(s) and tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from transformers import AutoTokenizer

from lightllm_nb.loading.checkpoint import Checkpoint

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_PATTERN = "model-*-of-*.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_hf_folder(folder: Path) -> Checkpoint:
    """Read the config and tokenizer now; tensors are read shard by shard when iterated."""
    config = _read_config(folder)
    shards = _safetensors_files(folder)
    num_tensors = 0
    for shard in shards:
        with safe_open(shard, framework="pt") as f:  # reads only the header
            num_tensors += len(f.keys())

    def tensors():
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return Checkpoint(
        config=config,
        tensors=tensors,
        num_tensors=num_tensors,
        tokenizer=_load_tokenizer(folder),
        source=f"Hugging Face folder {folder}",
    )


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} entries)" if len(names) > 12 else "")
    return shown or "nothing (the folder is empty)"


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{folder} has no config.json (found: {_listing(folder)}). A Hugging Face model folder "
            f"needs config.json, model.safetensors (or sharded model-*-of-*.safetensors) and "
            f"tokenizer files; to load a single GGUF file, pass the .gguf file's path instead."
        )
    return _read_json(path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        message = f"{path} is not valid JSON ({err}); re-download the model folder."
        raise ValueError(message) from err


def _safetensors_files(folder: Path) -> list[Path]:
    """The shards in a stable order: from the index when there is one, else by name."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map; re-download the model folder.")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ValueError(
                f"{index} lists shard(s) {missing} that are not in {folder}: the download is "
                f"incomplete. Download the missing files and try again."
            )
        return shards
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    shards = sorted(folder.glob(SHARD_PATTERN))
    if shards:
        return shards
    raise ValueError(
        f"{folder} has no safetensors weights (found: {_listing(folder)}). This loader reads only "
        f"{SINGLE_FILE} or {SHARD_PATTERN} (pytorch_model.bin and other pickled formats are not "
        f"read). Convert with transformers: load the model and call "
        f"model.save_pretrained(folder), which writes safetensors."
    )


def _load_tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}). Copy the "
            f"tokenizer files from the model's Hugging Face repository into the folder."
        )
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Could not load the tokenizer in {folder}: {err}. Check that the tokenizer files "
            f"were downloaded completely (tokenizer.json is the one a fast tokenizer needs)."
        ) from err
