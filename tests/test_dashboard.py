"""The Evidently dashboard of a line renders in a real (headless Chromium) browser.

Needs Debian's ``chromium`` (``apt-get install -y chromium``); skipped with that reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from http_wait import wait_for_http  # tests/ is on sys.path (rootdir conftest)
import requests
from PIL import Image

from redi.ops.monitoring import ProductionLog, embedding_columns, feature_columns, run_monitor

pytestmark = pytest.mark.slow
LINE = "bottle_caps"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _rows(rng: np.random.Generator, n: int, shift: float = 0.0) -> pd.DataFrame:
    """Synthetic monitoring rows (the dashboard only needs runs, not a detector)."""
    data = {"brightness": rng.normal(0.4 + shift, 0.03, n), "contrast": rng.normal(0.1, 0.01, n),
            "sharpness": rng.normal(50, 5, n), "anomaly_score": rng.normal(2.0, 0.05, n)}
    data.update({c: rng.normal(0, 0.3, n) for c in embedding_columns()})
    return pd.DataFrame(data)[feature_columns()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_dashboard_renders_in_headless_chromium(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reference = tmp_path / "reference.csv"
    _rows(rng, 40).assign(model_version="v1").to_csv(reference, index=False)
    workspace = tmp_path / "workspace"
    log = ProductionLog(tmp_path / "logs")
    results = []
    for shift in (0.0, 0.15):  # two runs: a history, the second one drifted
        for row in _rows(rng, 25, shift).to_dict("records"):
            log.append({"line": LINE, "model_version": "v1", **row})
        results.append(run_monitor(LINE, tmp_path / "logs", reference, tmp_path / "out", workspace=workspace))
    assert results[1].data_drift and results[0].workspace_project == results[1].workspace_project
    project = results[0].workspace_project

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "evidently"), "ui", "--workspace", str(workspace),
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "DO_NOT_TRACK": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for_http(f"{url}/api/projects", server, 90), "evidently ui did not start"
        projects = requests.get(f"{url}/api/projects", timeout=10).json()
        assert any(p["name"] == f"redi-{LINE}" for p in projects)
        snapshots = requests.get(f"{url}/api/projects/{project}/snapshots", timeout=10)
        assert snapshots.status_code == 200 and len(snapshots.json()) == 2

        shot, profile = tmp_path / "dashboard.png", tmp_path / "chromium-profile"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,1000", "--virtual-time-budget=20000"]
        page = f"{url}/projects/{project}"
        dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
        assert f"redi-{LINE}" in dom.stdout and "Embedding drift" in dom.stdout, dom.stdout[-2000:]
        subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", page], capture_output=True, timeout=120)
        pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
        assert pixels.shape == (1000, 1400)
        assert pixels.std() > 10, "the dashboard screenshot is blank"
        assert len(np.unique(pixels)) > 50, "the dashboard screenshot has almost no detail"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
