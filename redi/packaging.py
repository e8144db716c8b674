"""BentoML packaging of a promoted detector (see "Packaging and serving contract" in
docs/architecture.md).

- :func:`save_to_bentoml` puts ``detector.pt`` into the BentoML model store as model
  ``redi-<line>`` with labels ``{"redi": "detector", "line": <line>}``;
- :func:`build_bento` runs ``bentoml build`` on ``serving/bentofile.yaml``.

BentoML reads ``BENTOML_HOME`` (the store's folder, default ``~/bentoml``) when it is first
imported, so callers that want another store set the variable before calling either function;
:func:`bentoml_env` gives the environment used for the ``bentoml build`` subprocess (it always sets
``BENTOML_DO_NOT_TRACK=true``: no usage reports leave the machine). ``bentoml build`` works offline
because the bentofile sets ``python.lock_packages: false`` (locking would query the package index
and pick a torch above the verified cap, see STACK.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from redi.errors import RediError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BENTOFILE = PROJECT_ROOT / "serving" / "bentofile.yaml"
MODEL_PREFIX = "redi-"
_NAME_OK = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")


class PackagingError(RediError):
    """The model cannot be stored in BentoML or the Bento cannot be built."""


def bentoml_env(bentoml_home: str | Path | None = None) -> dict[str, str]:
    """The environment for BentoML: no tracking, and ``BENTOML_HOME`` when one is given."""
    env = dict(os.environ)
    env["BENTOML_DO_NOT_TRACK"] = "true"
    if bentoml_home:
        env["BENTOML_HOME"] = str(Path(bentoml_home).resolve())
    return env


def model_name(line: str) -> str:
    """The BentoML model name of a line's detector: ``redi-<line>`` (lower case, '_' kept)."""
    name = f"{MODEL_PREFIX}{line}".lower()
    if not _NAME_OK.match(name):
        raise PackagingError(f"product line {line!r} gives the BentoML model name {name!r}, which BentoML refuses; "
                             f"use letters, digits, '_', '-' or '.' in line names")
    return name


def _plain(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only the scalar entries (BentoML metadata must be simple JSON values)."""
    return {k: v for k, v in (values or {}).items() if isinstance(v, (str, int, float, bool))}


def save_to_bentoml(detector_path: str | Path, line: str, metrics: Mapping[str, Any] | None = None) -> str:
    """Put a promoted ``detector.pt`` into the BentoML model store as ``redi-<line>``; return the tag.

    The model folder holds ``detector.pt``; labels ``{"redi": "detector", "line": line}``;
    metadata: model version, profile, backbone, image size, threshold and the (scalar) metrics.
    """
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    import bentoml

    from redi.models.detector import read_artifact

    detector_path = Path(detector_path)
    payload = read_artifact(detector_path)
    meta = payload.get("metadata", {})
    config = payload.get("config", {})
    metadata = {"model_version": str(meta.get("version", "")), "profile": str(meta.get("profile", "")),
                "backbone": str(meta.get("backbone", "")), "line": line,
                "image_size": int(config.get("data", {}).get("image_size", 0)),
                "created": str(meta.get("created", "")), "metrics": _plain(metrics)}
    with bentoml.models.create(model_name(line), labels={"redi": "detector", "line": line},
                               metadata=metadata) as model:
        shutil.copyfile(detector_path, model.path_of("detector.pt"))
    return str(model.tag)


def _bentoml_command() -> list[str]:
    beside = Path(sys.executable).parent / "bentoml"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "bentoml"]


def build_bento(bentofile: str | Path | None = None, build_ctx: str | Path | None = None,
                version: str | None = None, bentoml_home: str | Path | None = None,
                timeout_s: float = 900.0) -> str:
    """Run ``bentoml build`` on ``serving/bentofile.yaml`` and return the Bento's tag.

    Args:
        bentofile: default ``serving/bentofile.yaml`` of this project.
        build_ctx: the folder the bentofile's paths are relative to (default: the project root).
        version: the Bento's version (default: BentoML generates one).
        bentoml_home: BentoML's store (default: ``BENTOML_HOME`` or ``~/bentoml``).
    """
    bentofile = Path(bentofile or DEFAULT_BENTOFILE)
    if not bentofile.is_file():
        raise PackagingError(f"bentofile {bentofile} does not exist; the serving package (serving/) is missing "
                             f"from this install")
    build_ctx = Path(build_ctx or PROJECT_ROOT)
    command = [*_bentoml_command(), "build", str(build_ctx), "-f", str(bentofile), "-o", "tag"]
    if version:
        command += ["--version", version]
    try:
        done = subprocess.run(command, env=bentoml_env(bentoml_home), capture_output=True, text=True,
                              timeout=timeout_s, cwd=build_ctx)
    except subprocess.TimeoutExpired as exc:
        raise PackagingError(f"`bentoml build` took over {timeout_s:.0f} s and was stopped") from exc
    match = re.search(r"__tag__:(\S+)", done.stdout)
    if done.returncode != 0 or not match:
        tail = (done.stderr or done.stdout)[-2000:]
        raise PackagingError(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{tail}")
    return match.group(1)
