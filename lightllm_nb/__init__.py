"""lightllm-nb: a Jupyter-native LLM serving engine in the spirit of LightLLM."""

from .scheduling.admission import AggressivePolicy, ConservativePolicy
from .engine.engine import Engine
from .scheduling.past_future import PastFuturePolicy
from .scheduling.request import Completion, RequestOutput
from .sampling_params import InvalidRequestError, SamplingParams

__all__ = ["AggressivePolicy", "Completion", "ConservativePolicy", "Engine", "InvalidRequestError",
           "PastFuturePolicy", "RequestOutput", "SamplingParams", "connect"]


def __getattr__(name):
    # connect() reaches the HTTP client; importing it only when asked keeps `import lightllm_nb` lean.
    if name == "connect":
        from .connect import connect

        return connect
    raise AttributeError(f"module 'lightllm_nb' has no attribute {name!r}")
