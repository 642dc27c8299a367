"""The front-end halves of the panels: small anywidgets drawing on canvases (js/*.js).

Python talks to a view with custom messages only, one per render, carrying what changed; a view
that opens (a new output area, a page reload) says "hello" and gets everything again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import anywidget
import traitlets

_JS = Path(__file__).parent / "js"


def _module(name: str) -> str:
    """A view's ES module, with the helpers every view shares in front."""
    return (_JS / "common.js").read_text(encoding="utf-8") + (_JS / name).read_text(encoding="utf-8")


class View(anywidget.AnyWidget):
    def on_hello(self, callback: Callable[[], None]) -> None:
        self.on_msg(lambda _widget, content, _buffers: callback() if content.get("kind") == "hello" else None)


class KVGridView(View):
    _esm = _module("kv_grid.js")


class BatchBarsView(View):
    _esm = _module("batch_bars.js")
    steps_shown = traitlets.Int(60).tag(sync=True)


class DecisionsView(View):
    _esm = _module("decisions.js")
    limit = traitlets.Int(2000).tag(sync=True)


class SparklinesView(View):
    _esm = _module("sparklines.js")
    series = traitlets.List().tag(sync=True)   # [[key, label], ...]
