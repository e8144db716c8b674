"""Operators' verdicts back into the line's data: ``redi review export``.

For every judged, not yet exported image of a line (``redi.ops.review``), the kept upload
(``redi.ops.retention``) is written into the line's dataset in its DVC data repository (MVTec-AD
layout), then ``dvc add`` and one git commit make a new data revision, which
``redi pipeline run --revision REV`` trains on:

- ``false_alarm`` -> ``train/good/review_<date>_<request_id>.png``: a normal part the model flagged;
- ``defect`` with the mask accepted -> ``test/<type>/<stem>.png`` and
  ``ground_truth/<type>/<stem>_mask.png`` (the anomaly map above the threshold it was judged with,
  at the image's size);
- ``defect`` with a mask drawn on the review page -> ``test/<type>/<stem>.png`` and that mask as
  ``ground_truth/<type>/<stem>_mask.png``;
- ``defect`` without an accepted or drawn mask -> ``needs_mask/<type>/<stem>.png``, outside the folders the
  pipeline reads (a defect image without its mask would stop the pipeline's data check): draw the
  mask, then move both into place. The command lists them. A line without ``ground_truth/`` at
  all (image-level labels only) gets its defects straight into ``test/<type>/``;
- ``bad_image`` (not a part: a camera glitch, an empty belt) -> nowhere: never training data
  (``ReviewDB.to_export`` leaves it out).

Safe to repeat: each written image is recorded in the ``exports`` table and never written again,
and a file already there with the same bytes counts as written. The data repository must exist,
be a git + DVC repository and have no uncommitted changes (neither in git nor in the DVC-tracked
data): otherwise nothing is written. A failure after files were written removes them and restores
the ``.dvc`` file, and the database records nothing.

Resumable after a crash, and one at a time:

- An export holds an exclusive lock on the repository (``flock`` on ``<git dir>/redi-export.lock``,
  released by the kernel when the process dies); a second export into the same repository is
  refused at once with :class:`ExportLocked`, naming the running one.
- Before it writes anything, an export starts a journal (``<git dir>/redi-export/journal.jsonl``,
  each entry fsync-ed): its id, then each file before it is created, then the rows it will record,
  before ``dvc add`` and the commit. The commit message carries the trailer
  ``Redi-Export-Id: <id>``. The journal is removed once the rows are recorded.
- The next export into the repository first settles a journal left by a killed one: if HEAD's
  history holds the commit with that id, its rows are recorded with that revision (no second
  commit, and the images are no longer pinned by retention); otherwise the files it created are
  removed and the ``.dvc`` file restored, and the export starts afresh.
- Without a journal (a repository wedged by an older version), images already committed at HEAD
  leave nothing to commit: they are recorded with HEAD instead of failing with "nothing to commit".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from redi.ops.retention import load_map
from redi.ops.review import ReviewDB, ReviewError, now_iso
from redi.ops.object_store import ObjectStore
from redi.core.utils import atomic_write_bytes

NEEDS_MASK = "needs_mask"
EXPORT_TRAILER = "Redi-Export-Id"  # in each export commit's message: how a resumed export finds its commit
LOCK_NAME = "redi-export.lock"  # inside the repository's git dir (never part of the working tree)
JOURNAL_DIR = "redi-export"
LOG = logging.getLogger(__name__)


class ExportError(ReviewError):
    """The export cannot run (missing or dirty data repository, failed dvc/git); nothing was kept half-done."""


class ExportLocked(ExportError):
    """Another export holds the data repository's lock."""

    status = 409


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
    # earlier exports this one settled: {export_id, line, action: recorded | rolled_back | recorded_at_head, ...}
    recovered: list[dict[str, Any]] = field(default_factory=list)

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


def _check_is_git_repo(repo: Path) -> None:
    if not repo.is_dir():
        raise ExportError(f"the data repository {repo} does not exist; clone it (git clone ...; dvc pull) or pass "
                          f"the right --data-repo. Nothing was written")
    if not (repo / ".git").exists():
        raise ExportError(f"{repo} is not a git repository (no .git); the export commits a new data revision there. "
                          f"Nothing was written")


