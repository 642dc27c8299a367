"""lightllm-nb: a Jupyter-native LLM serving engine in the spirit of LightLLM."""

from .scheduling.admission import AggressivePolicy, ConservativePolicy
from .engine.engine import Engine
from .scheduling.past_future import PastFuturePolicy
from .scheduling.request import Completion, RequestOutput
from .sampling_params import InvalidRequestError, SamplingParams
# connect.py imports only the standard library at module level (its HTTP client on call).
from .connect import connect  # the function: it shadows the module of the same name, on purpose
from .serving.client import Client, LocalClient
from .serving.driver import DriverLoop
from .serving.text_stream import TextStream
from .telemetry.events import StepEvent
from .telemetry.hub import EventSubscription

__all__ = ["AggressivePolicy", "Client", "Completion", "ConservativePolicy", "DriverLoop", "Engine",
           "EventSubscription", "InvalidRequestError", "LocalClient", "PastFuturePolicy", "RequestOutput",
           "SamplingParams", "StepEvent", "TextStream", "connect"]



def load_ipython_extension(ipython):
    """`%load_ext lightllm_nb`: the %%lightllm magic (the notebook toolkit is imported only here)."""
    from .notebook import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):
    from .notebook import unload_ipython_extension as unload

    unload(ipython)
