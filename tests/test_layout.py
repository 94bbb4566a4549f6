"""The package's wings import downward only (the package map in docs/algorithm.md, shared/DESIGN.md):
core and data import neither training, tools nor experiments; training imports no tools or
experiments; tools import no experiments. Imports inside functions count too. A module at the top
of the package (commandline.py) is a shared leaf: every wing may use it, so it imports no pcn_ep module."""
from __future__ import annotations

import ast
from pathlib import Path

import pcn_ep

PACKAGE = Path(pcn_ep.__file__).parent
WINGS = ("core", "data", "training", "tools", "experiments")
FORBIDDEN = {"core": {"data", "training", "tools", "experiments"},
             "data": {"core", "training", "tools", "experiments"},
             "training": {"tools", "experiments"},
             "tools": {"experiments"},
             "experiments": set()}


def module_name(path: Path) -> str:
    return "pcn_ep." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imported_modules(path: Path, module: str | None = None) -> set[str]:
    """Absolute dotted names of every ``pcn_ep`` module the file imports (relative ones resolved)."""
    module = module or module_name(path)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}  # `from . import x` imports a module x
    return {n for n in found if n.startswith("pcn_ep.")}


def wing_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else None


def test_every_module_lives_in_a_wing_or_is_a_shared_leaf():
    loose = sorted(p for p in PACKAGE.glob("*.py") if p.name not in {"__init__.py", "__main__.py"})
    importing = [p.name for p in loose if imported_modules(p)]
    assert not importing, f"top-level modules outside the five wings must import no pcn_ep module: {importing}"
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == set(WINGS)
    for wing in WINGS:
        doc = ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"pcn_ep/{wing}/__init__.py must say what it may import"


def test_no_wing_imports_upward():
    violations = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the walk really sees the package
    for path in files:
        wing = wing_of(module_name(path))
        if wing is None:
            continue
        for target in imported_modules(path):
            if wing_of(target) in FORBIDDEN[wing]:
                violations.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not violations, "\n".join(violations)


def test_the_walker_sees_relative_and_function_level_imports(tmp_path):
    """Guard the guard: a relative import inside a function is found and resolved."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..training.module import PCNEPModule\n    from . import layers\n")
    found = imported_modules(probe, "pcn_ep.core.probe")
    assert {"pcn_ep.training.module", "pcn_ep.core.layers"} <= found
    assert wing_of("pcn_ep.training.module") in FORBIDDEN["core"]


def test_report_and_runner_share_the_tables_without_a_circle():
    report = imported_modules(PACKAGE / "experiments" / "report.py")
    runner = imported_modules(PACKAGE / "experiments" / "reproduce.py")
    assert "pcn_ep.experiments.tables" in report and "pcn_ep.experiments.tables" in runner
    assert not any(m.startswith("pcn_ep.experiments.reproduce") for m in report)


def test_help_lists_every_command_with_one_line(capsys):
    from pcn_ep.__main__ import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("usage: python -m pcn_ep COMMAND")
    for name in COMMANDS:
        assert sum(line.split()[:1] == [name] for line in out) == 1, name
    modules = {p.stem for wing in ("tools", "experiments") for p in (PACKAGE / wing).glob("*.py")
               if "def main(" in p.read_text()}
    assert modules <= {m.rsplit(".", 1)[1] for m, _ in COMMANDS.values()}  # no command left out
    assert main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err


def test_a_bad_flag_of_any_command_is_one_error_line(capsys):
    """Every command outside Lightning's CLI: a misspelt flag or a value of the wrong type is one
    ``pcn_ep: error:`` line naming the command and the flag, exit 2 (not argparse's usage dump)."""
    import pytest

    from pcn_ep.__main__ import COMMANDS, LIGHTNING, main

    cases = [([c, "--no-such-flag"], "--no-such-flag") for c in COMMANDS if c not in LIGHTNING]
    cases.append((["gradcheck", "--min-cosine", "abc"], "--min-cosine"))
    for argv, flag in cases:
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.count("\n") == 1, (argv, err)
        assert err.startswith(f"pcn_ep: error: {argv[0]}: "), err
        assert flag in err or "arguments are required" in err, err   # argparse names those first
