"""The configs shipped inside the package (``pcn_ep/configs/``; the checkout's ``configs/`` is a
link to that folder), so that ``--config configs/NAME.yaml``, the form the docs use, works after a
plain ``pip install`` from any folder."""
from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """The shipped config names (file names without ``.yaml``), sorted."""
    return sorted(path.stem for path in CONFIGS.glob("*.yaml"))


def find_config(given: str) -> Path | None:
    """The shipped config that a ``--config`` value which is not a file names: ``NAME``,
    ``NAME.yaml`` or ``configs/NAME.yaml``; ``None`` for anything else (another folder's path is
    the user's own file, mistyped: never replaced by ours)."""
    path = Path(given)
    if path.parent not in (Path("."), Path("configs")) or not path.name:
        return None
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    found = CONFIGS / name
    return found if found.is_file() else None
