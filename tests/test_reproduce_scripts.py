"""Every reproduce script writes under the folder it is run from (or its --out), never into the
checkout: run each one in dry-run mode from a temporary folder and compare the checkout's
``git status`` (ignored files included) before and after."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "reproduce").glob("*.sh"))


def checkout_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout


pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs the git checkout")


def test_there_is_a_script_per_table():
    assert len(SCRIPTS) >= 10 and ROOT / "reproduce" / "table_parity.sh" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_reproduce_script_leaves_the_checkout_untouched(tmp_path, script):
    before = checkout_status()
    extra = ["--smoke"] if script.name == "table_parity.sh" else ["--gpus", "0"]
    done = subprocess.run(["bash", str(script), "--dry-run", *extra], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "a dry run prints the commands it would run"
    assert checkout_status() == before


def test_table_parity_keeps_smoke_apart_and_refuses_to_overwrite(tmp_path):
    script = ROOT / "reproduce" / "table_parity.sh"
    smoke = subprocess.run(["bash", str(script), "--dry-run", "--smoke"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert "--json results/smoke/parity/parity.json" in smoke and "--epochs 1" in smoke
    (tmp_path / "results" / "parity").mkdir(parents=True)
    (tmp_path / "results" / "parity" / "parity.md").write_text("shipped")
    refused = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 2 and "already holds parity tables" in refused.stderr
    assert (tmp_path / "results" / "parity" / "parity.md").read_text() == "shipped"
