"""A champion per line: the candidates are fitted, measured on validation and the best kept by a
fixed rule that reads no test label; the fused candidate round-trips; evaluation and the report
show every candidate side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from redi.core.config import load_config
from redi.core.errors import ConfigError
from redi.methods.base import load_detector, read_artifact
from redi.workflow.champion import TIE, check_candidates, choose, select_champion

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def champion_run(tmp_path_factory, demo_line_root):
    from redi.workflow.stages import train_all

    out = tmp_path_factory.mktemp("champion")
    cfg = load_config(profile="tiny", overrides=["model.candidates=[redi,patchcore,fused]", "data.val_fraction=0.3"])
    paths = train_all(demo_line_root, out, cfg, line="caps")
    return {"cfg": cfg, "paths": paths, "out": out, "data": demo_line_root}


def test_every_candidate_is_fitted_and_the_champion_served(champion_run):
    paths, out = champion_run["paths"], champion_run["out"]
    selection = json.loads(Path(paths["selection"]).read_text())
    assert [r["name"] for r in selection["candidates"]] == ["redi", "patchcore", "fused"]
    assert sum(r["chosen"] for r in selection["candidates"]) == 1
    champion = next(r for r in selection["candidates"] if r["chosen"])
    assert champion["selection_score"] >= max(r["selection_score"] for r in selection["candidates"]) - TIE
    served = read_artifact(out / "detector.pt")
    assert served["method"] == champion["method"] == selection["champion"]
    assert served["metadata"]["selection"]["champion"] == champion["name"]
    # the fused candidate reused the redi and patchcore candidates rather than fitting them again
    fused = read_artifact(paths["candidate_fused"])
    assert [part["metadata"]["version"] for part in fused["parts"]] == [
        read_artifact(paths["candidate_redi"])["metadata"]["version"],
        read_artifact(paths["candidate_patchcore"])["metadata"]["version"]]


def test_fused_detector_round_trips_and_standardises_its_parts(champion_run):
    from redi.data.dataset import load_images
    from redi.data.mvtec import MVTecCategory

    fused = load_detector(champion_run["paths"]["candidate_fused"])
    parts = [load_detector(champion_run["paths"][f"candidate_{n}"]) for n in ("redi", "patchcore")]
    assert fused.method == "fused" and fused.part_names == ["redi", "patchcore"]
    images = load_images(MVTecCategory(champion_run["data"]).test[:4], fused.image_size)
    out = fused.predict(images)
    expected = sum((p.predict(images).anomaly_map - fused.map_mean[i]) / fused.map_std[i]
                   for i, p in enumerate(parts)) / 2
    assert torch.allclose(out.anomaly_map, expected, atol=1e-5)
    flat = expected.flatten(1)  # the image score: the mean of the fused map's top 1 % (top_mean, the default)
    top = max(1, int(fused.cfg.model.image_score_share * flat.shape[1]))
    assert fused.cfg.model.image_score == "top_mean"
    assert torch.allclose(out.score, flat.sort(dim=1, descending=True).values[:, :top].mean(1), atol=1e-5)
    assert "redi: recovered Y" in fused.pictures(out)
    assert torch.isfinite(fused.threshold)


def _scramble_test_labels(source: Path, target: Path) -> Path:
    """A copy of a line whose test images swap folders: good ones become 'scratch', defects 'good'."""
    shutil.copytree(source, target)
    test = target / "test"
    for folder in [p for p in test.iterdir() if p.is_dir()]:
        folder.rename(test / f"old_{folder.name}")
    (test / "good").mkdir()
    (test / "scratch").mkdir()
    for image in sorted(test.glob("old_*/*")):
        destination = test / ("scratch" if image.parent.name == "old_good" else "good")
        image.rename(destination / f"{image.parent.name}_{image.name}")
    for folder in test.glob("old_*"):
        folder.rmdir()
    shutil.rmtree(target / "ground_truth")
    return target


def test_the_choice_reads_no_test_label(champion_run, tmp_path):
    paths = champion_run["paths"]
    candidates = {n: paths[f"candidate_{n}"] for n in ("redi", "patchcore", "fused")}
    first = json.loads(select_champion(candidates, champion_run["data"], tmp_path / "a", champion_run["cfg"]).read_text())
    scrambled = _scramble_test_labels(champion_run["data"], tmp_path / "scrambled" / "bottle_caps")
    second = json.loads(select_champion(candidates, scrambled, tmp_path / "b", champion_run["cfg"]).read_text())
    assert second["champion"] == first["champion"]
    assert [r["selection_score"] for r in second["candidates"]] == [r["selection_score"] for r in first["candidates"]]


def test_ties_go_to_the_candidate_listed_first():
    rows = [{"selection_score": 0.80}, {"selection_score": 0.80 + TIE / 2}, {"selection_score": 0.70}]
    assert choose(rows) == 0
    rows[1]["selection_score"] = 0.80 + 2 * TIE
    assert choose(rows) == 1


def test_unknown_candidates_fail_before_training():
    cfg = load_config(profile="tiny", overrides=["model.candidates=[redi,nonesuch]"])
    with pytest.raises(ConfigError, match="nonesuch"):
        check_candidates(cfg)
    with pytest.raises(ConfigError, match="twice"):
        load_config(profile="tiny", overrides=["model.candidates=[redi,redi]"])


def test_evaluation_and_report_show_every_candidate(champion_run, tmp_path):
    from redi.workflow.stages import evaluate

    metrics = json.loads(evaluate(champion_run["out"] / "detector.pt", champion_run["data"], tmp_path,
                                  champion_run["cfg"]).read_text())
    summary = metrics["candidates"]
    assert [r["name"] for r in summary["rows"]] == ["redi", "patchcore", "fused"]
    assert all(r["test"]["pixel_ap"] is not None for r in summary["rows"])
    chosen = next(r for r in summary["rows"] if r["chosen"])
    assert chosen["test"]["image_auroc"] == pytest.approx(metrics["image_auroc"])  # the champion is what was served
    assert summary["champion_gap_pixel_ap"] >= 0.0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Candidates: chosen on validation, checked on test" in page and "(champion)" in page