def check_data_repo(repo: Path, data_path: str) -> Path:
    """The dataset folder, after checking the repository exists, is git + DVC, and is clean.

    Raises:
        ExportError: what is wrong and what to do; nothing has been written.
    """
    _check_is_git_repo(repo)
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
    if verdict["verdict"] not in ("false_alarm", "defect"):  # bad_image: not a part, never training data
        raise ExportError(f"request {item['request_id']} is judged {verdict['verdict']!r}: it is never exported")
    if verdict["verdict"] == "false_alarm":
        return {"status": "written", "target": f"train/good/{stem}.png", "mask": "", "mask_png": None}
    kind = verdict["defect_type"] or "defect"
    if not has_ground_truth:  # image-level line: masks are not expected
        return {"status": "written", "target": f"test/{kind}/{stem}.png", "mask": "", "mask_png": None}
    if verdict.get("mask_key"):  # drawn by the operator on the review page: it wins over the thresholded map
        mask_png = store.get_bytes(verdict["mask_key"])
    else:
        mask_png = _mask_png(store, item) if verdict["accept_mask"] else None
    if mask_png is None:
        return {"status": NEEDS_MASK, "target": f"{NEEDS_MASK}/{kind}/{stem}.png", "mask": "", "mask_png": None}
    return {"status": "written", "target": f"test/{kind}/{stem}.png", "mask": f"ground_truth/{kind}/{stem}_mask.png",
            "mask_png": mask_png}


def _write(path: Path, data: bytes, created: list[Path], journal: "_Journal") -> None:
    if path.exists():
        if path.read_bytes() == data:
            return  # an earlier export wrote it and the database did not record it: same file, keep it
        raise ExportError(f"{path} exists with other content; the export never overwrites data. Move it away and "
                          f"export again")
    journal.note_created(path)  # before the file exists: a kill right after leaves it listed, never unlisted
    atomic_write_bytes(path, data)
    created.append(path)


def _in_head(repo: Path, path: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"HEAD:{path}"], cwd=repo, capture_output=True).returncode == 0


def _undo_files(repo: Path, data_path: str, created: list[Path]) -> None:
    """Remove the files an unfinished export created; give its ``.dvc`` file and .gitignore their committed state."""
    for path in created:
        path.unlink(missing_ok=True)
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # atomic_write's temporary, when killed mid-write
            leftover.unlink(missing_ok=True)
    for staged in (f"{data_path}.dvc", (Path(data_path).parent / ".gitignore").as_posix()):
        if _in_head(repo, staged):
            subprocess.run(["git", "reset", "-q", "--", staged], cwd=repo, capture_output=True)
            subprocess.run(["git", "checkout", "HEAD", "--", staged], cwd=repo, capture_output=True)


# ----------------------------------------------------------------------------- lock and journal
@contextlib.contextmanager
def _repo_lock(repo: Path, git_dir: Path, line: str) -> Iterator[None]:
    """Hold the data repository's export lock (flock: the kernel releases it when the process dies).

    Raises:
        ExportLocked: another export holds it; its pid, host, line and start are in the message.
    """
    fd = os.open(git_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "it is just starting"
            raise ExportLocked(f"another `redi review export` is running in {repo} ({holder}); wait until it has "
                               f"finished, then run this export again. Nothing was written") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, line {line}, since {now_iso()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Journal:
    """The export in progress, on disk before each of its steps (see the module docstring).

    JSON lines, each fsync-ed before the step it announces: ``{"begin": {...}}``, then
    ``{"created": <path in the repository>}`` per new file, then ``{"commit": [<export rows>]}``
    before ``dvc add`` and the commit. A last line cut short by a kill announced a step that never began.
    """

    def __init__(self, repo: Path, git_dir: Path) -> None:
        self.repo = repo
        self.folder = git_dir / JOURNAL_DIR
        self.path = self.folder / "journal.jsonl"

    def begin(self, header: dict[str, Any]) -> None:
        """Start a fresh journal (an export id, line, data path, HEAD, who, when)."""
        self.folder.mkdir(exist_ok=True)
        self._append({"begin": header}, mode=os.O_TRUNC)
        _fsync_dir(self.folder)

    def note_created(self, path: Path) -> None:
        """Record a file before it is created (so an unfinished export's files can be removed)."""
        self._append({"created": path.relative_to(self.repo).as_posix()})

    def note_commit(self, rows: list[dict[str, Any]]) -> None:
        """Record the rows to record once committed, before ``dvc add`` and the commit."""
        self._append({"commit": rows})

    def _append(self, entry: dict[str, Any], mode: int = os.O_APPEND) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | mode, 0o644)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self) -> dict[str, Any] | None:
        """The unfinished export: the header plus ``created`` (paths) and ``rows`` (None before the commit step)."""
        if not self.path.is_file():
            return None
        state: dict[str, Any] | None = None
        for raw in self.path.read_bytes().splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue  # cut short by a kill: the step it announced never began
            if "begin" in entry:
                state = {**entry["begin"], "created": [], "rows": None}
            elif state is not None and "created" in entry:
                state["created"].append(entry["created"])
            elif state is not None and "commit" in entry:
                state["rows"] = entry["commit"]
        return state

    def remove(self) -> None:
        """The export is settled: drop the journal."""
        self.path.unlink(missing_ok=True)
        if self.folder.is_dir():
            _fsync_dir(self.folder)


