"""A llama.cpp GGUF file, presented as if it were a Hugging Face checkpoint.

Three translations happen here: metadata -> an HF-style config dict, GGUF tensor names -> HF
parameter names (with shapes back in PyTorch order and quantized blocks expanded to float32),
and llama.cpp's interleaved rotary layout of q/k rows -> HF's rotate-half layout.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize
from transformers import AutoTokenizer

from lightllm_nb.loading.checkpoint import Checkpoint

# GGUF architecture -> (HF model_type, HF architectures entry).
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
# llama.cpp's converter interleaves the rotary halves of q/k rows only for these: its Llama path
# targets GGML's "normal" rope (adjacent pairs), while Qwen models use the NEOX rope, which is
# already HF's rotate-half and is stored unchanged.
ROTARY_INTERLEAVED = {"llama"}

MODEL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Llama 3.x files store RoPE scaling as per-frequency divisors in this tensor, not as metadata.
ROPE_FREQS = "rope_freqs.weight"
# The llama3 RoPE schedule of every Meta Llama 3.1/3.2/3.3 release; only `factor` differs.
META_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
TENSOR_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<part>\w+)\.(?P<kind>weight|bias)")
STORED_AS_IS = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


def load_gguf_file(path: Path) -> Checkpoint:
    """Read metadata and the tokenizer now; tensors are dequantized one by one when iterated."""
    try:
        reader = GGUFReader(path)  # memory-maps the file: tensor bytes are read only when used
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"{path} could not be read as a GGUF file ({err}). Check that it is a complete "
            f"llama.cpp GGUF file (re-download it if it was cut short)."
        ) from err
    architecture = _architecture(reader, path)
    config = _config(reader, architecture, path)
    rotary_heads = {}
    if architecture in ROTARY_INTERLEAVED:
        rotary_heads = {
            "attn_q": config["num_attention_heads"],
            "attn_k": config["num_key_value_heads"],
        }
    # (tensor, HF name, head count when its rows must be un-interleaved); "blk.3.attn_q.weight"
    # has the part "attn_q" second from the end.
    plan = [
        (tensor, _hf_name(tensor.name, path), rotary_heads.get(tensor.name.split(".")[-2]))
        for tensor in reader.tensors
        if tensor.name != ROPE_FREQS  # already turned into config["rope_scaling"]
    ]

    def tensors():
        for tensor, name, num_heads in plan:
            weight = _to_torch(tensor, path)
            if num_heads is not None:
                weight = undo_rotary_interleave(weight, num_heads)
            yield name, weight

    return Checkpoint(
        config=config,
        tensors=tensors,
        num_tensors=len(plan),
        tokenizer=load_gguf_tokenizer(path),
        source=f"GGUF file {path}",
    )


def undo_rotary_interleave(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Put the q/k rows of each head back in HF's rotate-half order.

    HF rotates row i of a head together with row i + head_dim/2. llama.cpp's converter moves each
    such pair next to each other (row i -> 2i, row i + head_dim/2 -> 2i + 1) because GGML's rope
    rotates adjacent rows. Viewing the rows of a head as (head_dim/2 pairs, 2 members) and
    swapping those two axes puts all first members, then all second members, back in order.
    Works for weights (rows, columns) and biases (rows,) alike.
    """
    head_dim = rows.shape[0] // num_heads
    pairs = rows.reshape(num_heads, head_dim // 2, 2, *rows.shape[1:])
    return pairs.transpose(1, 2).reshape(rows.shape)


def _architecture(reader: GGUFReader, path: Path) -> str:
    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{path} holds a {architecture!r} model; GGUF files are supported for the "
            f"{', '.join(ARCHITECTURES)} architectures. For other models use their Hugging Face "
            f"folder (config.json + safetensors)."
        )
    return architecture


