"""Small files written whole: a reader (a resumed run, a rerun of a script) finds the previous
version or the new one, never half of either."""
from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a hidden file beside ``path`` (named by the process), then rename it over
    ``path``: a kill mid-write leaves the previous file."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(text, encoding="utf-8", newline="")  # the text as it is
    os.replace(partial, path)
