"""The shape of a Llama-family decoder, read from a Hugging Face config dict."""

from __future__ import annotations

from dataclasses import dataclass

# model_type -> (q/k/v projections carry a bias, q and k are RMS-normed per head)
SUPPORTED_MODEL_TYPES = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this engine cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token, in bytes at 2 bytes per element."""
        return 2 * self.num_layers * self.kv_size * 2

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures")
            raise UnsupportedModelError(
                f"model_type={model_type!r} (architectures={archs}) is not supported: "
                f"lightllm-nb runs {sorted(SUPPORTED_MODEL_TYPES)} decoders")
        default_bias, qk_norm = SUPPORTED_MODEL_TYPES[model_type]
        num_q_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_q_heads
        rope_theta, rope_scaling = _rope_settings(hf)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        max_pos = hf.get("max_position_embeddings", 2048)
        # Mistral v0.1 attends only within a sliding window; within that many tokens it is
        # ordinary causal attention, so cap the context there instead of implementing the window.
        if hf.get("sliding_window") and (model_type == "mistral" or hf.get("use_sliding_window")):
            max_pos = min(max_pos, hf["sliding_window"])
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_q_heads=num_q_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_q_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", default_bias)),
            qk_norm=qk_norm,
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
        )


def _rope_settings(hf: dict) -> tuple[float, dict | None]:
    """Transformers 5 writes `rope_parameters`; older configs write `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    if params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        return float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), scaling
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(hf.get("rope_theta", 10000.0)), scaling
