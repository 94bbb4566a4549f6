"""Every command's ``--help`` stands alone: each flag has a description and shows its default (for
``fit``, ``validate`` and ``test``, the config's value), nothing is called "required" that has a
default, the section headings are pcn_ep's (not the first lines of Lightning's docstrings), and the
references are to the paper, never to a "spec" file a user does not have.

The help is produced in-process (``pcn_ep.__main__.main``), as ``python -m pcn_ep CMD --help``
prints it; one subprocess checks the ``--*.help CLASS`` usage line, which names the program."""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pcn_ep.__main__ import COMMANDS, LIGHTNING, main

TOOLS = [name for name in COMMANDS if name not in LIGHTNING]
# the first lines of Lightning's and jsonargparse's docstrings, which would otherwise head sections
FOREIGN = ("The main advantage", "A DataModule standardizes", "Runs the full optimization",
           "Customize every aspect", "Perform one evaluation epoch", "Path/URL of the checkpoint")
AUTO = re.compile(r"\s*\((required|type:|default:).*\)\s*$", re.S)  # what the formatter appends


def help_of(capsys, *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    assert done.value.code in (0, None)
    return capsys.readouterr().out


def sections(text: str) -> list[str]:
    """The section headings: unindented lines that end with a colon."""
    return [line for line in text.splitlines() if line and not line[0].isspace() and line.endswith(":")]


def entries(text: str) -> dict[str, str]:
    """Each option (or positional) of an argparse / jsonargparse help and its description, joined
    into one line; the usage, the description and the config-file note are not options."""
    found: dict[str, str] = {}
    section, current = None, None
    for line in text.splitlines():
        if line and not line[0].isspace():
            section = line if line.endswith(":") and not line.startswith("default config file") else None
            current = None
            continue
        if section is None or not line.strip():
            continue
        if re.match(r"  \S", line):
            invocation, _, description = line[2:].partition("  ")
            current = invocation.strip()
            found[current] = description.strip()
        elif current is not None:
            found[current] = f"{found[current]} {line.strip()}".strip()
    return found


def description(text: str) -> str:
    """A help entry without what the formatter appends: ``(required, type: ..., default: ...)``."""
    return AUTO.sub("", text).strip()


@pytest.fixture(scope="module")
def lightning_help():
    """fit / validate / test help, built once per module (a LightningCLI parser takes seconds)."""
    cache: dict[str, str] = {}

    def get(capsys, command: str) -> str:
        if command not in cache:
            cache[command] = help_of(capsys, command, "--help")
        return cache[command]

    return get


def all_help(capsys, lightning_help, command: str) -> str:
    return lightning_help(capsys, command) if command in LIGHTNING else help_of(capsys, command, "--help")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_has_a_description(capsys, lightning_help, command):
    text = all_help(capsys, lightning_help, command)
    found = entries(text)
    assert len(found) >= 3, text[:2000]
    bare = [flag for flag, help in found.items() if not re.search(r"[A-Za-z]{2}", description(help))]
    assert not bare, f"{command}: flags without a description: {bare}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_spec_and_no_required_beside_a_default(capsys, lightning_help, command):
    text = all_help(capsys, lightning_help, command)
    joined = " ".join(text.split())
    assert not re.search(r"\bspec\b", joined, flags=re.I), re.search(r".{60}\bspec\b.{60}", joined, re.I)
    beside = [flag for flag, help in entries(text).items() if re.search(r"\(required\b[^()]*default:", help)]
    assert not beside, f"{command}: 'required' beside a default: {beside}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_section_headings_are_ours(capsys, lightning_help, command):
    text = all_help(capsys, lightning_help, command)
    for heading in sections(text):
        assert not any(words in heading for words in FOREIGN) and len(heading) <= 100, heading
    described = text.split("\n\n")[1]  # the paragraph after the usage
    assert not any(words in described for words in FOREIGN), described


@pytest.mark.parametrize("command", TOOLS)
def test_tool_flags_show_their_defaults(capsys, command):
    """Every flag that has a value when it is not given says that value (store_true flags, off by
    default, flags whose absence means "not set" and repeatable flags given no times need not)."""
    parser = importlib.import_module(COMMANDS[command][0]).parser()
    found = entries(parser.format_help())
    silent = []
    for action in parser._actions:
        if (not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS)
                or isinstance(action, (argparse._StoreConstAction, argparse._HelpAction))):
            continue
        entry = next(help for flag, help in found.items() if flag.startswith(action.option_strings[0]))
        if "default" not in entry:
            silent.append(action.option_strings[0])
    assert not silent, f"{command}: flags that do not show their default: {silent}"


def test_fit_help_shows_the_configs_values_as_defaults(capsys, lightning_help):
    found = entries(lightning_help(capsys, "fit"))
    network = next(help for flag, help in found.items() if flag.startswith("--model.network NETWORK"))
    assert "VGG5" in network and "required" not in network, network
    beta = next(help for flag, help in found.items() if flag.startswith("--model.beta"))
    assert "default: 0.02" in beta, beta  # quickstart.yaml's, not the class's 0.05


def test_class_help_names_the_program():
    """``--model.network.help VGG10`` builds a parser of its own: its usage names pcn_ep too."""
    done = subprocess.run([sys.executable, "-m", "pcn_ep", "fit", "--model.network.help", "VGG10"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m pcn_ep fit "), done.stdout[:200]
    assert "__main__" not in done.stdout


def test_no_file_of_the_package_cites_the_spec():
    """Docstrings, help and config comments cite the paper (Sec., Eq., Table, Fig.), never the
    working specification users do not have ("spec §3.4", "spec Eq. 17", "spec/paper.md")."""
    package = Path(__file__).parents[1] / "pcn_ep"
    cited = [f"{path.relative_to(package)}:{number}: {line.strip()}"
             for path in sorted([*package.rglob("*.py"), *package.rglob("*.yaml")])
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\bspec\b ?(§|Eqs?\.|Tables?\b|Fig\.)|\bspec/|# spec:", line, re.I)]
    assert not cited, "\n".join(cited)
