"""The documentation: README is the front door (the two commands first, at most about 150 lines,
links into docs/ that resolve), the mkdocs site builds with --strict (a broken link, anchor or
docstring reference fails), and the citation metadata agrees with the package's version."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

import pcn_ep

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
COMMANDS = """```bash
pip install -e . && python -m pcn_ep fit      # install, then train the embedded default (digits, centered EP)
bash tests/run.sh                             # install with test extras, then run the whole test suite
```"""


def git_status() -> str | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return None
    return out.stdout if out.returncode == 0 else None


def test_mkdocs_build_strict(tmp_path):
    before = git_status()
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "core" / "index.html").is_file()
    assert not (ROOT / "site").exists()
    if before is not None:
        assert git_status() == before  # the build wrote nothing into the checkout


def test_readme_opens_with_the_two_commands_and_stays_short():
    text = README.read_text()
    first_block = text[text.index("```"):text.index("```", text.index("```") + 3) + 3]
    assert first_block == COMMANDS
    assert len(text.splitlines()) <= 150


def heading_slug(heading: str) -> str:
    """The anchor mkdocs (and, for these headings, GitHub) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return re.sub(r"[\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = page.read_text()
    found = set(re.findall(r'<a id="([^"]+)"', text))
    found |= {heading_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    return found


def test_readme_links_into_docs_resolve():
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", README.read_text())
    assert {"docs/glossary.md", "docs/training.md", "docs/faults.md"} <= {path for path, _ in links}
    for path, anchor in links:
        assert (ROOT / path).is_file(), path
        if anchor:
            assert anchor in anchors(ROOT / path), f"{path}#{anchor}"


def test_docs_never_cite_our_internal_spec():
    """Pages cite the paper by section, equation and table, never a document users do not have."""
    for page in [README, *DOCS.rglob("*.md")]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            assert not re.search(r"\bspec\b|\[\?\]", line, re.I), f"{page.name}:{number}: {line}"


def test_citation_metadata_matches_the_package():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["version"] == version == pcn_ep.__version__
    assert cff["license"] == "MIT" and "MIT License" in (ROOT / "LICENSE").read_text()
    assert cff["authors"] == [{"name": "pcn-ep contributors"}]
    paper = cff["references"][0]
    assert "Equilibrium Propagation" in paper["title"] and paper["year"] == 2026
    readme = README.read_text()
    assert f"version = {{{version}}}" in readme and "@misc{kerjan2026pcn" in readme
