"""Operators' verdicts back into the line's data: ``redi review export``.

For every judged, not yet exported image of a line (``redi.ops.review``), the kept upload
(``redi.ops.retention``) is written into the line's dataset in its DVC data repository (MVTec-AD
layout), then ``dvc add`` and one git commit make a new data revision, which
``redi pipeline run --revision REV`` trains on:

- ``false_alarm`` -> ``train/good/review_<date>_<request_id>.png``: a normal part the model flagged;
- ``defect`` with the mask accepted -> ``test/<type>/<stem>.png`` and
  ``ground_truth/<type>/<stem>_mask.png`` (the anomaly map above the threshold it was judged with,
  at the image's size);
- ``defect`` without an accepted mask -> ``needs_mask/<type>/<stem>.png``, outside the folders the
  pipeline reads (a defect image without its mask would stop the pipeline's data check): draw the
  mask, then move both into place. The command lists them. A line without ``ground_truth/`` at
  all (image-level labels only) gets its defects straight into ``test/<type>/``.

Safe to repeat: each written image is recorded in the ``exports`` table and never written again,
and a file already there with the same bytes counts as written. The data repository must exist,
be a git + DVC repository and have no uncommitted changes (neither in git nor in the DVC-tracked
data): otherwise nothing is written. A failure after files were written removes them and restores
the ``.dvc`` file, and the database records nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from redi.ops.retention import load_map
from redi.ops.review import ReviewDB, ReviewError, now_iso
from redi.ops.object_store import ObjectStore
from redi.core.utils import atomic_write_bytes

NEEDS_MASK = "needs_mask"


class ExportError(ReviewError):
    """The export cannot run (missing or dirty data repository, failed dvc/git); nothing was kept half-done."""


@dataclass
class ExportResult:
    """What one export did."""

    line: str
    data_repo: str
    data_path: str
    revision: str = ""
    written: list[dict[str, Any]] = field(default_factory=list)
    needs_mask: list[dict[str, Any]] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    changed_after_export: list[dict[str, Any]] = field(default_factory=list)
    committed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's dvc, when run from it
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


def _run(repo: Path, *command: str, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(list(command), cwd=repo, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})})
    except FileNotFoundError as exc:
        raise ExportError(f"`{command[0]}` is not installed: {exc}") from exc
    if done.returncode != 0:
        raise ExportError(f"`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(command))}` failed in "
                          f"{repo}: {(done.stderr or done.stdout).strip()[-1500:]}")
    return done.stdout


def check_data_repo(repo: Path, data_path: str) -> Path:
    """The dataset folder, after checking the repository exists, is git + DVC, and is clean.

    Raises:
        ExportError: what is wrong and what to do; nothing has been written.
    """
    if not repo.is_dir():
        raise ExportError(f"the data repository {repo} does not exist; clone it (git clone ...; dvc pull) or pass "
                          f"the right --data-repo. Nothing was written")
    if not (repo / ".git").exists():
        raise ExportError(f"{repo} is not a git repository (no .git); the export commits a new data revision there. "
                          f"Nothing was written")
    if not (repo / ".dvc").is_dir():
        raise ExportError(f"{repo} is not a DVC repository (no .dvc folder): run `dvc init` there first. Nothing was "
                          f"written")
    dirty = _run(repo, "git", "status", "--porcelain").strip()
    if dirty:
        raise ExportError(f"the data repository {repo} has uncommitted changes:\n{dirty[:800]}\ncommit or stash them "
                          f"first, so the export's commit holds only the judged images. Nothing was written")
    folder = repo / data_path
    if not folder.is_dir():
        hint = ("run `dvc pull` (or `dvc checkout`) there to get it" if (repo / f"{data_path}.dvc").is_file()
                else "check --data-path (the line's folder in MVTec-AD layout, tracked by `dvc add`)")
        raise ExportError(f"the dataset folder {folder} is missing: {hint}. Nothing was written")
    if (repo / f"{data_path}.dvc").is_file():
        status = json.loads(_run(repo, _tool("dvc"), "status", "--json", f"{data_path}.dvc") or "{}")
        if status:
            raise ExportError(f"the DVC-tracked data {folder} differs from {data_path}.dvc ({json.dumps(status)[:400]}):"
                              f" `dvc add {data_path}` and commit, or `dvc checkout`, first. Nothing was written")
    if not (folder / "train" / "good").is_dir():
        raise ExportError(f"{folder} is not a line in MVTec-AD layout (no train/good); check --data-path")
    return folder


def _mask_png(store: ObjectStore, item: dict[str, Any]) -> bytes | None:
    """The mask (0/255) of the map above the threshold, at the image's size; None when empty or gone."""
    from PIL import Image

    from redi.core.visualize import resize_map

    amap = load_map(store, item["map_key"])
    if amap is None:
        return None
    mask = resize_map(amap, (item["height"], item["width"])) > item["threshold"]
    if not mask.any():
        return None
    import io

    buffer = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _plan(item: dict[str, Any], has_ground_truth: bool, store: ObjectStore) -> dict[str, Any]:
    """Where an item goes: ``{status, target, mask, mask_png}`` (paths relative to the dataset)."""
    verdict = item["verdict"]
    stem = f"review_{item['date']}_{item['request_id']}"
    if verdict["verdict"] == "false_alarm":
        return {"status": "written", "target": f"train/good/{stem}.png", "mask": "", "mask_png": None}
    kind = verdict["defect_type"] or "defect"
    if not has_ground_truth:  # image-level line: masks are not expected
        return {"status": "written", "target": f"test/{kind}/{stem}.png", "mask": "", "mask_png": None}
    mask_png = _mask_png(store, item) if verdict["accept_mask"] else None
    if mask_png is None:
        return {"status": NEEDS_MASK, "target": f"{NEEDS_MASK}/{kind}/{stem}.png", "mask": "", "mask_png": None}
    return {"status": "written", "target": f"test/{kind}/{stem}.png", "mask": f"ground_truth/{kind}/{stem}_mask.png",
            "mask_png": mask_png}


