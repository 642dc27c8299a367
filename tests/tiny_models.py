"""Tiny random Llama / Qwen2 / Qwen3 models made with transformers and saved as safetensors.

Weights are drawn wider than transformers' init so logits are not nearly flat: greedy decoding
then has clear winners, and a wrong kernel shows up as a different token, not a coin flip.
"""

import torch
import transformers

COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

KINDS = {
    # Llama 3.1-style rope scaling, untied head, GQA 4/2.
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64})),
    # q/k/v biases, tied embeddings.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    # Mistral: a Llama with a sliding window (longer than the context here, so plain causal).
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(rope_theta=10000.0, sliding_window=4096)),
    # per-head q/k RMSNorm and a head_dim that is not hidden/heads.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32, rope_theta=1000000.0)),
}


def make_tiny_model(kind, folder, tokenizer, seed=0):
    config_cls, model_cls, extra = KINDS[kind]
    config = config_cls(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    model = model.to(torch.float64).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(model, prompt_ids, max_new_tokens):
    """HF generate, one prompt at a time, greedy; returns the new token ids."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False)
    return out[0, len(prompt_ids):].tolist()
