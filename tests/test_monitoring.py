"""Drift monitoring: feature rows, the durable production log, Evidently drift checks and the CLI."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from redi.core.config import profile_config
from redi.data.demo import generate_pair, make_demo_line
from redi.core.errors import DatasetError, InputError
from redi.core.images import load_rgb
from redi.methods.base import load_detector, save_detector
from redi.methods.redi.detector import Detector
from redi.cli.monitor import add_monitor_commands
from redi.ops.monitoring import (IMAGE_FEATURES, SCORE_COLUMN, MonitorSettings, ProductionLog, build_reference,
                             embedding_columns, feature_columns, image_feature_row, load_reference, run_monitor)

LINE = "bottle_caps"
SIZE = 128
N_REF = 30
N_PROD = 24


# ----------------------------------------------------------------------------- feature rows
def test_feature_row_values_and_schema() -> None:
    white = np.full((64, 48, 3), 255, np.uint8)
    black = np.zeros((64, 48, 3), np.uint8)
    emb = torch.arange(176, dtype=torch.float32)
    row_w, row_b = image_feature_row(white, 1.5, emb), image_feature_row(black, 0.5, emb.numpy())
    assert list(row_w) == feature_columns()
    assert row_w["brightness"] == pytest.approx(1.0) and row_b["brightness"] == pytest.approx(0.0)
    assert row_w["contrast"] == pytest.approx(0.0, abs=1e-9) and row_w["sharpness"] == pytest.approx(0.0, abs=1e-9)
    assert row_w[SCORE_COLUMN] == 1.5
    # same embedding (tensor or array, any scale) -> same projected components: fixed, normalised projection
    assert [row_w[c] for c in embedding_columns()] == pytest.approx([row_b[c] for c in embedding_columns()])
    scaled = image_feature_row(white, 0.0, emb * 7)
    assert [scaled[c] for c in embedding_columns()] == pytest.approx([row_w[c] for c in embedding_columns()])
    assert len(image_feature_row(white, 0.0, emb, k=3)) == len(IMAGE_FEATURES) + 1 + 3


def test_feature_row_tracks_blur_brightness_and_rejects_bad_input() -> None:
    rgb = generate_pair(LINE, 256, 0, "train", 0).image
    emb = np.ones(16)
    base = image_feature_row(rgb, 0.0, emb)
    blurred = ndimage.gaussian_filter(rgb.astype(float), sigma=(2, 2, 0)).round().astype(np.uint8)
    brighter = np.clip(rgb.astype(int) + 50, 0, 255).astype(np.uint8)
    assert image_feature_row(blurred, 0.0, emb)["sharpness"] < 0.3 * base["sharpness"]
    assert image_feature_row(brighter, 0.0, emb)["brightness"] > base["brightness"] + 0.1
    with pytest.raises(InputError, match="uint8 RGB"):
        image_feature_row(rgb.astype(np.float32), 0.0, emb)
    with pytest.raises(InputError, match="embedding"):
        image_feature_row(rgb, 0.0, np.array([np.nan, 1.0]))


# ----------------------------------------------------------------------------- production log
def _append_many(directory: str, worker: int, count: int) -> None:
    log = ProductionLog(directory)
    for i in range(count):
        log.append({"line": LINE, "worker": worker, "i": i, "payload": "x" * 3000})  # > PIPE_BUF: needs the lock


def test_production_log_loses_nothing_under_concurrency(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, 150)) for w in range(3)]
    threads = [threading.Thread(target=_append_many, args=(str(tmp_path), 10 + t, 150)) for t in range(3)]
    for worker in [*procs, *threads]:
        worker.start()
    for worker in [*procs, *threads]:
        worker.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    frame = ProductionLog(tmp_path).read(LINE)
    assert len(frame) == 6 * 150
    assert sorted(frame.groupby("worker")["i"].nunique().tolist()) == [150] * 6
    assert (frame["payload"].str.len() == 3000).all()
    # a crash mid-write leaves a partial last line: it is skipped, the rest is read
    path = ProductionLog(tmp_path).files(LINE)[-1]
    with open(path, "ab") as handle:
        handle.write(b'{"line": "bottle_caps", "i": ')
    assert len(ProductionLog(tmp_path).read(LINE)) == 6 * 150
    assert len(ProductionLog(tmp_path).read(LINE, last=5)) == 5


def test_production_log_refuses_unsafe_line_names(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not valid"):
        ProductionLog(tmp_path).append({"line": "../etc"})


# ----------------------------------------------------------------------------- drift on real detector rows
@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An (untrained-head) tiny detector, the line's reference table, and production image sets.

    Drift is about the images and the frozen ImageNet backbone's embedding, so the recover and
    discriminate nets need no training here; the detector still runs end to end.
    """
    root = tmp_path_factory.mktemp("monitor")
    data = root / LINE
    make_demo_line(data, LINE, n_train=N_REF, n_test_good=0, n_test_defect=0, size=SIZE, seed=0)
    cfg = profile_config("tiny")
    cfg.train.device = "cpu"
    torch.manual_seed(0)
    detector = Detector(cfg, num_prompts=2)
    images = detector.preprocess([load_rgb(data / "train" / "good" / f"{i:03d}.png") for i in range(2)])
    detector.set_prompts(detector.backbone(images).embedding, images, ["train/good/000", "train/good/001"])
    detector.threshold = torch.tensor(1.0)
    model = save_detector(detector, root / "detector.pt", {"line": LINE, "version": "v1"})
    reference = build_reference(model, data, root / "reference.csv", cfg)
    same = [generate_pair(LINE, SIZE, 1, "train", i).image for i in range(N_PROD)]  # another seed: same process
    sets = {"same": same,
            "brighter": [np.clip(x.astype(int) + 60, 0, 255).astype(np.uint8) for x in same],
            "blurred": [ndimage.gaussian_filter(x.astype(float), (2.5, 2.5, 0)).round().astype(np.uint8)
                        for x in same],
            "other_line": [generate_pair("woven_fabric", SIZE, 0, "train", i).image for i in range(N_PROD)]}
    loaded = load_detector(model)
    # score every production set once; the tests only log and compare rows
    rows = {name: _rows(loaded, images) for name, images in sets.items()}
    return {"root": root, "model": model, "reference": reference, "cfg": cfg, "detector": loaded, "rows": rows}


