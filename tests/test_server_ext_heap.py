"""The extension freezes the Jupyter server's start-up heap: a full garbage collection, which stalls
the server's one thread and so every proxied request, then walks only what came after."""

import asyncio
import gc
import subprocess
import sys

from lightllm_nb.server_ext.app import LightLLM


class _IdleEngine:
    def start(self, *, launch: bool) -> None:
        self.launched = launch


def test_starting_the_extension_takes_the_heap_so_far_out_of_full_collections():
    app = LightLLM(start="lazy")
    app.engine = _IdleEngine()
    gc.unfreeze()
    try:
        heap = len(gc.get_objects())
        asyncio.run(app._start_jupyter_server_extension(None))
        assert app.engine.launched is False
        # A collection first frees start-up's garbage; nearly all else lives as long as the server.
        assert gc.get_freeze_count() > heap // 2
    finally:
        gc.unfreeze()


def test_the_extension_and_its_discovery_file_do_not_import_torch():
    """The Jupyter server imports `lightllm_nb` for the extension: torch would add seconds to its
    start-up and ~160k objects to the heap its collections walk. Only the engine host needs it."""
    modules = ["app", "proxy", "supervisor", "upstream", "engine_link", "discovery"]
    probe = ("import importlib, sys\n"
             f"for m in {modules!r}: importlib.import_module('lightllm_nb.server_ext.' + m)\n"
             "from lightllm_nb import connect\n"
             "assert callable(connect), connect\n"
             "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