def _hf_name(gguf_name: str, path: Path) -> str:
    match = TENSOR_NAME.fullmatch(gguf_name)
    layer, part = (match["layer"], match["part"]) if match else (None, None)
    if layer is None and part in MODEL_TENSORS:
        return f"{MODEL_TENSORS[part]}.{match['kind']}"
    if layer is not None and part in LAYER_TENSORS:
        return f"model.layers.{layer}.{LAYER_TENSORS[part]}.{match['kind']}"
    raise ValueError(
        f"{path} has a tensor {gguf_name!r} that has no Hugging Face counterpart in the "
        f"llama/qwen2/qwen3 layout. Load the model's Hugging Face folder instead."
    )


def _metadata(reader: GGUFReader) -> dict:
    """The file's scalar and string metadata as Python values (arrays such as the vocabulary are
    left out: the config needs none of them)."""
    values = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.contents()
        if field.types[0] == GGUFValueType.FLOAT32:
            # The shortest decimal that is the same float32 is what the model's author wrote:
            # 1e-05, not 9.999999747378752e-06.
            value = float(str(np.float32(value)))
        values[key] = value
    return values


def _config(reader: GGUFReader, architecture: str, path: Path) -> dict:
    metadata = _metadata(reader)

    def meta(key: str, default=None):
        return metadata.get(f"{architecture}.{key}", default)

    def required(key: str):
        value = meta(key)
        if value is None:
            raise ValueError(
                f"{path} lacks the metadata key {architecture}.{key}, which the model config "
                f"needs. Re-convert the model with llama.cpp's convert_hf_to_gguf.py."
            )
        return value

    model_type, class_name = ARCHITECTURES[architecture]
    hidden_size, num_heads = required("embedding_length"), required("attention.head_count")
    tensor_names = {tensor.name for tensor in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    config = {
        "model_type": model_type,
        "architectures": [class_name],
        # The embedding's row count is the vocabulary the weights were trained with.
        "vocab_size": int(embedding.shape[-1]) if embedding is not None else required("vocab_size"),
        "hidden_size": hidden_size,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta("attention.head_count_kv", num_heads),
        "head_dim": meta("attention.key_length")
        or meta("rope.dimension_count")
        or hidden_size // num_heads,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "rms_norm_eps": required("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta("rope.freq_base", 10000.0),  # llama.cpp's default when unwritten
        "max_position_embeddings": required("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    if metadata.get("tokenizer.ggml.bos_token_id") is not None:
        config["bos_token_id"] = metadata["tokenizer.ggml.bos_token_id"]
    # Chat models end a turn with an end-of-turn/end-of-message token (Llama 3's <|eot_id|>),
    # which GGUF keeps apart from eos; HF configs list them all as eos so generation stops there.
    stop_ids = [metadata.get(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom")]
    stop_ids = list(dict.fromkeys(i for i in stop_ids if i is not None))
    if stop_ids:
        config["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    rope_freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    rope_scaling = _rope_scaling(meta) if rope_freqs is None else _llama3_rope_scaling(
        rope_freqs, config["rope_theta"], config["head_dim"], path
    )
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(meta) -> dict | None:
    """HF's rope_scaling dict from llama.cpp's rope.scaling.* keys (linear and YaRN scaling)."""
    rope_type = meta("rope.scaling.type")
    if rope_type in (None, "none"):
        return None
    scaling = {"rope_type": rope_type}
    for gguf_key, hf_key in (
        ("factor", "factor"),
        ("original_context_length", "original_max_position_embeddings"),
        ("attn_factor", "attention_factor"),
    ):
        value = meta(f"rope.scaling.{gguf_key}")
        if value is not None:
            scaling[hf_key] = value
    return scaling


def _llama3_rope_scaling(rope_freqs: ReaderTensor, theta: float, head_dim: int, path: Path) -> dict:
    """HF's llama3 rope_scaling for a file that stores RoPE divisors (rope_freqs.weight).

    The divisors alone do not name the schedule's parameters, so Meta's schedule is assumed with
    the largest divisor as `factor`, and accepted only if it reproduces every stored divisor.
    """
    stored = np.asarray(rope_freqs.data, dtype=np.float64)
    factor = float(str(np.float32(stored.max())))
    scaling = {"rope_type": "llama3", "factor": factor, **META_LLAMA3_ROPE}
    if stored.shape != (head_dim // 2,) or not np.allclose(
        _llama3_divisors(scaling, theta, head_dim), stored, rtol=1e-5, atol=0
    ):
        raise ValueError(
            f"{path} stores RoPE frequency divisors (rope_freqs.weight) that do not follow the "
            f"Llama 3 schedule {scaling}, so they cannot be expressed as a Hugging Face "
            f"rope_scaling config. Load the model's Hugging Face folder instead."
        )
    return scaling


def _llama3_divisors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """By how much the llama3 schedule divides each rotary frequency: 1 for short wavelengths,
    `factor` for long ones, a smooth blend in between (as transformers' llama3 rope defines it)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelength = 2 * np.pi / inv_freq.astype(np.float64)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_length = scaling["original_max_position_embeddings"]
    smooth = (old_length / wavelength - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelength > old_length / low, factor, blended)
    return np.where(wavelength < old_length / high, 1.0, divisors)


def _to_torch(tensor: ReaderTensor, path: Path) -> torch.Tensor:
    """The tensor in PyTorch's shape: GGUF lists dimensions fastest-first, PyTorch slowest-first."""
    shape = [int(n) for n in reversed(tensor.shape)]
    kind = tensor.tensor_type
    if kind == GGMLQuantizationType.BF16:
        # numpy has no bfloat16: the reader hands out raw bytes, which torch can reinterpret.
        return torch.from_numpy(np.array(tensor.data)).view(torch.bfloat16).reshape(shape)
    if kind in STORED_AS_IS:
        return torch.from_numpy(np.array(tensor.data)).reshape(shape)  # copy out of the mmap
    try:
        values = dequantize(tensor.data, kind)
    except NotImplementedError as err:
        raise ValueError(
            f"{path}: tensor {tensor.name} uses the {kind.name} quantization, which the installed "
            f"gguf package cannot dequantize ({err}). Upgrade it (pip install -U gguf) or use a "
            f"file quantized as Q4_K_M, Q8_0 or another common type."
        ) from err
    return torch.from_numpy(values).reshape(shape)


def tokenizer_cache_dir(path: Path) -> Path:
    """Where the converted tokenizer of `path` is kept; a changed file gets a new folder."""
    root = os.environ.get("LIGHTLLM_NB_CACHE") or Path.home() / ".cache" / "lightllm_nb"
    stat = path.stat()
    return Path(root) / "tokenizers" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def load_gguf_tokenizer(path: Path):
    """The tokenizer stored in the GGUF metadata, converted by transformers once and cached.

    The conversion takes seconds (transformers parses the whole file again and rebuilds the
    tokenizer from its vocabulary arrays); the saved copy loads in a fraction of a second.
    """
    cached = tokenizer_cache_dir(path)
    if cached.is_dir():
        try:
            return AutoTokenizer.from_pretrained(cached, local_files_only=True)
        except (OSError, ValueError):
            shutil.rmtree(cached, ignore_errors=True)  # damaged cache: convert again below
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"Could not build the tokenizer from the metadata of {path}: {err}. The file may lack "
            f"tokenizer metadata; use the model's Hugging Face folder, which has tokenizer files."
        ) from err
    _save_to_cache(tokenizer, cached)
    return tokenizer


def _save_to_cache(tokenizer, cached: Path) -> None:
    # Written to a private folder and renamed into place, so another process never sees a half
    # written cache; if one renamed its copy first, ours is dropped.
    staging = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent))
        tokenizer.save_pretrained(staging)
        staging.rename(cached)
    except OSError as err:
        if not cached.is_dir():
            warnings.warn(
                f"Could not cache the converted tokenizer in {cached} ({err}); it will be "
                f"converted again next time. Set LIGHTLLM_NB_CACHE to a writable folder to keep it.",
                stacklevel=3,
            )
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
