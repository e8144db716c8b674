"""Issue 17's scoring options, measured on already-fitted candidates (no retraining), validation and
test side by side, so an option is kept only where validation picks it:

- the image score as the maximum of the map (ReDi, fused) against the mean of its top 1 % pixels,
  and PatchCore's reweighted score (paper eq. 7) against the plain maximum and the top 1 %;
- ReDi's map as the plain sum of its levels' distances against each level standardised on the
  held-out normals before the sum.

    python bench/score_variants.py --runs /tmp/pc/s0_hazelnut=../shared/data/hazelnut ... \
        --out docs/score_variants.json

Each run folder is a ``redi train`` run with candidates (``candidates/redi``, ``candidates/patchcore``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from redi.core.config import load_config
from redi.core.metrics import compute_all
from redi.data.dataset import load_images, load_masks
from redi.data.mvtec import MVTecCategory
from redi.methods.base import load_detector
from redi.workflow.validation import validation_set

TOP_SHARE = 0.01


def top_mean(maps: torch.Tensor, share: float = TOP_SHARE) -> torch.Tensor:
    flat = maps.flatten(1)
    k = max(1, int(share * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


@torch.inference_mode()
def redi_levels(detector, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """(N, L, S, S) each level's upsampled 1 - cos distance (before the sum and the blur)."""
    out = []
    size = (detector.image_size, detector.image_size)
    for begin in range(0, images.shape[0], batch):
        x = images[begin:begin + batch]
        reference = detector.backbone(x)
        prompt = detector.select_prompts(reference.embedding)
        recovered = detector.head(detector.backbone(detector.recover_image(x, prompt)).features)
        levels = [F.interpolate(1 - F.cosine_similarity(fx, fy, dim=1).unsqueeze(1), size=size, mode="bilinear",
                                align_corners=False) for fx, fy in zip(reference.features, recovered)]
        out.append(torch.cat(levels, dim=1))
    return torch.cat(out)


def blur(detector, maps: torch.Tensor) -> torch.Tensor:
    return detector.blur(maps.unsqueeze(1)).squeeze(1)


def measure(labels, scores, masks, maps) -> dict:
    m = compute_all(labels, scores.numpy().astype(np.float64), masks, maps.numpy(), max_fpr=0.3)
    return {"image_auroc": m["image_auroc"], "pixel_ap": m["pixel_ap"]}


def study(run: Path, data: Path) -> dict:
    cfg = load_config(profile="cpu")
    category = MVTecCategory(data)
    redi = load_detector(run / "candidates" / "redi" / "detector.pt")
    patchcore = load_detector(run / "candidates" / "patchcore" / "detector.pt")
    normals, synthetic = validation_set(redi, category, cfg)
    splits = {
        "val": (torch.cat([normals, synthetic.images]),
                np.r_[np.zeros(normals.shape[0], dtype=int), np.ones(len(synthetic), dtype=int)],
                torch.cat([torch.zeros(normals.shape[0], *synthetic.masks.shape[1:], dtype=torch.bool),
                           synthetic.masks]).numpy()),
        "test": (load_images(category.test, redi.image_size), np.array([s.label for s in category.test]),
                 load_masks(category.test, redi.image_size)[:, 0].bool().numpy()),
    }
    levels_normal = redi_levels(redi, normals)
    mean = levels_normal.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = levels_normal.std(dim=(0, 2, 3)).view(1, -1, 1, 1).clamp_min(1e-6)
    result = {}
    for split, (images, labels, masks) in splits.items():
        levels = redi_levels(redi, images)
        plain = blur(redi, levels.sum(dim=1))
        standardised = blur(redi, ((levels - mean) / std).sum(dim=1))
        pc = patchcore.predict(images)
        rows = {
            "redi max": measure(labels, plain.flatten(1).amax(1), masks, plain),
            "redi top1%": measure(labels, top_mean(plain), masks, plain),
            "redi levels standardised, max": measure(labels, standardised.flatten(1).amax(1), masks, standardised),
            "redi levels standardised, top1%": measure(labels, top_mean(standardised), masks, standardised),
            "patchcore reweighted": measure(labels, pc.score, masks, pc.anomaly_map),
            "patchcore max": measure(labels, pc.anomaly_map.flatten(1).amax(1), masks, pc.anomaly_map),
            "patchcore top1%": measure(labels, top_mean(pc.anomaly_map), masks, pc.anomaly_map),
        }
        result[split] = rows
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="RUN=DATA pairs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {}
    for pair in args.runs:
        run, data = pair.split("=")
        results[run] = study(Path(run), Path(data))
        print(run, json.dumps(results[run], indent=1))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
