"""The notebook toolkit: the `%%lightllm` magic and live panels. Jupyter imports live here only."""


def load_ipython_extension(ipython) -> None:
    from .magic import LightLLMMagics

    ipython.register_magics(LightLLMMagics(ipython))


def unload_ipython_extension(ipython) -> None:
    from .magic import LightLLMMagics

    manager = ipython.magics_manager
    magics = manager.registry.pop(LightLLMMagics.__name__, None)
    for kind in ("line", "cell"):
        manager.magics[kind].pop("lightllm", None)
    if magics is not None:
        magics.close()
