"""docs/own_network.md runs as written. In an empty folder: the blocks titled with a file name are
written to that file, the ```python blocks run in order in one namespace, each one's printout is
compared with the ```text block right after it, and the page's `python -m pcn_ep fit` command
trains. Words must match exactly; numbers within 2% (the page's figures came from one thread on
one machine; another CPU may round differently)."""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "own_network.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.M | re.S)
NUMBER = re.compile(r"[-−]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def blocks() -> list[tuple[str, str | None, str]]:
    """(language, title or None, body) of every fenced block, in page order."""
    found = []
    for lang, attrs, body in FENCE.findall(PAGE.read_text()):
        title = re.search(r'title="([^"]+)"', attrs)
        found.append((lang, title[1] if title else None, body))
    return found


def same_output(got: str, want: str) -> bool:
    if NUMBER.sub("#", got).split() != NUMBER.sub("#", want).split():
        return False
    pairs = zip(NUMBER.findall(got), NUMBER.findall(want))
    return all(abs(float(a.replace("−", "-")) - float(b.replace("−", "-")))
               <= 0.02 * abs(float(b.replace("−", "-"))) + 1e-12 for a, b in pairs)


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    """The page's files, written into an empty folder that is also the working directory."""
    for _, title, body in blocks():
        if title:
            (tmp_path / title).write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_pcn", None)


def test_the_pages_python_runs_and_prints_what_the_page_shows(folder):
    page = blocks()
    runs = [(i, body) for i, (lang, title, body) in enumerate(page)
            if lang == "python" and not title]
    assert len(runs) >= 3
    namespace: dict = {"__name__": "__main__"}
    for i, body in runs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(body, f"{PAGE.name} block {i}", "exec"), namespace)
        if i + 1 < len(page) and page[i + 1][0] == "text":
            want = page[i + 1][2]
            assert same_output(out.getvalue(), want), f"block {i} printed\n{out.getvalue()}"


def test_the_pages_config_trains(folder):
    commands = [line for lang, _, body in blocks() if lang == "bash"
                for line in body.splitlines() if line.startswith("python -m pcn_ep fit")]
    assert commands == ["python -m pcn_ep fit --config my_pcn.yaml"]
    env = dict(os.environ, WANDB_MODE="offline")
    env.pop("PYTHONSAFEPATH", None)  # the page relies on `python -m` putting the folder on sys.path
    out = subprocess.run([sys.executable, *commands[0].split()[1:]], cwd=folder, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "pcn_ep: done." in out.stdout and "test error: top1" in out.stdout
