"""``redi predict``: score image files with a trained detector; write scores.csv and map PNGs."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np

from redi.core.errors import InputError, RediError
from redi.core.images import IMAGE_SUFFIXES, load_rgb, to_uint8_rgb
from redi.methods.base import load_detector
from redi.core.utils import atomic_write_text, pick_device, progress


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the named folders."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.is_file():
            paths.append(item)
        else:
            raise InputError(f"{item} is neither an image file nor a folder")
    if not paths:
        raise InputError(f"no images found in {', '.join(map(str, inputs))} (looked for {sorted(IMAGE_SUFFIXES)})")
    return paths


def predict_paths(model: str | Path, inputs: list[str | Path], out_dir: str | Path, device: str = "auto",
                  batch_size: int = 8) -> list[dict[str, Any]]:
    """Score every image; a file that cannot be read gets an error row and the rest go on."""
    from redi.core.visualize import display_range, overlay, save_png

    model = Path(model)
    detector = load_detector(model / "detector.pt" if model.is_dir() else model, pick_device(device))
    out_dir = Path(out_dir)
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    paths = collect_images(inputs)
    threshold = float(detector.threshold)
    rows: list[dict[str, Any]] = []
    batches = range(0, len(paths), batch_size)
    for begin in progress(batches, len(batches), "[predict] batch"):
        batch_paths, images, batch_rows = [], [], {}
        for offset, path in enumerate(paths[begin:begin + batch_size]):
            try:
                images.append(load_rgb(path))
                batch_paths.append((offset, path))
            except RediError as exc:
                print(f"[predict] skipped {path}: {exc}", file=sys.stderr)
                batch_rows[offset] = {"path": str(path), "score": float("nan"), "anomalous": False,
                                      "error": str(exc)}
        if not images:
            rows += [batch_rows[k] for k in sorted(batch_rows)]
            continue
        # The same conversion and the same call (no prompt excluded) as the evaluate stage.
        batch = detector.preprocess(images)
        out = detector.predict(batch)
        for index, (offset, path) in enumerate(batch_paths):
            score = float(out.score[index])
            anomaly_map = out.anomaly_map[index].float().cpu().numpy()
            picture = overlay(to_uint8_rgb(batch[index]), anomaly_map, *display_range(threshold, anomaly_map))
            stem = f"{begin + offset:05d}_{path.stem}"
            save_png(out_dir / "maps" / f"{stem}_overlay.png", picture)
            np.save(out_dir / "maps" / f"{stem}_map.npy", anomaly_map.astype(np.float16))
            batch_rows[offset] = {"path": str(path), "score": score, "anomalous": score > threshold, "error": ""}
        rows += [batch_rows[k] for k in sorted(batch_rows)]  # keep the input order
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["path", "score", "anomalous", "error"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "scores.csv", text.getvalue())
    return rows