def _find_export_commit(repo: Path, export_id: str) -> str:
    """The commit in HEAD's history whose message names ``export_id`` ("" when none)."""
    try:
        found = _run(repo, "git", "log", "--format=%H", "--fixed-strings", f"--grep={EXPORT_TRAILER}: {export_id}",
                     "HEAD")
    except ExportError:
        return ""
    return found.split()[0] if found.split() else ""


def _record(db: ReviewDB, rows: list[dict[str, Any]], revision: str) -> int:
    """Record the rows not yet recorded with ``revision``; return how many were new."""
    recorded: set[str] = set()
    for line in {row["line"] for row in rows}:
        recorded |= {e["request_id"] for e in db.exports(line)}
    fresh = [{**row, "revision": revision} for row in rows if row["request_id"] not in recorded]
    if fresh:
        db.record_exports(fresh)
    return len(fresh)


def _settle(db: ReviewDB, repo: Path, journal: _Journal) -> dict[str, Any] | None:
    """Finish or undo the export a journal describes (see the module docstring); None when there is none."""
    state = journal.load()
    if state is None:
        return None
    revision = _find_export_commit(repo, state["export_id"]) if state["rows"] is not None else ""
    if revision:
        recorded = _record(db, state["rows"], revision)
        outcome = {"export_id": state["export_id"], "line": state["line"], "action": "recorded",
                   "revision": revision, "recorded": recorded}
        LOG.warning("export %s of line %s was committed as %s but not recorded (the process was stopped); "
                    "recorded %d image(s) now", state["export_id"], state["line"], revision, recorded)
    else:
        _undo_files(repo, state["data_path"], [repo / path for path in state["created"]])
        outcome = {"export_id": state["export_id"], "line": state["line"], "action": "rolled_back",
                   "removed": len(state["created"])}
        LOG.warning("export %s of line %s stopped before its commit; removed the %d file(s) it had written",
                    state["export_id"], state["line"], len(state["created"]))
    journal.remove()
    return outcome


# ----------------------------------------------------------------------------- the export
def export_reviews(db: ReviewDB, store: ObjectStore, line: str, data_repo: str | Path, data_path: str = "",
                   by: str = "", push: bool = False) -> ExportResult:
    """Write the line's judged images into its dataset, ``dvc add``, commit; record it (see the module docstring).

    An unfinished export left in the repository (a killed process) is settled first and reported
    in ``recovered``.

    Args:
        data_path: the line's folder inside the repository (default ``data/lines/<line>``).
        by: who exports (the commit's author when git has none configured).
        push: ``dvc push`` the line's data to the repository's default remote.

    Raises:
        ExportLocked: another export is running in the repository (nothing was written).
        ExportError: the repository is missing or dirty, or dvc/git failed (then nothing is left written).
    """
    repo = Path(data_repo).resolve()
    data_path = (data_path or f"data/lines/{line}").strip("/")
    _check_is_git_repo(repo)
    git_dir = Path(_run(repo, "git", "rev-parse", "--absolute-git-dir").strip())
    with _repo_lock(repo, git_dir, line):
        journal = _Journal(repo, git_dir)
        recovered = _settle(db, repo, journal)
        result = _export_locked(db, store, line, repo, data_path, by, journal)
        if recovered is not None:
            result.recovered.insert(0, recovered)
        if push:  # also when nothing is new: a revision a settled export recorded must reach the remote too
            _run(repo, _tool("dvc"), "push", f"{data_path}.dvc")
    return result


