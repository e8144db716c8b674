"""``bentoml serve`` serves any registered method through the detector protocol: a PatchCore line,
a fused line and a strip line on its own non-square canvas (``data.aspect=native``) from one store
answer /predict with the scores of the detector in process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import base64
import io

import numpy as np
import pytest
import requests
from http_wait import wait_for_http  # tests/ is on sys.path (rootdir conftest)
from test_serving import BENTOML, KEY, REPO, SESSION_SECRET, _free_port
from PIL import Image
from tiny_line import make_line, make_wide_line

from redi.core.config import profile_config
from redi.core.images import decode_rgb
from redi.methods.base import load_detector
from redi.ops.model_registry import promote, publish_version
from redi.ops.object_store import LocalStore

pytestmark = pytest.mark.slow
STRIP_LINE = "strip_line"
LINES = {"pc_line": "patchcore", "fused_line": "fused", STRIP_LINE: "patchcore_native"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from redi.workflow.stages import train_all

    root = tmp_path_factory.mktemp("methods")
    data = make_line(root, "bottle_caps")
    cfg = profile_config("tiny")
    cfg.train.recover.epochs = cfg.train.discriminate.epochs = 1
    cfg.train.device, cfg.model.candidates = "cpu", ["redi", "patchcore", "fused"]
    paths = train_all(data, root / "run", cfg, line="bottle_caps")
    store = LocalStore(root / "store")
    strips = make_wide_line(root / "wide", "bottle_caps")
    cfg.data.image_size, cfg.data.aspect, cfg.model.candidates, cfg.model.method = 64, "native", [], "patchcore"
    paths[f"candidate_{LINES[STRIP_LINE]}"] = train_all(strips, root / "strip_run", cfg, line=STRIP_LINE)["detector"]
    for line, method in LINES.items():
        publish_version(store, line, "v1", {"detector.pt": paths[f"candidate_{method}"]},
                        {"promote": True, "metrics": {"image_auroc": 0.5}})
        promote(store, line, "v1", {"metrics": {"image_auroc": 0.5}}, by="test", reason="fixture")
    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "REDI_API_KEY": KEY, "REDI_SESSION_SECRET": SESSION_SECRET, "REDI_LOG_DIR": str(root / "logs"),
           "REDI_DEVICE": "cpu", "PYTHONPATH": str(REPO),
           "REDI_STORE_DIR": str(root / "store"), "REDI_MODEL_CACHE": str(root / "cache")}
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(BENTOML), "serve", "serving.service:RediService", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_for_http(f"{url}/readyz", proc, 180):
            pytest.fail(f"bentoml serve did not become ready:\n{(root / 'server.log').read_text()[-3000:]}")
        yield {"url": url, "data": data, "strips": strips, "paths": paths}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@pytest.mark.parametrize("line", sorted(LINES))
def test_each_method_serves_its_in_process_scores(served, line):
    detector = load_detector(served["paths"][f"candidate_{LINES[line]}"])
    images = sorted((served["strips" if line == STRIP_LINE else "data"] / "test").glob("*/*.png"))[:4]
    for image in images:
        content = image.read_bytes()
        response = requests.post(f"{served['url']}/predict", files={"image": ("part.png", content)},
                                 data={"line": line}, headers={"X-API-Key": KEY}, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        expected = float(detector.predict(detector.preprocess([decode_rgb(content)])).score[0])
        assert abs(body["anomaly_score"] - expected) < 1e-4, (line, body["anomaly_score"], expected)
        assert body["anomalous"] == bool(expected > float(detector.threshold))


def test_a_strip_line_serves_its_own_canvas_and_maps_back_to_the_strip(served):
    """The service preprocesses for the model's own (H, W) and says so in /metadata; its map and
    overlay come at that canvas (64 x 192, the strip's shape), its boxes in the strip's pixels."""
    meta = requests.post(f"{served['url']}/metadata", json={}, headers={"X-API-Key": KEY}, timeout=30).json()
    entry = meta["lines"][STRIP_LINE]
    assert entry["input_hw"] == [64, 192] and entry["aspect"] == "native"
    path = sorted((served["strips"] / "test").glob("*/*.png"))[-1]
    response = requests.post(f"{served['url']}/predict", files={"image": ("part.png", path.read_bytes())},
                             data={"line": STRIP_LINE, "return_map": "true", "return_overlay": "true",
                                   "return_regions": "true", "min_region_area": "1"},
                             headers={"X-API-Key": KEY}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    for field in ("anomaly_map_png", "overlay_png"):
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(body[field]))))
        assert picture.shape == (64, 192, 3) and picture.std() > 0
    for region in body["defect_regions"]:
        assert 0 <= region["x0"] < region["x1"] <= 384 and 0 <= region["y0"] < region["y1"] <= 128
