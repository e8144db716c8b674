"""What every redi KFP component shares: the image, the config, the work dir, fault records.

The components themselves (one module per stage in this package) are KFP lightweight Python
components: KFP copies each function's source into the step, so each function imports what it
needs inside its body, from this module and from ``redi`` (both installed in the image).
"""

import contextlib
import datetime as _dt
import json
import os
import shutil
import subprocess
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterator

# The component image (components/Dockerfile). Override at compile time with REDI_IMAGE, e.g.
# REDI_IMAGE=registry.example.com/factory/redi:0.1.0 redi pipeline compile
REDI_IMAGE = os.environ.get("REDI_IMAGE", "ghcr.io/redi-project/redi:0.1.0")

COMPONENT_OPTIONS = {"base_image": REDI_IMAGE, "install_kfp_package": False}  # no network at run time


class StageFailed(RuntimeError):
    """A pipeline stage failed; the message names the stage and the cause."""


def make_config(profile: str, config_json: str, data_root: str | Path | None = None):
    """The run's :class:`redi.config.RediConfig`: profile defaults < the line's settings (JSON)."""
    from redi.config import from_dict
    from redi.errors import ConfigError

    try:
        data = json.loads(config_json or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config_json is not valid JSON ({exc}): {config_json[:200]!r}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config_json must hold a mapping, got {type(data).__name__}")
    data = dict(data)
    if profile:
        data["profile"] = profile
    if data_root:
        data.setdefault("data", {})
        data["data"] = {**data["data"], "root": str(data_root)}
    return from_dict(data)


def line_dir(workdir: str, line: str) -> Path:
    """The persistent folder of a line (checkpoints, status records); a temp folder without workdir."""
    if not workdir:
        return Path(tempfile.mkdtemp(prefix=f"redi-{line}-"))
    path = Path(workdir) / line
    path.mkdir(parents=True, exist_ok=True)
    return path


def status_dir(workdir: str, line: str, run_tag: str) -> Path | None:
    """Where the stages of run ``run_tag`` record success or failure (None: not recorded)."""
    if not workdir or not run_tag:
        return None
    return Path(workdir) / line / "status" / run_tag


def _write_status(workdir: str, line: str, run_tag: str, stage: str, record: dict[str, Any]) -> None:
    folder = status_dir(workdir, line, run_tag)
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stage}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(folder / f"{stage}.json")


@contextlib.contextmanager
def stage_guard(stage: str, workdir: str, line: str, run_tag: str) -> Iterator[dict[str, Any]]:
    """Run a stage's body; record its outputs, or turn any error into :class:`StageFailed`.

    The yielded dict collects what the stage wants to report (paths, tags, decisions). On
    failure, ``<workdir>/<line>/status/<run_tag>/<stage>.json`` records the cause so the local
    runner can name it (KFP's own error only names the task).
    """
    record: dict[str, Any] = {"stage": stage, "line": line, "started": _now()}
    try:
        yield record
    except Exception as exc:
        cause = f"{type(exc).__name__}: {exc}"
        record.update({"status": "failed", "cause": cause, "traceback": traceback.format_exc(), "ended": _now()})
        _write_status(workdir, line, run_tag, stage, record)
        raise StageFailed(f"redi stage {stage!r} failed for line {line!r}: {cause}") from exc
    record.update({"status": "succeeded", "ended": _now()})
    _write_status(workdir, line, run_tag, stage, record)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def out_dir(artifact_path: str) -> Path:
    """An output artifact's folder (created)."""
    path = Path(artifact_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def copy_files(src_dir: Path, dest_dir: Path, names: list[str]) -> None:
    """Copy the named files that exist from one folder to another."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, dest_dir / name)


# -- data versioning ----------------------------------------------------------------------------
def fetch_dataset(data_path: str, data_repo: str, data_revision: str, dest: Path) -> dict[str, str]:
    """Copy a line's dataset into ``dest``: a plain folder, a DVC repo's working copy, or a DVC revision.

    - no ``data_repo``: ``data_path`` is a folder on disk (``data_revision`` must be empty);
    - ``data_repo`` is a local folder and no revision: its working copy ``data_repo/data_path``;
    - otherwise ``dvc get <data_repo> <data_path> --rev <data_revision>``: the files of that git
      revision, from the repo's DVC cache or remote (a git URL works on a cluster).

    Returns:
        ``{"source": ..., "revision": ...}`` describing what was fetched.
    """
    from redi.errors import DatasetError

    if dest.exists():
        shutil.rmtree(dest)
    if not data_repo:
        if data_revision:
            raise DatasetError(f"data_revision {data_revision!r} needs data_repo (the DVC repository that "
                               f"versions {data_path}); set both, or leave the revision empty")
        _copy_tree(Path(data_path), dest)
        return {"source": str(Path(data_path).resolve()), "revision": "working copy"}
    if not data_revision and Path(data_repo).is_dir():
        _copy_tree(Path(data_repo) / data_path, dest)
        return {"source": str((Path(data_repo) / data_path).resolve()), "revision": "working copy"}
    command = [_dvc(), "get", data_repo, data_path, "-o", str(dest)]
    if data_revision:
        command += ["--rev", data_revision]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if done.returncode != 0:
        raise DatasetError(f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip()[-1500:]}; "
                           f"check the repository, the path and that revision {data_revision or 'HEAD'} "
                           f"was pushed to the DVC remote (`dvc push`)")
    return {"source": f"{data_repo}:{data_path}", "revision": data_revision or "HEAD"}


def _dvc() -> str:
    import sys

    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else "dvc"


def _copy_tree(src: Path, dest: Path) -> None:
    from redi.errors import DatasetError

    if not src.is_dir():
        raise DatasetError(f"dataset folder {src} does not exist; give the line's folder in MVTec-AD layout "
                           f"(train/good, test/<type>, ground_truth/<type>)")
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".dvc", ".git", "*.dvc"))


# -- reports ------------------------------------------------------------------------------------
def inline_html(index: Path, dest: Path) -> Path:
    """Write ``index.html`` with its local pictures embedded (KFP shows an HTML artifact as one file)."""
    import base64
    import mimetypes
    import re

    html = index.read_text(errors="replace")

    def embed(match: "re.Match[str]") -> str:
        target = index.parent / match.group(2)
        if not target.is_file():
            return match.group(0)
        mime = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        data = base64.b64encode(target.read_bytes()).decode()
        return f'{match.group(1)}"data:{mime};base64,{data}"'

    html = re.sub(r'(src=)"(?!data:|https?:)([^"]+)"', embed, html)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(html)
    return dest


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of a metrics dict (what KFP Metrics can show)."""
    import math

    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out
