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


def test_models_and_data_may_not_import_stages_or_training(copy: Path) -> None:
    _append(copy / "redi" / "data" / "demo.py", "def _leak():\n    from redi.training import fingerprint\n")
    _append(copy / "redi" / "models" / "recover.py", "def _leak():\n    import redi.stages\n")
    result = _lint(copy)
    assert result.returncode != 0
    assert "redi.models and redi.data know nothing of stages, training, reports or commands BROKEN" in result.stdout
    assert "redi.data.demo -> redi.training" in result.stdout and "redi.models.recover -> redi.stages" in result.stdout


def test_only_the_cli_bridges_may_import_the_pipeline(copy: Path) -> None:
    _append(copy / "redi" / "pipeline_cli.py", "def _wire():\n    import pipelines.line_pipeline\n")
    _append(copy / "redi" / "stages.py", "def _leak():\n    from serving import service\n")
    result = _lint(copy)
    assert result.returncode != 0
    assert "redi.stages -> serving.service" in result.stdout
    assert "redi.pipeline_cli -> pipelines" not in result.stdout  # the bridge's import is allowed


def test_registries_may_not_import_the_config(copy: Path) -> None:
    _append(copy / "redi" / "backbones.py", "def _leak():\n    from redi.config import RediConfig\n")
    result = _lint(copy)
    assert result.returncode != 0 and "redi.backbones -> redi.config" in result.stdout