def _write(path: Path, data: bytes, created: list[Path]) -> None:
    if path.exists():
        if path.read_bytes() == data:
            return  # an earlier export wrote it and the database did not record it: same file, keep it
        raise ExportError(f"{path} exists with other content; the export never overwrites data. Move it away and "
                          f"export again")
    atomic_write_bytes(path, data)
    created.append(path)


def _rollback(repo: Path, data_path: str, created: list[Path]) -> None:
    for path in created:
        path.unlink(missing_ok=True)
    subprocess.run(["git", "reset", "-q"], cwd=repo, capture_output=True)
    if (repo / f"{data_path}.dvc").is_file():
        subprocess.run(["git", "checkout", "--", f"{data_path}.dvc"], cwd=repo, capture_output=True)


def export_reviews(db: ReviewDB, store: ObjectStore, line: str, data_repo: str | Path, data_path: str = "",
                   by: str = "", push: bool = False) -> ExportResult:
    """Write the line's judged images into its dataset, ``dvc add``, commit; record it (see the module docstring).

    Args:
        data_path: the line's folder inside the repository (default ``data/lines/<line>``).
        by: who exports (the commit's author when git has none configured).
        push: ``dvc push`` the new data to the repository's default remote.

    Raises:
        ExportError: the repository is missing or dirty, or dvc/git failed (then nothing is left written).
    """
    repo = Path(data_repo).resolve()
    data_path = (data_path or f"data/lines/{line}").strip("/")
    folder = check_data_repo(repo, data_path)
    result = ExportResult(line=line, data_repo=str(repo), data_path=data_path)
    result.changed_after_export = db.changed_after_export(line)
    items = db.to_export(line)
    has_ground_truth = (folder / "ground_truth").is_dir()
    created: list[Path] = []
    rows: list[dict[str, Any]] = []
    try:
        for item in items:
            image = store.get_bytes(item["image_key"])
            if image is None:
                db.mark_expired([item["request_id"]])
                result.expired.append(item["request_id"])
                continue
            plan = _plan(item, has_ground_truth, store)
            _write(folder / plan["target"], image, created)
            if plan["mask_png"] is not None:
                _write(folder / plan["mask"], plan["mask_png"], created)
            entry = {"request_id": item["request_id"], "verdict": item["verdict"]["verdict"], "target": plan["target"],
                     "mask": plan["mask"], "status": plan["status"]}
            (result.needs_mask if plan["status"] == NEEDS_MASK else result.written).append(entry)
            rows.append({"request_id": item["request_id"], "verdict_id": item["verdict"]["id"], "line": line,
                         "status": plan["status"], "target": plan["target"], "mask": plan["mask"],
                         "data_repo": str(repo), "data_path": data_path, "by": by or "redi", "at": now_iso()})
        if rows:
            result.revision = _commit(repo, data_path, line, result, by)
            result.committed = True
        else:
            result.revision = _run(repo, "git", "rev-parse", "HEAD").strip()
    except Exception:
        _rollback(repo, data_path, created)
        raise
    for row in rows:
        row["revision"] = result.revision
    db.record_exports(rows)  # after the commit: a failure before it leaves nothing recorded
    if push and result.committed:
        _run(repo, _tool("dvc"), "push", f"{data_path}.dvc")
    return result


def _commit(repo: Path, data_path: str, line: str, result: ExportResult, by: str) -> str:
    """``dvc add`` the dataset, commit its ``.dvc`` file (and .gitignore); return the new revision."""
    _run(repo, _tool("dvc"), "add", data_path)
    paths = [f"{data_path}.dvc"]
    gitignore = Path(data_path).parent / ".gitignore"
    if (repo / gitignore).is_file():
        paths.append(gitignore.as_posix())
    _run(repo, "git", "add", "--", *paths)
    good = sum(1 for w in result.written if w["verdict"] == "false_alarm")
    defects = len(result.written) - good
    message = (f"{line}: review export, {good} false alarm(s) to train/good, {defects} confirmed defect(s) to test/, "
               f"{len(result.needs_mask)} defect(s) needing a mask in {NEEDS_MASK}/")
    env = {}
    if not subprocess.run(["git", "config", "user.name"], cwd=repo, capture_output=True, text=True).stdout.strip():
        who = by or "redi review"
        env = {"GIT_AUTHOR_NAME": who, "GIT_COMMITTER_NAME": who, "GIT_AUTHOR_EMAIL": "redi-review@localhost",
               "GIT_COMMITTER_EMAIL": "redi-review@localhost"}
    _run(repo, "git", "commit", "-q", "-m", message, "--", *paths, env=env)
    return _run(repo, "git", "rev-parse", "HEAD").strip()


__all__ = ["ExportError", "ExportResult", "NEEDS_MASK", "check_data_repo", "export_reviews"]
