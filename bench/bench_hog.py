"""Benchmark: skimage's rendered HOG picture vs redi's batched TorchHOG on the CPU.

Both run on the same images in the same process, interleaved repeat by repeat so that load from
other processes affects both alike. Prints a markdown table (per-image wall-clock and process CPU
time, speed-ups, max / mean abs difference of the [0, 1] maps) and optionally writes it to a file.
CPU time (``time.process_time``, all threads) is the fairer number on a shared, loaded machine.

    python bench/bench_hog.py --sizes 256 --batch 1 8 --repeats 5 --threads 1 --out docs/bench_hog.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data, transform
from skimage.util import img_as_ubyte

from redi.core.selfmaps import TorchHOG, hog_image_skimage

IMAGE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "brick", "grass", "gravel", "camera")


def load_images(size: int, count: int) -> list[np.ndarray]:
    """``count`` skimage sample images as (size, size, 3) uint8, cycling through IMAGE_NAMES."""
    images = []
    for i in range(count):
        image = getattr(data, IMAGE_NAMES[i % len(IMAGE_NAMES)])()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        image = transform.resize(image[..., :3], (size, size), anti_aliasing=True)
        images.append(img_as_ubyte(image))
    return images


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] from a list of uint8 (H, W, 3) images."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)


def bench_one(size: int, batch: int, repeats: int, model: TorchHOG) -> dict[str, float]:
    """Median per-image milliseconds of both implementations and their differences."""
    images = load_images(size, batch)
    x = to_batch(images)
    with torch.inference_mode():
        model(x)  # warm-up: builds the cached render plan and cell index for this size
        times: dict[str, list[float]] = {"ref_wall": [], "ref_cpu": [], "torch_wall": [], "torch_cpu": []}
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            reference = np.stack([hog_image_skimage(im, model.orientations, model.cell) for im in images])
            times["ref_wall"].append((time.perf_counter() - wall) / batch)
            times["ref_cpu"].append((time.process_time() - cpu) / batch)
            wall, cpu = time.perf_counter(), time.process_time()
            ours = model(x)[:, 0].numpy()
            times["torch_wall"].append((time.perf_counter() - wall) / batch)
            times["torch_cpu"].append((time.process_time() - cpu) / batch)
    diff = np.abs(ours - reference)
    row = {key: 1e3 * statistics.median(values) for key, values in times.items()}
    row.update(size=size, batch=batch, max_diff=float(diff.max()), mean_diff=float(diff.mean()))
    return row


def markdown(rows: list[dict[str, float]], threads: int, repeats: int, model: TorchHOG) -> str:
    """The results as a markdown table with a one-line header describing the run."""
    lines = [
        f"HOG picture ({model.orientations} orientations, {model.cell}px cells), CPU "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{threads} torch thread(s), median of {repeats} repeats, times per image.",
        "",
        "| size | batch | skimage wall ms/img | TorchHOG wall ms/img | speed-up (wall) "
        "| skimage CPU ms/img | TorchHOG CPU ms/img | speed-up (CPU) | max abs diff | mean abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['ref_wall']:.2f} | {r['torch_wall']:.2f} | "
            f"{r['ref_wall'] / r['torch_wall']:.1f}x | {r['ref_cpu']:.2f} | {r['torch_cpu']:.2f} | "
            f"{r['ref_cpu'] / r['torch_cpu']:.1f}x | {r['max_diff']:.1e} | {r['mean_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256], help="square image sizes")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per setting")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--orientations", type=int, default=9)
    parser.add_argument("--cell", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (e.g. docs/bench_hog.md)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = TorchHOG(args.orientations, args.cell).eval()
    rows = [bench_one(size, batch, args.repeats, model) for size in args.sizes for batch in args.batch]
    table = markdown(rows, args.threads, args.repeats, model)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
