"""PatchCore, the memory-bank method: its arithmetic against brute force on small arrays, and the
fitted detector through the protocol (artifact round trip, own-patch exclusion, ONNX parity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from redi.core.config import load_config
from redi.methods.base import load_detector
from redi.methods.patchcore.memory_bank import (bank_neighbors, greedy_coreset, locally_aware_features,
                                                nearest_neighbors, reweighted_scores)


def _points(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _brute_coreset(points: np.ndarray, count: int, start: int) -> list[int]:
    """Greedy k-center written the slow, obvious way."""
    chosen = [start]
    for _ in range(1, count):
        gaps = [min(np.linalg.norm(p - points[c]) for c in chosen) for p in points]
        chosen.append(int(np.argmax(gaps)))
    return chosen


def test_greedy_coreset_matches_brute_force():
    points = _points(120, 6)
    chosen = greedy_coreset(points, 15, projection_dim=0, seed=3)
    assert chosen.tolist() == _brute_coreset(points.double().numpy(), 15, int(chosen[0]))
    assert len(set(chosen.tolist())) == 15  # never picks a point twice
    assert torch.equal(chosen, greedy_coreset(points, 15, projection_dim=0, seed=3))  # deterministic


def test_greedy_coreset_covers_better_than_random():
    points = torch.cat([_points(400, 32), _points(5, 32, 1) * 0.1 + 20.0])  # a far, small cluster
    chosen = greedy_coreset(points, 20, projection_dim=8, seed=0)
    assert (chosen >= 400).any()  # the far cluster is always covered

    def radius(index: torch.Tensor) -> float:
        return float(torch.cdist(points, points[index]).min(dim=1).values.max())

    random = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(0))[:20]
    assert radius(chosen) < radius(random)


def test_nearest_neighbors_match_cdist_with_exclusion(monkeypatch):
    import redi.methods.patchcore.memory_bank as memory_bank

    monkeypatch.setattr(memory_bank, "QUERY_CHUNK", 7)  # several chunks
    queries, bank = _points(30, 5), _points(50, 5, 1)
    excluded = torch.rand(30, 50, generator=torch.Generator().manual_seed(2)) < 0.3
    distances, indices = nearest_neighbors(queries, bank, 3, excluded)
    full = torch.cdist(queries.double(), bank.double()).masked_fill(excluded, float("inf"))
    expected, expected_index = full.sort(dim=1)
    assert torch.equal(indices, expected_index[:, :3])
    assert torch.allclose(distances.double(), expected[:, :3], atol=1e-4)
    assert not excluded.gather(1, indices).any()


def test_bank_neighbors_are_self_then_nearest_others():
    bank = _points(40, 4)
    support = bank_neighbors(bank, 5)
    assert torch.equal(support[:, 0], torch.arange(40))
    full = torch.cdist(bank.double(), bank.double())
    full.fill_diagonal_(float("inf"))
    assert torch.equal(support[:, 1:], full.argsort(dim=1)[:, :4])


def test_reweighted_score_is_paper_equation_7():
    bank, queries = _points(60, 4), _points(2 * 9, 4, 1).view(2, 9, 4) * 2.0
    support = bank_neighbors(bank, 4)
    distances, nearest = nearest_neighbors(queries.view(-1, 4), bank, 1)
    distances, nearest = distances.view(2, 9), nearest.view(2, 9)
    scores = reweighted_scores(queries, distances, nearest, bank, support)
    for b in range(2):
        worst = int(distances[b].argmax())
        m_test = queries[b, worst].double()
        m_star = int(torch.cdist(m_test[None], bank.double()).argmin())
        gaps = [float(torch.dist(m_test, bank[j].double())) for j in support[m_star]]
        weight = 1.0 - np.exp(gaps[0]) / sum(np.exp(g) for g in gaps)
        assert scores[b].item() == pytest.approx(weight * gaps[0], rel=1e-4)


def test_locally_aware_features_average_then_resize():
    fine, coarse = _points(2 * 3 * 8 * 8, 1).view(2, 3, 8, 8), _points(2 * 5 * 4 * 4, 1, 1).view(2, 5, 4, 4)
    out = locally_aware_features([fine, coarse])
    assert out.shape == (2, 8, 8, 8)
    # an inner cell is the mean of its 3x3 neighbourhood (zero padding counts at the border, as AvgPool2d)
    assert out[0, 0, 3, 4].item() == pytest.approx(fine[0, 0, 2:5, 3:6].mean().item(), rel=1e-5)
    resized = F.interpolate(F.avg_pool2d(coarse, 3, 1, 1), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(out[:, 3:], resized)


# -- the fitted detector ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patchcore_run(tmp_path_factory, demo_line_root):
    from redi.workflow.stages import train_all

    out = tmp_path_factory.mktemp("patchcore")
    cfg = load_config(profile="tiny", overrides=["model.method=patchcore", "data.val_fraction=0.3"])
    paths = train_all(demo_line_root, out, cfg, line="caps")
    return {"cfg": cfg, "detector": paths["detector"], "data": demo_line_root}


@pytest.mark.slow
def test_patchcore_fits_saves_and_loads(patchcore_run):
    from redi.data.dataset import load_images
    from redi.data.mvtec import MVTecCategory

    detector = load_detector(patchcore_run["detector"])
    assert detector.method == "patchcore" and torch.isfinite(detector.threshold)
    category = MVTecCategory(patchcore_run["data"])
    assert set(detector.fit_image_ids) < {s.image_id for s in category.train}  # held-out normals are not in the bank
    bank_share = detector.memory_bank.shape[0] / (len(detector.fit_image_ids) * 16 * 16)
    assert bank_share == pytest.approx(0.1, abs=0.01)  # the 10 % coreset of 16x16 patches per 128 px image
    test = category.test
    images = load_images(test, detector.image_size)
    out = detector.predict(images)
    assert out.anomaly_map.shape == (len(test), 128, 128) and out.embedding.shape[0] == len(test)
    labels = torch.tensor([s.label for s in test])
    assert out.score[labels == 1].mean() > out.score[labels == 0].mean()
    again = load_detector(patchcore_run["detector"]).predict(images)
    assert torch.equal(out.score, again.score)


@pytest.mark.slow
def test_a_training_image_never_matches_its_own_patches(patchcore_run):
    from redi.data.dataset import load_images
    from redi.data.mvtec import MVTecCategory

    detector = load_detector(patchcore_run["detector"])
    fitted = [s for s in MVTecCategory(patchcore_run["data"]).train if s.image_id in set(detector.fit_image_ids)][:2]
    images = load_images(fitted, detector.image_size)
    own = detector.predict(images).anomaly_map
    named = detector.predict(images, image_ids=[s.image_id for s in fitted]).anomaly_map
    # the bank holds 10 % of each image's patches: where those were a patch's nearest row, the
    # named image's distance grows; nowhere does it shrink
    assert (named >= own - 1e-5).all() and (named > own + 0.1).float().mean() > 0.05


@pytest.mark.slow
def test_patchcore_onnx_matches_torch(patchcore_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from redi.methods.onnx import compare_with_torch, onnx_session

    detector = load_detector(patchcore_run["detector"])
    path = detector.export_onnx(tmp_path / "pc.onnx")
    differences = compare_with_torch(detector, onnx_session(path), detector.example_images(3))
    assert differences["score"] < 1e-3 and differences["anomaly_map"] < 1e-3
