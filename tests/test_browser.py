"""A real browser on a real JupyterLab: Debian's chromium, driven by Playwright, runs a
`%%lightllm --panel` cell; the answer must stream in (its text grows over time) and the KV grid
must render and change. Screenshots go to the test's tmp dir."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import pytest

from playwright import sync_api as playwright

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own browser download does not work here
PROMPT = "List five facts about the Moon, one per line."


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)"
    root = tmp_path / "root"
    root.mkdir()
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext lightllm_nb"),
        # ~75 tokens (the model stops by itself): seconds of streaming on a slow CI box, time for the
        # widget views to load and draw the grid while the answer still grows
        nbformat.v4.new_code_cell(f"%%lightllm --panel --max-tokens 96 --temperature 0\n{PROMPT}"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, root / "panel.ipynb")
    config = tmp_path / "config"
    config.mkdir()
    # The embedded engine: no engine-host extension and nothing else's discovery file.
    (config / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": {"lightllm_nb.server_ext": False}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTLLM_")}
    env.update(JUPYTER_CONFIG_DIR=str(config), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), OMP_NUM_THREADS="2")
    port, token = free_port(), secrets.token_hex(16)
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                               f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                               "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "jupyterlab.log").read_text()
            time.sleep(0.3)
    try:
        yield url, token
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_panel_cell_streams_its_answer_and_draws_a_changing_kv_grid(lab, tmp_path):
    url, token = lab
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 1500})
        page.goto(f"{url}/lab/tree/panel.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        select_kernel = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
        try:  # JupyterLab may ask which kernel to start
            select_kernel.click(timeout=5_000)
        except playwright.TimeoutError:
            pass
        page.get_by_role("button", name="No", exact=True).click(timeout=10_000)  # JupyterLab's news question
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        answer_cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
        answer = answer_cell.locator(".jp-RenderedMarkdown").first
        grid = page.locator("canvas.lnb-kv-grid")
        lengths, steps, images = [], [], []
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            text = answer.inner_text(timeout=1000) if answer.count() else ""
            if text.strip() and (not lengths or len(text) != lengths[-1]):
                lengths.append(len(text))
                if len(lengths) in (2, 5):
                    page.screenshot(path=str(tmp_path / f"streaming-{len(lengths)}.png"), full_page=True)
            if grid.count():
                step = grid.get_attribute("data-step")
                if step and (not steps or step != steps[-1]):
                    steps.append(step)
                    images.append(grid.evaluate("c => c.toDataURL()"))
            if "prompt tokens cached" in answer_cell.inner_text():  # the footer: the answer is complete
                break
            time.sleep(0.25)
        page.wait_for_timeout(500)
        page.screenshot(path=str(tmp_path / "finished.png"), full_page=True)
        footer = answer_cell.inner_text()
        browser.close()
    shutil.copy(tmp_path / "finished.png", tmp_path / "root" / "finished.png")
    assert "prompt tokens cached" in footer, f"the answer did not finish: {footer[-300:]}"
    # The text grew in several updates. Rendered markdown may shrink by a few characters on the way: a
    # line's "5" turns into a list item's "5. ", whose number the list then draws (not in the text).
    assert len(set(lengths)) >= 3 and max(lengths) - 5 <= lengths[-1] and lengths[-1] > 2 * lengths[0], lengths
    assert len(set(steps)) >= 2, steps                                   # the grid followed the steps
    assert len(set(images)) >= 2                                         # and its picture changed
