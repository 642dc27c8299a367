"""lightllm-nb: a Jupyter-native LLM serving engine in the spirit of LightLLM."""

from .engine import Engine, RequestOutput
from .request import Completion
from .sampling_params import InvalidRequestError, SamplingParams

__all__ = ["Completion", "Engine", "InvalidRequestError", "RequestOutput", "SamplingParams"]
