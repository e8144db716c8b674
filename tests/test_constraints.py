"""The venv holds the verified versions: ``make venv`` installs with ``-c constraints.txt`` and the
Bento's lock is taken from the venv, so a version that drifts (a new upstream release, a dependency
added without ``make constraints``) is caught here, with the command that fixes it."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNPINNED = {"pip", "setuptools", "wheel", "redi"}  # the installer's own tools and the project itself


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normal(name)] = version.strip()
    return pins


def test_constraints_pin_each_package_once() -> None:
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-!]+", line) for line in lines), lines
    assert len({_normal(line.split("==")[0]) for line in lines}) == len(lines)
    assert not UNPINNED & set(_pins())


def test_the_venv_holds_exactly_the_pinned_versions() -> None:
    pins = _pins()
    installed = {_normal(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {name: f"{installed[name]} installed, {pin} pinned" for name, pin in pins.items()
             if name in installed and installed[name] != pin}
    assert not wrong, f"the venv differs from constraints.txt: {wrong}; run `make venv` (or, after a tested " \
                      f"dependency change, `make constraints`)"
    unpinned = sorted(set(installed) - set(pins) - UNPINNED)
    assert not unpinned, f"installed but not in constraints.txt: {unpinned}; after testing them, `make constraints`"
