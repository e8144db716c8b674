"""``redi review export`` killed half-way, and two exports at once, in a real git + DVC repository.

The export runs in its own process; a git hook in the data repository kills that process with
SIGKILL at the exact step under test (``post-commit``: the commit is made, nothing recorded yet;
``pre-commit``: files written and ``dvc add``-ed, no commit), or holds it inside its commit while a
second export starts. The next export must finish or undo the killed one (no second commit, the
images recorded and no longer pinned by retention), and a second export must be refused while one
runs, leaving one commit and one record per image. Each runs with the review database on SQLite and on
a real PostgreSQL.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from redi.core.images import load_rgb
from redi.ops.object_store import LocalStore
from redi.ops.retention import RetainedItem, Retainer, RetentionPolicy, enforce_limits
from redi.ops.review import ReviewDB
from redi.ops.review_export import ExportError, export_reviews

LINE = "bottle_caps"
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc") if (BIN / "dvc").is_file() else shutil.which("dvc")
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}
IDS = ("fa1", "dm1", "dn1")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(DVC is None or shutil.which("git") is None, reason="needs dvc and git")]

# the export in its own process; it writes its pid first so a git hook can kill it
EXPORT_PROCESS = """
import os, sys
from pathlib import Path
Path(sys.argv[5]).write_text(str(os.getpid()))
from redi.ops.object_store import LocalStore
from redi.ops.review import ReviewDB
from redi.ops.review_export import export_reviews
export_reviews(ReviewDB(sys.argv[1]), LocalStore(sys.argv[2]), sys.argv[3], sys.argv[4], by="process")
"""


KILL_EXPORT = 'echo $PPID > {tmp}/git.pid\nkill -KILL "$(cat {tmp}/export.pid)"\n'  # a hook: git's pid, then the kill


def sh(cwd: Path, *args: str) -> str:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture()
def station(tmp_path: Path, demo_line_root: Path, review_db_url: str) -> dict:
    """Three kept, judged images (a false alarm, a defect with its mask, one without) and a data repository;
    the review database on SQLite and on PostgreSQL (``review_db_url``)."""
    store, db_url = LocalStore(tmp_path / "store"), review_db_url
    db = ReviewDB(db_url)
    retainer = Retainer(store, RetentionPolicy(max_days=0, max_per_line=0), index=db)
    now = _dt.datetime.now(_dt.timezone.utc)
    images = [demo_line_root / "test" / kind / "000.png" for kind in ("good", "scratch", "hole")]
    for i, (request_id, path) in enumerate(zip(IDS, images)):
        amap = np.zeros((32, 32), np.float32)
        amap[4:12, 20:28] = 2.5
        retainer.offer(RetainedItem(request_id, LINE, now + _dt.timedelta(seconds=i), "flagged", load_rgb(path), amap,
                                    {"score": 3.0, "threshold": 1.0, "anomalous": True, "decision": "anomalous",
                                     "model_version": "v1", "model_tag": "t", "latency_ms": 1.0}))
    assert retainer.join(60) and retainer.stored == len(IDS)
    db.add_verdict("fa1", "false_alarm", by="ann")
    db.add_verdict("dm1", "defect", by="ann", defect_type="scratch", accept_mask=True)
    db.add_verdict("dn1", "defect", by="ann", defect_type="hole")

    repo = tmp_path / "data-repo"
    shutil.copytree(demo_line_root, repo / "data" / "lines" / LINE)
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    sh(repo, DVC, "config", "core.analytics", "false")
    sh(repo, DVC, "add", "-q", f"data/lines/{LINE}")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "the line's data")
    return {"store": store, "db": db, "db_url": db_url, "repo": repo, "tmp": tmp_path}


def install_hook(repo: Path, name: str, body: str) -> Path:
    hook = repo / ".git" / "hooks" / name
    hook.write_text("#!/bin/sh\n" + body)
    hook.chmod(0o755)
    return hook


def start_export(station: dict) -> subprocess.Popen:
    pid_file = station["tmp"] / "export.pid"
    return subprocess.Popen([sys.executable, "-c", EXPORT_PROCESS, station["db_url"], str(station["store"].root), LINE,
                             str(station["repo"]), str(pid_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_gone(pid_file: Path, timeout: float = 60.0) -> None:
    """Wait until the git process that ran the hook (its pid in ``pid_file``) has exited."""
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"git process {pid} still running after {timeout} s")


def commits(repo: Path) -> int:
    return int(sh(repo, "git", "rev-list", "--count", "HEAD"))


def head(repo: Path) -> str:
    return sh(repo, "git", "rev-parse", "HEAD").strip()


def assert_clean(repo: Path) -> None:
    assert sh(repo, "git", "status", "--porcelain").strip() == ""
    assert json.loads(sh(repo, DVC, "status", "--json", f"data/lines/{LINE}.dvc") or "{}") == {}


def test_export_killed_between_commit_and_record_is_finished_by_the_next(station: dict) -> None:
    store, db, repo, tmp = station["store"], station["db"], station["repo"], station["tmp"]
    before = commits(repo)
    hook = install_hook(repo, "post-commit", KILL_EXPORT.format(tmp=tmp))
    process = start_export(station)
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, "the hook should have killed the export after its commit"
    wait_gone(tmp / "git.pid")
    hook.unlink()
    killed_commit = head(repo)
    assert commits(repo) == before + 1  # the commit was made...
    assert db.exports(LINE) == [] and db.pinned_ids(LINE) == set(IDS)  # ...and nothing recorded: still pinned
    keep_one = RetentionPolicy(max_days=0, max_per_line=1)
    assert enforce_limits(store, LINE, keep_one, index=db) == []

    result = export_reviews(db, store, LINE, repo, by="ann")

    assert commits(repo) == before + 1 and head(repo) == killed_commit, "no second commit of the same images"
    assert [(r["action"], r["revision"], r["recorded"]) for r in result.recovered] == [("recorded", killed_commit, 3)]
    assert not result.committed and result.revision == killed_commit
    assert {e["request_id"]: e["revision"] for e in db.exports(LINE)} == dict.fromkeys(IDS, killed_commit)
    assert db.pinned_ids(LINE) == set()
    assert len(enforce_limits(store, LINE, keep_one, index=db)) == 2  # retention may delete exported images now
    assert_clean(repo)
    again = export_reviews(db, store, LINE, repo)
    assert not again.committed and again.recovered == [] and len(db.exports(LINE)) == 3


def test_export_killed_before_its_commit_is_undone_by_the_next(station: dict) -> None:
    store, db, repo, tmp = station["store"], station["db"], station["repo"], station["tmp"]
    before, base = commits(repo), head(repo)
    hook = install_hook(repo, "pre-commit",
                        KILL_EXPORT.format(tmp=tmp) + "exit 1\n")
    process = start_export(station)
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    wait_gone(tmp / "git.pid")
    hook.unlink()
    assert head(repo) == base and sh(repo, "git", "status", "--porcelain").strip()  # half-done: .dvc staged

    result = export_reviews(db, store, LINE, repo, by="ann")

    assert [r["action"] for r in result.recovered] == ["rolled_back"]
    assert result.committed and commits(repo) == before + 1
    assert {e["request_id"]: e["revision"] for e in db.exports(LINE)} == dict.fromkeys(IDS, result.revision)
    assert db.pinned_ids(LINE) == set()
    assert_clean(repo)


def test_second_export_is_refused_while_one_runs(station: dict) -> None:
    store, db, repo, tmp = station["store"], station["db"], station["repo"], station["tmp"]
    before = commits(repo)
    reached, go = tmp / "reached", tmp / "go"
    install_hook(repo, "pre-commit",  # hold the first export inside its commit until the test says go
                 f'touch {reached}\ni=0\nwhile [ ! -e {go} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n')
    first = start_export(station)
    try:
        deadline = time.monotonic() + 240
        while not reached.exists():
            assert first.poll() is None, f"the first export ended early: {first.communicate()}"
            assert time.monotonic() < deadline, "the first export never reached its commit"
            time.sleep(0.1)
        with pytest.raises(ExportError, match=r"another `redi review export` is running in .* \(pid \d+") as refused:
            export_reviews(db, store, LINE, repo, by="bob")
        assert "wait until it has finished" in str(refused.value)
    finally:
        go.touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    (repo / ".git" / "hooks" / "pre-commit").unlink()

    assert commits(repo) == before + 1
    exports = db.exports(LINE)
    assert sorted(e["request_id"] for e in exports) == sorted(IDS)  # once each
    assert {e["revision"] for e in exports} == {head(repo)} and {e["by"] for e in exports} == {"process"}
    assert_clean(repo)
    later = export_reviews(db, store, LINE, repo, by="bob")  # after it: runs, nothing new
    assert not later.committed and later.revision == head(repo)


def test_repository_wedged_by_an_export_without_journal_is_recorded_at_head(station: dict) -> None:
    """Versions before the journal left the commit and no record; the images at HEAD are recorded, no new commit."""
    store, db, repo, tmp = station["store"], station["db"], station["repo"], station["tmp"]
    hook = install_hook(repo, "post-commit", KILL_EXPORT.format(tmp=tmp))
    process = start_export(station)
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    wait_gone(tmp / "git.pid")
    hook.unlink()
    shutil.rmtree(repo / ".git" / "redi-export", ignore_errors=True)  # as older versions left it: no journal
    wedged, count = head(repo), commits(repo)

    result = export_reviews(db, store, LINE, repo, by="ann")

    assert [(r["action"], r["revision"]) for r in result.recovered] == [("recorded_at_head", wedged)]
    assert commits(repo) == count and not result.committed
    assert {e["request_id"]: e["revision"] for e in db.exports(LINE)} == dict.fromkeys(IDS, wedged)
    assert db.pinned_ids(LINE) == set()
    assert_clean(repo)


def test_the_cli_says_how_an_interrupted_export_was_settled():
    """`redi review export` names what it settled before its own export, not just "nothing new"."""
    from redi.cli.review import _recovered_line

    recorded = _recovered_line({"action": "recorded", "export_id": "e1", "revision": "abc", "recorded": 3})
    assert "abc" in recorded and "3 image(s)" in recorded and "no second commit" in recorded
    assert "removed the 2 file(s)" in _recovered_line({"action": "rolled_back", "export_id": "e2", "removed": 2})
    assert "revision def" in _recovered_line({"action": "recorded_at_head", "revision": "def", "recorded": 1})
