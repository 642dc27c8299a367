"""lightllm-nb: a Jupyter-native LLM serving engine in the spirit of LightLLM."""

from .admission import AggressivePolicy, ConservativePolicy
from .engine import Engine
from .past_future import PastFuturePolicy
from .request import Completion, RequestOutput
from .sampling_params import InvalidRequestError, SamplingParams

__all__ = ["AggressivePolicy", "Completion", "ConservativePolicy", "Engine", "InvalidRequestError",
           "PastFuturePolicy", "RequestOutput", "SamplingParams"]
