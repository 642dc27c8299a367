"""lightllm-nb: a Jupyter-native LLM serving engine in the spirit of LightLLM."""

import importlib

# connect.py imports only the standard library at module level (its HTTP client on call). Bound
# first and eagerly: the function shadows the module of the same name, on purpose, and a later
# `import lightllm_nb.connect` (the server extension's) leaves an existing binding alone.
from .connect import connect

# Everything else loads on first use (PEP 562): the Jupyter server imports this package for the
# extension and its discovery file, and must not pay for torch (seconds at start-up, ~160k objects
# that each full garbage collection walks on the server's one thread).
_PUBLIC = {
    "AggressivePolicy": ".scheduling.admission", "ConservativePolicy": ".scheduling.admission",
    "Engine": ".engine.engine", "PastFuturePolicy": ".scheduling.past_future",
    "Completion": ".scheduling.request", "RequestOutput": ".scheduling.request",
    "InvalidRequestError": ".sampling_params", "SamplingParams": ".sampling_params",
    "Client": ".serving.client", "LocalClient": ".serving.client", "DriverLoop": ".serving.driver",
    "TextStream": ".serving.text_stream", "StepEvent": ".telemetry.events",
    "EventSubscription": ".telemetry.hub",
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


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