def _rows(detector: Detector, images: list[np.ndarray], batch: int = 8) -> list[dict]:
    """Monitoring rows of images, scored in batches like the service does."""
    rows = []
    for begin in range(0, len(images), batch):
        chunk = images[begin:begin + batch]
        out = detector.predict(detector.preprocess(chunk))
        rows += [image_feature_row(rgb, float(s), e) for rgb, s, e in zip(chunk, out.score, out.embedding)]
    return rows


def _log_rows(rows: list[dict], log_dir: Path, version: str = "v1") -> None:
    log = ProductionLog(log_dir)
    for row in rows:
        log.append({"line": LINE, "model_version": version, **row})


def test_reference_table(monitored: dict) -> None:
    frame = load_reference(monitored["reference"])
    assert len(frame) == N_REF and set(feature_columns()) <= set(frame.columns)
    assert (frame["model_version"].astype(str) == "v1").all() and frame["image_id"].is_unique
    # the reference's scores are the detector's scores of the same images, a bank image never
    # taking itself as prompt (as at training time)
    detector = monitored["detector"]
    first = load_rgb(monitored["root"] / LINE / "train" / "good" / "000.png")
    own = detector.prompt_ids.index("train/good/000") if "train/good/000" in detector.prompt_ids else -1
    out = detector.predict(detector.preprocess([first]), exclude=torch.tensor([own]))
    assert own == -1 or int(out.prompt_index[0]) != own
    score = float(out.score[0])
    assert frame.loc[frame["image_id"] == "train/good/000", SCORE_COLUMN].item() == pytest.approx(score, rel=1e-5)


