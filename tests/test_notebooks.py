"""The teaching notebooks execute top to bottom on CPU with the demo model (nbclient, a real kernel)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts.append(data.get("text/markdown", "") + data.get("text/plain", ""))
    return "".join(parts)


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name}: cells {dirty} have outputs: strip them before committing"


def test_quickstart_executes(tmp_path, monkeypatch):
    # A private runtime dir: another Jupyter server on this machine must not be discovered.
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    for key in [k for k in os.environ if k.startswith("LIGHTLLM_")]:
        monkeypatch.delenv(key)
    nb = nbformat.read(NOTEBOOKS / "01_quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [outputs_text(c) for c in code if any(o.get("name") == "stderr" or o.output_type == "error"
                                                    for o in c.outputs)]
    assert not errors, errors
    answer = next(c for c in code if c.source.startswith("%%lightllm --max-tokens 60"))
    assert "TTFT" in outputs_text(answer) and len(outputs_text(answer)) > 80
    assert "prompt tokens came from the prefix cache" in outputs_text(next(c for c in code if "followup.metrics" in c.source))
    assert "0 prompt tokens came" not in outputs_text(next(c for c in code if "followup.metrics" in c.source))
    openai_cell = next(c for c in code if "openai_client.chat" in c.source)
    assert len(outputs_text(openai_cell).strip()) > 10
    dashboard_cell = next(c for c in code if "Dashboard(client)" in c.source)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in dashboard_cell.outputs)
