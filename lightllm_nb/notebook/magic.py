"""`%%lightllm`: send a cell to the engine and stream the answer into the cell's output.

    %load_ext lightllm_nb
    %%lightllm --max-tokens 200 --chat tutor
    Explain the KV cache to {audience}.

Line forms: `%lightllm status`, `%lightllm connect [URL [TOKEN]]`, `%lightllm use VARIABLE` (a Client
made in Python, e.g. `client = lightllm_nb.connect()`), `%lightllm config [key=value ...]`, `%lightllm help`. Errors a user can cause are one line (a usage message for bad options), never a
traceback from our internals; interrupting the cell aborts the request and frees its KV.
"""

from __future__ import annotations

import shlex
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.display import Markdown, display

from .answer_display import StreamingAnswer, footer
from .engine_choice import open_client
from .magic_options import CellOptions, OptionError, fill_names, parse_cell_line, updated_defaults, usage

LINE_COMMANDS = "status | connect [URL [TOKEN]] | use VARIABLE | config [key=value ...] | help"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"lightllm: {text}"


@magics_class
class LightLLMMagics(Magics):
    def __init__(self, shell):
        super().__init__(shell)
        self.defaults = CellOptions()
        self.conversations: dict[str, list[dict]] = {}
        self.dashboard = None
        self._client = None
        self._engine_line = ""
        self._user_clients: dict[str, object] = {}
        self._owns_client = False  # made by the magic (closed with it), not handed over with `use`

    @no_var_expand  # IPython would fill {4} in `--regex '[0-9]{4}'`; the cell's {name} is filled by us
    @line_cell_magic
    def lightllm(self, line: str, cell: str | None = None):
        """Send the cell to the engine and stream the answer (%lightllm help lists the options)."""
        if cell is not None:
            return self._answer(line, cell)
        try:
            words = shlex.split(line)
        except ValueError as err:
            raise UsageError(f"%lightllm: cannot read {line!r} ({err}): close the quotes") from None
        command, args = (words[0], words[1:]) if words else ("help", [])
        try:
            if command == "status":
                self._status()
            elif command == "connect":
                self._connect(*args[:2])
            elif command == "use" and len(args) == 1:
                self._use(args[0])
            elif command == "config":
                self.defaults = updated_defaults(self.defaults, args) if args else self.defaults
                print("\n".join(f"{k} = {v!r}" for k, v in vars(self.defaults).items() if k not in ("var", "chat")))
            elif command == "help":
                print(f"%lightllm {LINE_COMMANDS}\n\n{usage()}")
            else:
                raise UsageError(f"%lightllm {command!r} is not a command: use %lightllm {LINE_COMMANDS}, "
                                 "or %%lightllm at the top of a cell to send it")
        except OptionError as err:
            raise UsageError(str(err)) from None
        except UsageError:
            raise
        except Exception as err:  # the engine's answer to a bad request, or an unreachable server
            print(_one_line(err), file=sys.stderr)

    # ---- the engine ---------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._connect()
        return self._client

    def _connect(self, url: str | None = None, token: str | None = None) -> None:
        client, line = open_client(url, token)
        self.close()
        self._client, self._engine_line, self._owns_client = client, line, True
        print(line)

    def _use(self, name: str) -> None:
        client = self.shell.user_ns.get(name)
        if not callable(getattr(client, "stream", None)) or not hasattr(client, "model_name"):
            raise UsageError(f"%lightllm use {name}: {name} is not a Client: make one with "
                             f"{name} = lightllm_nb.connect() or engine.client()")
        if client is not self._client:
            self.close()
        self._client = client
        self._engine_line = f"lightllm: using the client in {name} (model {client.model_name})"
        self._owns_client = False
        print(self._engine_line)

    def _client_for(self, user: str | None):
        client = self.client
        if user is None or user == client.user:
            return client
        loop = getattr(client, "loop", None)
        if loop is None:  # a shared engine knows users by their token: nobody may claim another name
            raise OptionError(f"%%lightllm: --user works only on an engine embedded in this kernel; the shared "
                              f"engine knows you as {client.user!r} from your token")
        if user not in self._user_clients:
            self._user_clients[user] = type(client)(loop, user=user)
        return self._user_clients[user]

    def close(self) -> None:
        """Stop the dashboard and let go of the engine (an embedded one is closed)."""
        if self.dashboard is not None:
            self.dashboard.close()
            self.dashboard = None
        for client in self._user_clients.values():
            client.close()
        self._user_clients.clear()
        if self._client is not None and self._owns_client:
            self._client.close()
            loop = getattr(self._client, "loop", None)
            if loop is not None:
                loop.engine.close()
        self._client = None

    # ---- a cell ---------------------------------------------------------------------------------
    def _answer(self, line: str, cell: str) -> None:
        try:
            options = parse_cell_line(line, self.defaults, self.shell.user_ns)
            text = fill_names(cell, self.shell.user_ns).strip()
            if not text:
                raise OptionError("%%lightllm: the cell is empty: write your prompt under the %%lightllm line")
            client = self._client_for(options.user)
        except OptionError as err:
            raise UsageError(str(err)) from None
        messages = self._messages(options, text)
        answer = StreamingAnswer(options.format)
        foot = display(Markdown(""), display_id=True)
        if options.panel:
            self._show_dashboard(client)
        stream = None
        try:
            if options.raw:
                stream = client.stream(prompt=text, sampling=options.sampling())
            else:
                stream = client.stream(messages=messages, sampling=options.sampling())
            for delta in stream:
                answer.add(delta)
        except KeyboardInterrupt:
            aborted = stream is not None and stream.abort()
            answer.finish("\n\n*(interrupted)*" if options.format == "markdown" else "\n(interrupted)")
            foot.update(Markdown(f"<sub>interrupted: request {stream.request_id if stream else ''} "
                                 f"{'aborted, its KV cache freed' if aborted else 'had already ended'}</sub>"))
            return
        except Exception as err:
            answer.finish()
            print(_one_line(err), file=sys.stderr)
            return
        completion = stream.completion
        answer.finish()
        if completion.finish_reason == "error":
            print(_one_line(RuntimeError(getattr(completion, "error", "") or "the engine failed this request")),
                  file=sys.stderr)
            return
        short = "shared engine" if getattr(client, "url", None) else "embedded engine"
        foot.update(Markdown(f"<sub>{footer(completion, short)}</sub>"))
        if options.chat:
            self.conversations[options.chat] = messages + [{"role": "assistant", "content": completion.text}]
        if options.var:
            self.shell.user_ns[options.var] = completion

    def _messages(self, options: CellOptions, text: str) -> list[dict]:
        history = list(self.conversations.get(options.chat, [])) if options.chat else []
        if options.system and not history:
            history.append({"role": "system", "content": options.system})
        elif options.system:  # a new system prompt mid-conversation replaces the old one
            history = [{"role": "system", "content": options.system}] + [m for m in history if m["role"] != "system"]
        return history + [{"role": "user", "content": text}]

    def _show_dashboard(self, client) -> None:
        from .panels import Dashboard

        if self.dashboard is not None:  # one live dashboard per kernel: the older one stops updating
            self.dashboard.close()
        self.dashboard = Dashboard(client)
        display(self.dashboard)

    def _status(self) -> None:
        s = self.client.stats()
        used, capacity = s.get("kv_used_tokens", 0), max(1, s.get("kv_capacity_tokens", 1))
        lines = [self._engine_line,
                 f"model {s.get('model')} on {s.get('device', '?')}, scheduler {s.get('scheduler', '?')}",
                 f"KV cache: {used:,} of {capacity:,} tokens in use ({100 * used / capacity:.1f}%), "
                 f"{s.get('kv_cached_tokens', 0):,} of them reclaimable prefix cache",
                 f"engine: {s.get('running', 0)} running, {s.get('waiting', 0)} waiting, {s.get('steps', 0)} steps"]
        mine = s.get("user")
        if mine:
            lines.append(f"you ({mine['name']}): {mine['running']} running, {mine['waiting']} waiting")
        if self.conversations:
            lines.append("conversations: " + ", ".join(f"{name} ({len(m) // 2} turns)"
                                                        for name, m in self.conversations.items()))
        print("\n".join(lines))