@pytest.mark.parametrize("scenario, expect", [
    ("same", {}),
    ("brighter", {"data": True, "feature": "brightness"}),
    ("blurred", {"data": True, "feature": "sharpness"}),
    ("other_line", {"data": True, "embedding": True}),
])
def test_drift_checks(monitored: dict, tmp_path: Path, scenario: str, expect: dict) -> None:
    _log_rows(monitored["rows"][scenario], tmp_path / "logs")
    triggered: list[str] = []
    result = run_monitor(LINE, tmp_path / "logs", monitored["reference"], tmp_path / "out",
                         trigger_pipeline=True, trigger=triggered.append)
    assert result.n_current == N_PROD and result.n_reference == N_REF
    assert result.drift_detected == bool(expect), result.to_dict()
    assert triggered == ([LINE] if expect else [])
    if "feature" in expect:
        assert result.feature_drift[expect["feature"]], result.to_dict()
    if "embedding" in expect:
        assert result.embedding_drift, result.to_dict()
    if not expect:
        assert not result.data_drift and not result.embedding_drift and not result.score_shift
    summary = json.loads(Path(result.json_path).read_text())
    assert summary["drift_detected"] == result.drift_detected
    assert Path(result.html_path).stat().st_size > 10_000 and Path(result.snapshot_path).is_file()


def test_monitor_errors_and_version_filter(monitored: dict, tmp_path: Path) -> None:
    same = monitored["rows"]["same"]
    _log_rows(same[:5], tmp_path / "logs")
    with pytest.raises(InputError, match="5 comparable production rows"):
        run_monitor(LINE, tmp_path / "logs", monitored["reference"], tmp_path / "out")
    _log_rows(same[5:20], tmp_path / "logs", version="v0-old")
    with pytest.raises(InputError, match="5 comparable"):  # other model versions are not compared
        run_monitor(LINE, tmp_path / "logs", monitored["reference"], tmp_path / "out")
    result = run_monitor(LINE, tmp_path / "logs", monitored["reference"], tmp_path / "out",
                         settings=MonitorSettings(same_model_version=False))
    assert result.n_current == 20
    with pytest.raises(DatasetError, match="drift_reference"):
        run_monitor(LINE, tmp_path / "logs", tmp_path / "missing.csv", tmp_path / "out")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="redi")
    handlers = add_monitor_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return handlers[args.command](args)


def test_cli_monitor_exit_codes_and_reference(monitored: dict, tmp_path: Path, capsys) -> None:
    ref = tmp_path / "ref.csv"
    assert _cli(["drift-reference", str(monitored["model"]), str(monitored["root"] / LINE), "--out", str(ref),
                 "--profile", "tiny", "--set", "train.device=cpu"]) == 0
    assert len(pd.read_csv(ref)) == N_REF
    _log_rows(monitored["rows"]["same"], tmp_path / "ok")
    _log_rows(monitored["rows"]["brighter"], tmp_path / "drift")
    base = ["monitor", "--line", LINE, "--reference", str(ref), "--out", str(tmp_path / "reports")]
    assert _cli([*base, "--log-dir", str(tmp_path / "ok")]) == 0
    assert "no drift" in capsys.readouterr().out
    assert _cli([*base, "--log-dir", str(tmp_path / "drift")]) == 1
    assert "drift found" in capsys.readouterr().out
    assert _cli([*base, "--log-dir", str(tmp_path / "drift"), "--no-fail"]) == 0
    with pytest.raises(InputError, match="ISO"):
        _cli([*base, "--log-dir", str(tmp_path / "ok"), "--since", "yesterday"])


# ----------------------------------------------------------------------------- drift-triggered retraining
def _git(repo: Path, *args: str) -> str:
    import subprocess

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x",
           "PATH": __import__("os").environ["PATH"], "HOME": str(repo)}
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class _FakeKfpClient:
    """Stands in for kfp.Client (no cluster can run here): records the run it is asked to start."""

    def __init__(self) -> None:
        self.runs: list[dict] = []

    def create_run_from_pipeline_package(self, pipeline_file, arguments, run_name, experiment_name, namespace):
        self.runs.append({"package": pipeline_file, "arguments": arguments, "run_name": run_name,
                          "experiment": experiment_name})
        return type("Result", (), {"run_id": f"run-{len(self.runs)}"})()


