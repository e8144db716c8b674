"""The import layers of .importlinter hold, and the contracts really catch a violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("redi", "components", "pipelines", "serving")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    """Run lint-imports on the packages under ``cwd`` (with ``cwd``'s .importlinter), uncached."""
    if not LINT_IMPORTS.is_file():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the dev extra (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the packages under cwd, not the installed ones
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture()
def copy(tmp_path: Path) -> Path:
    """The packages' Python files and .importlinter, copied so a test can add a bad import."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=lambda _dir, names: [n for n in names if n == "__pycache__"
                                                    or (not n.endswith(".py") and "." in n)])
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def _append(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code + "\n")


def test_the_repository_keeps_its_import_layers() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_data_and_methods_may_not_import_what_is_above_them(copy: Path) -> None:
    _append(copy / "redi" / "data" / "demo.py", "def _leak():\n    from redi.methods.training import fingerprint\n")
    _append(copy / "redi" / "methods" / "redi" / "recover.py", "def _leak():\n    import redi.workflow.stages\n")
    result = _lint(copy)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "redi.data.demo -> redi.methods.training" in result.stdout
    assert "redi.methods.redi.recover -> redi.workflow.stages" in result.stdout


def test_the_library_may_not_import_serving_and_the_cli_may_import_the_pipeline(copy: Path) -> None:
    _append(copy / "redi" / "cli" / "pipeline.py", "def _wire():\n    import pipelines.line_pipeline\n")
    _append(copy / "redi" / "workflow" / "stages.py", "def _leak():\n    from serving import service\n")
    result = _lint(copy)
    assert result.returncode != 0
    assert "redi.workflow.stages -> serving.service" in result.stdout
    assert "redi.cli.pipeline -> pipelines" not in result.stdout  # the top layer may import everything


def test_the_core_may_not_import_a_method_nor_a_registry_the_config(copy: Path) -> None:
    _append(copy / "redi" / "core" / "backbones.py", "def _leak():\n    from redi.core.config import RediConfig\n")
    _append(copy / "redi" / "core" / "config.py", "def _leak():\n    from redi.methods.base import get_method\n")
    result = _lint(copy)
    assert result.returncode != 0
    assert "redi.core.backbones -> redi.core.config" in result.stdout
    assert "redi.core.config -> redi.methods.base" in result.stdout


def test_torch_modules_may_not_import_the_config(copy: Path) -> None:
    _append(copy / "redi" / "methods" / "redi" / "discriminate.py",
            "def _leak():\n    from redi.core.config import RediConfig\n")
    result = _lint(copy)
    assert result.returncode != 0 and "ReDi's torch modules and losses know tensors only BROKEN" in result.stdout
