"""The `LightLLM` Jupyter Server extension: one engine host for every kernel of this server.

Configured with traitlets (`c.LightLLM.model = "demo"`, ...). Either it starts and supervises
`lightllm-nb serve` itself, or, with `engine_url`, it fronts an engine host somebody else runs (the
JupyterHub service). Either way it mounts `/lightllm/...` and writes the discovery file.
"""

from __future__ import annotations

import gc
import logging
import os

from jupyter_server.extension.application import ExtensionApp
from traitlets import CaselessStrEnum, Float, Int, List, TraitError, Unicode, validate

from .discovery import remove_discovery_file, write_discovery_file
from .engine_link import EngineLink
from .proxy import EngineEventsHandler, EngineProxyHandler, StatusHandler
from .supervisor import EngineSupervisor


class LightLLM(ExtensionApp):
    name = "lightllm"
    description = "Serve one shared lightllm-nb engine to every kernel of this Jupyter server."
    extension_url = "/lightllm/status"
    load_other_extensions = True

    model = Unicode("demo", config=True, help="'demo', a .gguf file or a Hugging Face model folder")
    device = Unicode("auto", config=True, help="'auto', 'cpu' or 'cuda'")
    dtype = Unicode("auto", config=True, help="'auto', 'float16', 'bfloat16' or 'float32'")
    tp = Int(1, config=True, help="tensor-parallel degree: the number of GPUs the engine host uses")
    kv_fraction = Float(None, allow_none=True, config=True,
                        help="the share of free GPU memory the KV cache takes (serve's default when unset)")
    scheduler = Unicode("past_future", config=True, help="admission policy: past_future, conservative, aggressive")
    max_running_per_user = Int(None, allow_none=True, config=True,
                               help="requests one user may have running at once (no limit when unset)")
    max_waiting_per_user = Int(None, allow_none=True, config=True,
                               help="requests one user may have waiting at once (engine default when unset)")
    prefix_cache_scope = CaselessStrEnum(["user", "shared"], None, allow_none=True, config=True,
                                         help="whose cached prefixes a request may reuse: its own user's (serve's "
                                              "default) or everyone's (a timing side channel between users)")
    extra_serve_args = List(Unicode(), config=True,
                            help="more `lightllm-nb serve` options, passed through as they are")
    engine_url = Unicode("", config=True,
                         help="use this engine host (e.g. the JupyterHub service's URL) instead of starting one")
    engine_token = Unicode("", config=True,
                           help="token for engine_url; default: this server's JUPYTERHUB_API_TOKEN")
    start = CaselessStrEnum(["eager", "lazy"], "eager", config=True,
                            help="start the engine host with the server (eager) or on the first request (lazy)")
    startup_timeout = Float(300.0, config=True,
                            help="seconds a request waits for a starting engine host before a 503")

    @validate("tp")
    def _tp_is_positive(self, proposal):
        if proposal["value"] < 1:
            raise TraitError(f"c.LightLLM.tp = {proposal['value']}: it is the number of GPUs the engine host "
                             "uses, at least 1")
        return proposal["value"]

    def serve_args(self) -> list[str]:
        """The `lightllm-nb serve` options that this configuration sets."""
        args = ["--model", self.model, "--device", self.device, "--dtype", self.dtype,
                "--scheduler", self.scheduler, "--tp", str(self.tp)]
        if self.kv_fraction is not None:
            args += ["--gpu-memory-utilization", str(self.kv_fraction)]
        if self.max_running_per_user is not None:
            args += ["--max-running-per-user", str(self.max_running_per_user)]
        if self.max_waiting_per_user is not None:
            args += ["--max-waiting-per-user", str(self.max_waiting_per_user)]
        if self.prefix_cache_scope is not None:
            args += ["--prefix-cache-scope", self.prefix_cache_scope]
        return args + list(self.extra_serve_args)

    def initialize_settings(self) -> None:
        runtime_dir = self.serverapp.runtime_dir
        # Activity goes into the server's own settings (ours are copied into them once, at load).
        server_settings = self.serverapp.web_app.settings
        if self.engine_url:
            token = self.engine_token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
            self.engine = EngineLink(server_settings, url=self.engine_url, token=token,
                                     ready_timeout_s=self.startup_timeout)
        else:
            supervisor = EngineSupervisor(self.serve_args(), runtime_dir=runtime_dir, log=self.log,
                                          startup_timeout_s=self.startup_timeout)
            self.engine = EngineLink(server_settings, supervisor=supervisor, ready_timeout_s=self.startup_timeout)
        self.settings["lightllm_engine"] = self.engine
        self.discovery_file = write_discovery_file(
            runtime_dir, url=self.serverapp.connection_url.rstrip("/") + "/lightllm",
            token=self.serverapp.identity_provider.token or "", engine_url=self.engine.url)
        self.log.info("lightllm: kernels find the engine through %s", self.discovery_file)
        make_no_records_that_no_handler_takes(self.log)
        # Jupyter's identity provider logs through the server's logger, at debug level, for every
        # token-authenticated request ("Accepting token-authenticated request from ..."): a record
        # made and dropped per proxied request, ~3% of the thread's time for one (issue 9).
        make_no_records_that_no_handler_takes(self.serverapp.identity_provider.log)

    def initialize_handlers(self) -> None:
        self.handlers.extend([
            (r"/lightllm/status", StatusHandler),
            (r"/lightllm/api/events", EngineEventsHandler),
            (r"/lightllm/(.*)", EngineProxyHandler),
        ])

    async def _start_jupyter_server_extension(self, serverapp) -> None:
        # Runs once the event loop does. Eager: the model loads while the user opens a notebook;
        # lazy: on the first request (which waits for it).
        self.engine.start(launch=self.start == "eager")
        freeze_startup_heap()

    async def stop_extension(self) -> None:
        remove_discovery_file(self.discovery_file)
        await self.engine.stop()


def freeze_startup_heap() -> None:
    """Moves every object the server's start-up made out of the garbage collector's sight.

    The server's heap (Jupyter and its extensions; `lightllm_nb` imports no torch here) is tens of
    thousands of objects that live as long as the process (~340k when torch came with it).
    Requests that leave reference cycles (each proxied one did, ~66 objects; Jupyter's own
    handlers may) set off a full collection every few
    seconds under a burst of streams, and each walked that whole heap: 0.2-1.3 s on this 2-core
    box, the server's one thread, so every request and stream, stalled meanwhile (issue 9).
    Frozen, a full collection walks only what came after. One collection first, so that
    start-up's own garbage is freed rather than kept for ever.
    """
    gc.collect()
    gc.freeze()


def make_no_records_that_no_handler_takes(log: logging.Logger) -> None:
    """Raises `log`'s level to the lowest of its handlers' (when it passes records to no others).

    traitlets leaves an application's logger at DEBUG and lets its handler drop what is below the
    level asked for, so every debug call makes a record for nothing. Our handlers log through this
    logger (jupyter_server's access log line and its "new anonymous user" line, at debug level, for
    every proxied request): ~2% of a request's time on the server's one thread (issue 9).
    """
    if log.handlers and not log.propagate:
        log.setLevel(max(log.level, min(handler.level for handler in log.handlers)))