def test_drift_triggers_the_lines_own_profile_on_the_newest_revision(monitored: dict, tmp_path: Path) -> None:
    import shutil

    from redi.cli.pipeline import drift_trigger

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "data-repo"  # the line's data repository with two commits: v1 pinned, v2 newer
    (repo / "data" / "caps").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "data" / "caps" / "batch.txt").write_text("v1")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "data v1")
    v1 = _git(repo, "rev-parse", "HEAD")
    (repo / "data" / "caps" / "batch.txt").write_text("v2")
    _git(repo, "commit", "-q", "-am", "data v2")
    v2 = _git(repo, "rev-parse", "HEAD")
    lines = tmp_path / "lines"
    lines.mkdir()
    (lines / f"{LINE}.yaml").write_text(
        f"profile: fast\nline:\n  name: {LINE}\n  data_repo: {repo}\n  data_path: data/caps\n"
        f"  data_revision: {v1}\npipeline:\n  kfp_host: http://kfp.plant.local:8080\n")
    client = _FakeKfpClient()
    _log_rows(monitored["rows"]["brighter"], tmp_path / "logs")
    result = run_monitor(LINE, tmp_path / "logs", monitored["reference"], tmp_path / "out", trigger_pipeline=True,
                         trigger=drift_trigger(lines_dir=lines, client=client))
    assert result.drift_detected and result.pipeline_triggered
    (run,) = client.runs
    assert run["arguments"]["profile"] == "fast"  # the line's own budget, not the test profile
    assert run["arguments"]["data_revision"] == v2 != v1  # the newest data, not the pinned revision
    assert run["arguments"]["cluster_mode"] is True and Path(run["package"]).is_file()
    assert result.pipeline_result["where"] == "http://kfp.plant.local:8080"
    assert result.pipeline_result["data_revision"] == v2 and result.pipeline_result["profile"] == "fast"
    # no drift: nothing is started
    _log_rows(monitored["rows"]["same"], tmp_path / "calm")
    run_monitor(LINE, tmp_path / "calm", monitored["reference"], tmp_path / "out", trigger_pipeline=True,
                trigger=drift_trigger(lines_dir=lines, client=client))
    assert len(client.runs) == 1


def test_monitoring_library_does_not_import_the_pipeline(monitored: dict, tmp_path: Path) -> None:
    import subprocess
    import sys

    code = "import sys, redi.ops.monitoring; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('pipelines', 'components', 'kfp')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    _log_rows(monitored["rows"]["brighter"], tmp_path / "logs")
    from redi.core.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a trigger function"):
        run_monitor(LINE, tmp_path / "logs", monitored["reference"], tmp_path / "out", trigger_pipeline=True)
    parser = argparse.ArgumentParser(prog="redi")
    add_monitor_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["monitor", "--line", LINE, "--reference", "r.csv", "--trigger-pipeline",
                              "--kfp-host", "http://kfp:8080"])
    assert args.trigger_pipeline and args.kfp_host == "http://kfp:8080"


def test_too_few_rows_for_evidently_is_a_clear_error_not_a_crash(monitored: dict, tmp_path: Path) -> None:
    """Evidently's embedding report fails inside (t-SNE: 'perplexity must be less than n_samples') on 30
    rows or fewer in all; the check says how many production rows to wait for instead."""
    small = tmp_path / "small_reference.csv"
    pd.read_csv(monitored["reference"]).head(8).to_csv(small, index=False)
    rows = monitored["rows"]["same"]
    _log_rows(rows[:22], tmp_path / "logs")
    with pytest.raises(InputError, match="wait for at least 23 production rows"):
        run_monitor(LINE, tmp_path / "logs", small, tmp_path / "out")
    _log_rows(rows[22:23], tmp_path / "logs")
    result = run_monitor(LINE, tmp_path / "logs", small, tmp_path / "out")  # 8 + 23 = 31: Evidently runs
    assert (result.n_reference, result.n_current) == (8, 23)
