"""The modules of ``pcn_ep/experiments`` import one way (issue 25): ``reproduce`` → ``report`` →
``wandb_report`` → ``results``. A cycle (``report`` ↔ ``wandb_report`` ↔ ``reproduce``, as it was)
makes a module half-initialized when another is imported first."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "pcn_ep" / "experiments"
PACKAGE = "pcn_ep.experiments"
MODULES = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if p.stem != "__init__")


def imports(folder: Path, module: str) -> set[str]:
    """The sibling modules ``module`` imports, at its top or inside a function: an import deferred
    into a function is still an arrow of the graph."""
    found = set()
    for node in ast.walk(ast.parse((folder / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
            rest = node.module.removeprefix(PACKAGE).lstrip(".")
            found |= {rest.split(".")[0]} if rest else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith(PACKAGE + ".")}
    return found - {module}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as the modules along it, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, path + [node])
            if found:
                return found
        done.add(node)
        return None

    return next(filter(None, (visit(node, []) for node in sorted(graph))), None)


def graph_of(folder: Path) -> dict[str, set[str]]:
    names = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    return {m: imports(folder, m) & names for m in names}


def test_the_experiments_modules_import_one_way():
    graph = graph_of(EXPERIMENTS)
    assert cycle(graph) is None, " → ".join(cycle(graph))
    assert graph["results"] <= {"tables"}   # the shared module reads none of the others
    assert "report" not in graph["wandb_report"] and "reproduce" not in graph["report"]


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_in_a_fresh_interpreter(module):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", f"import {PACKAGE}.{module}"],
                          env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
