"""The production Bento as it is deployed: built by ``redi bento build`` from a store's production
pointer, then served FROM THE BUILT BENTO (``bentoml serve <tag>`` in a folder outside the checkout), so
every file the service reads must be inside the Bento: its modules, the review station's templates.
Also: the Bento's packages are the lock (serving/requirements.lock.txt), and the lock matches the venv.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from http_wait import wait_for_http  # tests/ is on sys.path (rootdir conftest)
from tiny_line import make_line, train_tiny

from redi.ops.model_registry import promote, publish_version
from redi.ops.object_store import LocalStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LINE = "bottle_caps"
KEY = secrets.token_urlsafe(32)  # the service refuses weak keys
SESSION_SECRET = secrets.token_urlsafe(32)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a deployed Bento: nothing points at the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDI_", "PYTHONPATH", "BENTOML_"))}
    return {**env, "BENTOML_DO_NOT_TRACK": "true", **extra}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny line's detector promoted in a local store, and the production Bento built from it."""
    root = tmp_path_factory.mktemp("bento_build")
    data = make_line(root, LINE)
    detector = train_tiny(data, root / "run", LINE)
    store = LocalStore(root / "store")
    publish_version(store, LINE, "v1", {"detector.pt": detector}, {"promote": True, "metrics": {"image_auroc": 0.5}})
    promote(store, LINE, "v1", {"metrics": {"image_auroc": 0.5}}, by="test", reason="fixture")
    home = root / "bentoml"
    done = subprocess.run([str(BIN / "redi"), "bento", "build", "--store-dir", str(root / "store"),
                           "--bentoml-home", str(home)], cwd=root, env=_clean_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tag = next(line.split('"')[3] for line in done.stdout.splitlines() if '"bento_tag"' in line)
    name, version = tag.split(":")
    return {"root": root, "home": home, "tag": tag, "data": data, "path": home / "bentos" / name / version}


def test_bento_carries_every_file_the_service_reads(built: dict) -> None:
    src = built["path"] / "src"
    templates = sorted(p.name for p in (REPO / "serving" / "templates").glob("*.html"))
    assert templates and sorted(p.name for p in (src / "serving" / "templates").glob("*.html")) == templates
    for module in (REPO / "serving").glob("*.py"):
        assert (src / "serving" / module.name).is_file(), module.name
    # every module of the library (the venv's editable install would hide a missing one from a local serve)
    missing = [str(p.relative_to(REPO)) for p in (REPO / "redi").rglob("*.py") if "__pycache__" not in p.parts
               and not (src / p.relative_to(REPO)).is_file()]
    assert not missing, missing
    assert not list(src.rglob("test_*.py")) and not (src / ".venv").exists()


def test_bento_installs_the_locked_packages(built: dict) -> None:
    requirements = (built["path"] / "env" / "python" / "requirements.txt").read_text()
    pins = {line.split("==")[0].lower(): line.split("==")[1] for line in requirements.splitlines()
            if "==" in line and not line.startswith("#")}
    import torch
    assert pins["torch"] == torch.__version__.split("+")[0] and pins["bentoml"] == "1.4.40"
    assert "pandas" in pins and int(pins["pandas"].split(".")[0]) < 3
    assert all(line.startswith("#") or "==" in line for line in requirements.splitlines() if line.strip())
    check = subprocess.run([sys.executable, str(REPO / "containers" / "lock_bento_requirements.py"), "--check"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr + check.stdout


def test_built_bento_serves_review_station_and_metrics(built: dict) -> None:
    port = _free_port()
    run_dir = built["root"] / "serve"  # not the checkout: only the Bento's own files can be found
    run_dir.mkdir()
    env = _clean_env(BENTOML_HOME=str(built["home"]), REDI_API_KEY=KEY, REDI_SESSION_SECRET=SESSION_SECRET,
                     REDI_DEVICE="cpu", REDI_LOG_DIR=str(run_dir / "logs"))
    log = built["root"] / "serve.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([str(BIN / "bentoml"), "serve", built["tag"], "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=run_dir, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for_http(f"{url}/readyz", proc, 240), f"the built Bento did not become ready:\n{log.read_text()[-3000:]}"
        review = requests.get(f"{url}/review/", timeout=30)  # not logged in: the login page, from its template
        assert review.status_code == 200, (review.status_code, review.text[-1500:])
        assert "text/html" in review.headers["content-type"] and "<form" in review.text
        assert "/review/login" in review.url
        metrics = requests.get(f"{url}/metrics", timeout=30)
        assert metrics.status_code == 200 and "redi_" in metrics.text
        meta = requests.post(f"{url}/metadata", json={}, headers={"X-API-Key": KEY}, timeout=30).json()
        assert meta["source"] == "bento" and meta["lines"][LINE]["model_version"] == "v1"
        good = (built["data"] / "test" / "good" / "000.png").read_bytes()
        answer = requests.post(f"{url}/predict", files={"image": ("a.png", good)}, data={"line": LINE},
                               headers={"X-API-Key": KEY}, timeout=120)
        assert answer.status_code == 200, answer.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
