"""Side-by-side anomaly maps of two trained detectors on the same test images: where they differ.

For each data set it draws, per chosen image, the input with its ground-truth outline, detector
A's map, detector B's map (on one colour scale per image: the larger of the two thresholds x 2)
and B's recovered image Y. The images shown are the highest-scoring normals of B (its false
alarms) and the defects where B's pixel AP falls furthest below A's.

    python bench/compare_maps.py --a runs/study/metal_plate/rd_s0 --b runs/study/metal_plate/small_s0 \
        --data ../shared/data/metal_plate --out docs/img/metal_plate_rd_vs_redi.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from redi.data.dataset import load_images, load_masks
from redi.data.mvtec import MVTecCategory
from redi.core.images import to_uint8_rgb
from redi.core.metrics import pixel_ap
from redi.methods.base import load_detector
from redi.methods.common import score_images
from redi.core.visualize import mask_contour, overlay, save_png, strip


def _pick(labels: np.ndarray, scores_b: np.ndarray, ap_gap: np.ndarray, normals: int, defects: int) -> list[int]:
    """The top-scoring normals of B and the defects where B trails A most in pixel AP."""
    normal_idx = [int(i) for i in np.argsort(-scores_b) if labels[i] == 0][:normals]
    defect_idx = [int(i) for i in np.argsort(ap_gap) if labels[i] == 1][:defects]
    return normal_idx + defect_idx


def compare(run_a: Path, run_b: Path, data: Path, out: Path, normals: int = 2, defects: int = 3) -> Path:
    """Draw the comparison picture; returns its path."""
    a, b = load_detector(run_a / "detector.pt"), load_detector(run_b / "detector.pt")
    test = MVTecCategory(data).test
    images = load_images(test, b.image_size, b.cfg.data.aspect)
    masks = load_masks(test, b.image_size, b.cfg.data.aspect)[:, 0].bool().numpy()
    out_a = score_images(a, images, keep_maps=True)
    out_b = score_images(b, images, keep_maps=True, keep_pictures=True)
    labels = np.array([s.label for s in test])
    gap = np.array([pixel_ap(masks[i:i + 1], out_b["maps"][i:i + 1].numpy())
                    - pixel_ap(masks[i:i + 1], out_a["maps"][i:i + 1].numpy()) if labels[i] else 0.0
                    for i in range(len(test))])
    rows = []
    for i in _pick(labels, out_b["scores"].numpy(), gap, normals, defects):
        rgb = to_uint8_rgb(images[i])
        top = max(float(a.threshold), float(b.threshold))
        vmin, vmax = 0.5 * top, 1.3 * top
        what = "normal" if labels[i] == 0 else f"{test[i].defect_type}, AP gap {100 * gap[i]:+.0f}"
        rows.append(strip([
            (mask_contour(rgb, masks[i]), f"{test[i].image_id.split('/')[-1]} ({what})"),
            (overlay(rgb, out_a["maps"][i].numpy(), vmin, vmax), f"A {float(out_a['scores'][i]):.2f} / thr {float(a.threshold):.2f}"),
            (overlay(rgb, out_b["maps"][i].numpy(), vmin, vmax), f"B {float(out_b['scores'][i]):.2f} / thr {float(b.threshold):.2f}"),
            (to_uint8_rgb(out_b["pictures"]["recovered Y"][i]), "B recovered Y"),
        ]))
    width = max(r.shape[1] for r in rows)
    picture = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    return save_png(out, picture)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True, help="run folder of detector A (e.g. recover off)")
    parser.add_argument("--b", type=Path, required=True, help="run folder of detector B (e.g. full ReDi)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--normals", type=int, default=2)
    parser.add_argument("--defects", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(compare(args.a, args.b, args.data, args.out, args.normals, args.defects))


if __name__ == "__main__":
    main()
