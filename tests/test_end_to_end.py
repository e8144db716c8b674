"""ReDi end to end on synthetic demo data with the tiny profile: train, evaluate, repeat, resume."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from redi.cli.main import main
from redi.core.config import load_config
from redi.data.dataset import load_images
from redi.data.mvtec import MVTecCategory
from redi.methods.base import load_detector
from redi.methods.common import score_images
from redi.methods.redi.fit import train_discriminate
from redi.workflow.stages import evaluate
from redi.core.utils import load_torch_file

pytestmark = pytest.mark.slow


def _cfg(data: Path, *overrides: str):
    return load_config(profile="tiny", overrides=[f"data.root={data}", *overrides])


def test_train_and_evaluate_detects_synthetic_defects(trained_line, tmp_path):
    metrics_path = evaluate(trained_line["detector"], trained_line["data"], tmp_path / "eval", _cfg(trained_line["data"]))
    metrics = json.loads(metrics_path.read_text())
    assert metrics["profile"] == "tiny" and metrics["n_anomalous"] == 20 and metrics["n_normal"] == 10
    assert metrics["image_auroc"] >= 0.9, metrics
    assert metrics["pixel_auroc"] >= 0.9, metrics
    report = tmp_path / "eval" / "report" / "index.html"
    assert report.is_file() and "SYNTHETIC" in report.read_text()
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert len(scores) == 30 and {s["defect_type"] for s in scores} == {"good", "scratch", "hole", "stain", "misplaced"}


def _test_scores(detector_path: Path, data: Path) -> torch.Tensor:
    detector = load_detector(detector_path)
    images = load_images(MVTecCategory(data).test[:8], detector.image_size)
    return score_images(detector, images)["scores"]


def test_same_seed_gives_same_scores(trained_line, tmp_path):
    cfg = _cfg(trained_line["data"], "train.discriminate.epochs=3")
    first = train_discriminate(trained_line["data"], trained_line["bank"], trained_line["recover"], tmp_path / "a", cfg)
    second = train_discriminate(trained_line["data"], trained_line["bank"], trained_line["recover"], tmp_path / "b", cfg)
    assert torch.equal(_test_scores(first, trained_line["data"]), _test_scores(second, trained_line["data"]))
    other = train_discriminate(trained_line["data"], trained_line["bank"], trained_line["recover"], tmp_path / "c",
                               _cfg(trained_line["data"], "train.discriminate.epochs=3", "train.seed=1"))
    assert not torch.equal(_test_scores(first, trained_line["data"]), _test_scores(other, trained_line["data"]))


def test_killed_training_resumes_from_its_checkpoint(trained_line, tmp_path):
    data, epochs = trained_line["data"], 6
    args = ["train-discriminate", str(data), "--bank", str(trained_line["bank"]), "--recover",
            str(trained_line["recover"]), "--profile", "tiny", "--set", f"train.discriminate.epochs={epochs}"]
    uninterrupted = tmp_path / "whole"
    assert main([*args, "--out", str(uninterrupted)]) == 0

    killed = tmp_path / "killed"
    checkpoint = killed / "checkpoints" / "discriminate_last.pt"
    process = subprocess.Popen([sys.executable, "-m", "redi.cli", *args, "--out", str(killed)],
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if checkpoint.is_file() and load_torch_file(checkpoint, "checkpoint", "")["epoch"] >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, "training finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = load_torch_file(checkpoint, "checkpoint", "")["epoch"]
    assert 2 <= killed_at < epochs and not (killed / "detector.pt").exists()

    assert main([*args, "--out", str(killed)]) == 0
    history = json.loads((killed / "discriminate_history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert torch.equal(_test_scores(killed / "detector.pt", data), _test_scores(uninterrupted / "detector.pt", data))


def test_cli_predict_writes_scores_and_maps(trained_line, tmp_path):
    good = sorted((trained_line["data"] / "test" / "good").iterdir())[:2]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["predict", str(trained_line["detector"]), *map(str, good), str(tmp_path / "broken.png"),
                 "--out", str(tmp_path / "pred")]) == 1  # one unreadable file: reported, the rest scored
    rows = (tmp_path / "pred" / "scores.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[-1].startswith(str(tmp_path / "broken.png")) and "cannot read image" in rows[-1]
    assert all(",nan," not in row for row in rows[1:3])
    assert len(list((tmp_path / "pred" / "maps").glob("*_overlay.png"))) == 2


def test_missing_prompt_bank_is_a_clear_cli_error(trained_line, tmp_path, capsys):
    code = main(["train-recover", str(trained_line["data"]), "--bank", str(tmp_path / "nope.pt"),
                 "--out", str(tmp_path), "--profile", "tiny"])
    assert code == 2 and "build it first" in capsys.readouterr().err


def test_recover_off_ablation_trains_and_scores(trained_line, tmp_path):
    cfg = _cfg(trained_line["data"], "model.recover.enabled=false", "train.discriminate.epochs=2")
    detector = train_discriminate(trained_line["data"], trained_line["bank"], tmp_path / "none.pt", tmp_path, cfg)
    loaded = load_detector(detector)
    assert loaded.recover is None
    x = load_images(MVTecCategory(trained_line["data"]).test[:2], loaded.image_size)
    out = loaded.predict(x)
    assert torch.equal(out.recovered, x)  # the recovery branch sees X itself


def test_bank_images_never_get_themselves_as_prompt_when_scored(trained_line, tmp_path):
    from redi.ops.monitoring import build_reference

    detector = load_detector(trained_line["detector"])
    by_id = {s.image_id: s for s in MVTecCategory(trained_line["data"]).train}
    bank = [by_id[i] for i in detector.prompt_ids[:4]]
    x = load_images(bank, detector.image_size)
    own = torch.arange(4)
    assert torch.equal(detector.predict(x).prompt_index, own)  # without exclusion: itself, a near-perfect recovery
    assert (detector.predict(x, exclude=own).prompt_index != own).all()
    reference = build_reference(trained_line["detector"], trained_line["data"], tmp_path / "ref.csv",
                                _cfg(trained_line["data"]))
    import pandas as pd

    rows = pd.read_csv(reference).set_index("image_id")
    held_out = [s.image_id for s in by_id.values() if s.image_id not in set(detector.prompt_ids)]
    in_bank = rows.loc[detector.prompt_ids, "anomaly_score"]
    # bank images scored like production images, not self-recovered: same scale as held-out normals
    assert in_bank.mean() > 0.5 * rows.loc[held_out, "anomaly_score"].mean()


def test_discriminate_resume_does_not_depend_on_data_paths(trained_line, tmp_path):
    from redi.methods.redi.fit import _recover_identity

    payload = load_torch_file(trained_line["recover"], "recover net", "")
    payload["config"]["data"]["root"] = "/another/run/artifact/path"  # what a new KFP run looks like
    torch.save(payload, tmp_path / "recover.pt")
    assert _recover_identity(tmp_path / "recover.pt") == _recover_identity(trained_line["recover"])


def _resized_copy(data: Path, out: Path, height: int, width: int) -> Path:
    """A copy of a line whose test images and masks are ``width x height``: not the model's size,
    so both paths below really resize (masks nearest, to stay binary)."""
    shutil.copytree(data, out)
    for folder, resample in (("test", Image.Resampling.BICUBIC), ("ground_truth", Image.Resampling.NEAREST)):
        for path in (out / folder).rglob("*.png"):
            with Image.open(path) as image:
                image.resize((width, height), resample).save(path)
    return out


def test_evaluate_and_predict_give_equal_scores_for_the_same_files(trained_line, tmp_path):
    """The threshold is applied to scores made exactly as it was calibrated: `redi evaluate` (the
    dataset path) and `redi predict` (Detector.preprocess) score the same files identically."""
    data = _resized_copy(trained_line["data"], tmp_path / "line", height=150, width=170)
    detector = str(trained_line["detector"])
    assert main(["evaluate", detector, str(data), "--out", str(tmp_path / "eval"), "--no-report",
                 "--profile", "tiny"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "scores.json").read_text())

    test = MVTecCategory(data).test  # evaluate's order; predict gets the same files in the same batches
    assert [row["image_id"] for row in evaluated] == [s.image_id for s in test]
    batch = str(_cfg(data).eval.batch_size)
    assert main(["predict", detector, *[str(s.path) for s in test], "--out", str(tmp_path / "pred"),
                 "--batch-size", batch]) == 0
    with open(tmp_path / "pred" / "scores.csv", newline="") as handle:
        predicted = list(csv.DictReader(handle))
    assert [row["path"] for row in predicted] == [str(s.path) for s in test]
    assert [float(row["score"]) for row in predicted] == [row["score"] for row in evaluated]
    assert [row["anomalous"] == "True" for row in predicted] == [row["anomalous"] for row in evaluated]
