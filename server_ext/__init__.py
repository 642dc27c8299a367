"""lightllm-nb's Jupyter Server extension (installed as `lightllm_nb.server_ext`)."""


def _jupyter_server_extension_points():
    from .app import LightLLM

    return [{"module": "lightllm_nb.server_ext", "app": LightLLM}]
