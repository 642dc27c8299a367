"""The extension freezes the Jupyter server's start-up heap: a full garbage collection, which stalls
the server's one thread and so every proxied request, then walks only what came after."""

import asyncio
import gc

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
