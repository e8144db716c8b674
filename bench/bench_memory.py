"""Memory per served line: artifact size and resident memory of a detector with a large prompt bank.

Builds a detector (``cpu_wide`` profile: paper-width recover net, EfficientNet-Lite2, 256 px, random
weights: sizes do not depend on their values) with a prompt bank of ``--images`` images, saves it,
and loads it twice in a fresh Python process that reports its resident memory (VmRSS): the first
load also pays for imports and caches, the second is what each further line of a service costs. Once with the recover net on (prompts used) and once with it off. Bank images:
the synthetic demo lines (``redi.data.demo.generate_pair``, no files written) and, when
``../shared/data/hazelnut`` exists, 256 px crops of the real MVTec hazelnut images.

    python bench/bench_memory.py --images 650 --out /tmp/bench_memory.md

Run it against older code (e.g. ``git archive <rev> redi | tar -x -C /tmp/old`` and
``PYTHONPATH=/tmp/old``) to measure the artifacts that code wrote: it only uses the API both have
(``Detector``, ``set_prompts``, ``save_detector``, ``load_detector``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from redi.core.config import load_config
from redi.methods.base import save_detector
from redi.methods.redi.detector import Detector

HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "hazelnut" / "train" / "good"
CONFIGS = {"recover on, prompt=nearest": [], "recover off": ["model.recover.enabled=false"]}

# Runs in a fresh process: RSS (after returning freed heap to the OS) after the imports, after
# loading the artifact once (the first line also pays for imports and caches) and after loading it
# a second time (what each further line of a multi-line service costs).
_PROBE = r"""
import ctypes, gc, json, sys
def rss():
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
import torch
from redi.methods.base import load_detector
before = rss()
first = load_detector(sys.argv[1])
after_first = rss()
second = load_detector(sys.argv[1])
after_second = rss()
state = second.state_dict()
weights = sum(v.numel() * v.element_size() for k, v in state.items() if "prompt_images" not in k)
store = getattr(second, "prompts", None)
prompt_bytes = store.nbytes if store is not None else 0
raw = state.get("prompt_images")
prompt_bytes += raw.numel() if raw is not None else 0
print(json.dumps({"first_line": after_first - before, "next_line": after_second - after_first,
                  "weights": weights, "prompt_bytes": prompt_bytes}))
"""


def demo_images(line: str, count: int, size: int) -> torch.Tensor:
    """``count`` normal demo images of ``line`` as float (N, 3, S, S) in [0, 1]."""
    from redi.data.demo import generate_pair

    arrays = [generate_pair(line, size, 0, "train", i).image for i in range(count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def hazelnut_images(count: int, size: int) -> torch.Tensor:
    """``count`` random square crops (60-100 % of the side) of the real hazelnut images at ``size``."""
    from redi.core.images import load_rgb, preprocess

    files = sorted(HAZELNUT.iterdir())
    rng = np.random.default_rng(0)
    crops = []
    for i in range(count):
        rgb = load_rgb(files[i % len(files)])
        side = int(rng.integers(int(0.6 * min(rgb.shape[:2])), min(rgb.shape[:2]) + 1))
        top, left = (int(rng.integers(0, rgb.shape[d] - side + 1)) for d in (0, 1))
        crop = rgb[top:top + side, left:left + side]
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return preprocess(crops, size)


def measure(images: torch.Tensor, overrides: list[str], folder: Path) -> dict[str, float]:
    """Save a detector with this bank and load it in a fresh process; sizes in bytes."""
    cfg = load_config(profile="cpu_wide", overrides=overrides)  # the paper-width recover net
    detector = Detector(cfg, num_prompts=images.shape[0])
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(images.shape[0], detector.backbone.embedding_dim, generator=generator)
    started = time.perf_counter()
    detector.set_prompts(embeddings, images, [f"train/good/{i:04d}" for i in range(images.shape[0])])
    encode_s = time.perf_counter() - started
    path = save_detector(detector, folder / "detector.pt")
    # cwd=folder: `python -c` puts the cwd first on sys.path, which must not shadow PYTHONPATH
    probe = subprocess.run([sys.executable, "-c", _PROBE, str(path.resolve())], capture_output=True, text=True,
                           check=True, cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    result.update({"artifact": path.stat().st_size, "set_prompts_s": encode_s})
    path.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=650)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--banks", nargs="+", default=["bottle_caps", "woven_fabric", "hazelnut"])
    parser.add_argument("--label", default="", help="what code ran (e.g. the commit), for the table")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    mb = 1 / 2**20
    rows = [f"Machine: {platform.machine()}, torch {torch.__version__}, {args.images} bank images at {args.size} px, "
            f"cpu_wide profile (paper-width recover net, efficientnet_lite2). {args.label}", "",
            "| bank images | configuration | artifact MB | RSS, first line MB | RSS, each further line MB "
            "| network weights MB | prompt images held MB | further line beyond weights MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for bank in args.banks:
            if bank == "hazelnut" and not HAZELNUT.is_dir():
                print(f"skipping hazelnut: {HAZELNUT} is absent", file=sys.stderr)
                continue
            images = (hazelnut_images if bank == "hazelnut" else lambda n, s: demo_images(bank, n, s))(args.images,
                                                                                                         args.size)
            for name, overrides in CONFIGS.items():
                r = measure(images, overrides, Path(tmp))
                rows.append(f"| {bank} | {name} | {r['artifact'] * mb:.1f} | {r['first_line'] * mb:.1f} "
                            f"| {r['next_line'] * mb:.1f} | {r['weights'] * mb:.1f} | {r['prompt_bytes'] * mb:.1f} "
                            f"| {(r['next_line'] - r['weights']) * mb:.1f} |")
                print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