def _export_locked(db: ReviewDB, store: ObjectStore, line: str, repo: Path, data_path: str, by: str,
                   journal: _Journal) -> ExportResult:
    """The export itself, under the repository's lock with no unfinished export left."""
    folder = check_data_repo(repo, data_path)
    result = ExportResult(line=line, data_repo=str(repo), data_path=data_path)
    result.changed_after_export = db.changed_after_export(line)
    items = db.to_export(line)
    head = _run(repo, "git", "rev-parse", "HEAD").strip()
    if not items:
        result.revision = head
        return result
    export_id = uuid.uuid4().hex
    journal.begin({"export_id": export_id, "line": line, "data_path": data_path, "head": head, "by": by,
                   "started": now_iso()})
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
            _write(folder / plan["target"], image, created, journal)
            if plan["mask_png"] is not None:
                _write(folder / plan["mask"], plan["mask_png"], created, journal)
            entry = {"request_id": item["request_id"], "verdict": item["verdict"]["verdict"], "target": plan["target"],
                     "mask": plan["mask"], "status": plan["status"]}
            (result.needs_mask if plan["status"] == NEEDS_MASK else result.written).append(entry)
            rows.append({"request_id": item["request_id"], "verdict_id": item["verdict"]["id"], "line": line,
                         "status": plan["status"], "target": plan["target"], "mask": plan["mask"],
                         "data_repo": str(repo), "data_path": data_path, "by": by or "redi", "at": now_iso()})
        if rows:
            journal.note_commit(rows)
            revision = _commit(repo, data_path, line, result, by, export_id)
            result.committed = revision is not None
            result.revision = revision or head
            if revision is None:
                result.recovered.append({"export_id": export_id, "line": line, "action": "recorded_at_head",
                                         "revision": head, "recorded": len(rows)})
        else:
            result.revision = head
    except BaseException:
        _settle_after_failure(db, repo, journal)
        raise
    try:
        _record(db, rows, result.revision)  # after the commit: a failure before it leaves nothing recorded
    except Exception as exc:
        raise ExportError(f"the data revision {result.revision} was committed, but recording it in the review "
                          f"database failed ({exc}); run the export again: it finds the commit "
                          f"({EXPORT_TRAILER}: {export_id}) and records it, without a second commit") from exc
    journal.remove()
    return result


def _settle_after_failure(db: ReviewDB, repo: Path, journal: _Journal) -> None:
    """After a failed step: undo the files (no commit made) or record (commit made); else leave it to the next run."""
    try:
        _settle(db, repo, journal)
    except Exception as exc:  # noqa: BLE001 - the original error is what the caller must see
        LOG.error("could not settle the failed export in %s (%s); the next export settles it", repo, exc)


def _commit(repo: Path, data_path: str, line: str, result: ExportResult, by: str, export_id: str) -> str | None:
    """``dvc add`` the dataset, commit its ``.dvc`` file (and .gitignore); return the new revision.

    None when nothing changed: HEAD already holds exactly these files (committed by an export that
    was stopped before recording, in a version without the journal).
    """
    _run(repo, _tool("dvc"), "add", data_path)
    paths = [f"{data_path}.dvc"]
    gitignore = Path(data_path).parent / ".gitignore"
    if (repo / gitignore).is_file():
        paths.append(gitignore.as_posix())
    _run(repo, "git", "add", "--", *paths)
    if subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=repo).returncode == 0:
        LOG.warning("line %s: the data at HEAD already holds the exported images (an earlier export committed them "
                    "and was stopped before recording); recording them with HEAD", line)
        return None
    good = sum(1 for w in result.written if w["verdict"] == "false_alarm")
    defects = len(result.written) - good
    message = (f"{line}: review export, {good} false alarm(s) to train/good, {defects} confirmed defect(s) to test/, "
               f"{len(result.needs_mask)} defect(s) needing a mask in {NEEDS_MASK}/\n\n{EXPORT_TRAILER}: {export_id}")
    env = {}
    if not subprocess.run(["git", "config", "user.name"], cwd=repo, capture_output=True, text=True).stdout.strip():
        who = by or "redi review"
        env = {"GIT_AUTHOR_NAME": who, "GIT_COMMITTER_NAME": who, "GIT_AUTHOR_EMAIL": "redi-review@localhost",
               "GIT_COMMITTER_EMAIL": "redi-review@localhost"}
    _run(repo, "git", "commit", "-q", "-m", message, "--", *paths, env=env)
    return _run(repo, "git", "rev-parse", "HEAD").strip()


__all__ = ["EXPORT_TRAILER", "ExportError", "ExportLocked", "ExportResult", "NEEDS_MASK", "check_data_repo",
           "export_reviews"]
