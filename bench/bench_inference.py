"""Inference speed of the ReDi detector, with a breakdown of where the time goes.

Runs every configuration side by side in one process on the same random inputs: the paper-width
model in fp32 and with the bf16 recover net, two cheaper recover nets, the ``fast`` configuration
and the recover-off ablation. Weights are random (speed does not depend on them); the prompt bank holds
``--bank`` images. Example:

    python bench/bench_inference.py --threads 2 --batches 1 8 --repeats 5 --out docs/bench_inference.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from redi.core.config import load_config
from redi.methods.redi.detector import Detector

CONFIGS = {
    "paper-width, fp32 (cpu_wide profile)": ("cpu_wide", ["model.recover.precision=fp32"]),
    "paper-width, bf16 recover (cpu_wide profile)": ("cpu_wide", ["model.recover.precision=bf16"]),
    "small recover net (16-128, 4 levels, 128 px; cpu profile)": ("cpu", []),
    "smallest recover net (8-32, 3 levels, 128 px), Lite2": ("cpu", ["model.recover.base_width=8",
                                                                "model.recover.depth=3",
                                                                "model.recover.input_size=128"]),
    "fast (cpu profile with Lite0)": ("fast", []),
    "recover off (RD + L_S)": ("cpu", ["model.recover.enabled=false"]),
}
PARTS = ("backbone(X)", "prompt retrieval", "self-map (HOG)", "recover net", "backbone(Y)", "FRB", "map post-processing")


class Timer:
    """Accumulates wall time per named part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@torch.inference_mode()
def timed_forward(detector: Detector, x: torch.Tensor, timer: Timer) -> torch.Tensor:
    """The detector's forward, step by step, timing each step (same calls as Detector.forward)."""
    with timer.part("backbone(X)"):
        reference = detector.backbone(x)
    with timer.part("prompt retrieval"):
        index = detector.select_prompts(reference.embedding)
        # prompt images are decoded only where the recover net uses them (as recover_image does)
        prompts = detector.prompt_batch(index, x) if detector.use_recover else None
    if detector.use_recover:
        with timer.part("self-map (HOG)"):
            selfmap = detector.selfmap(x)
        with timer.part("recover net"):
            from redi.core.utils import bf16_autocast, use_bf16

            with bf16_autocast(use_bf16(detector.cfg.model.recover.precision, x.device), x.device):
                recovered = detector.recover(selfmap, prompts).float()
    else:
        recovered = x
    with timer.part("backbone(Y)"):
        features = detector.backbone(recovered).features
    with timer.part("FRB"):
        features = detector.head(features)
    with timer.part("map post-processing"):
        maps = detector.anomaly_maps(reference.features, features)
        scores = maps.flatten(1).amax(dim=1)
    return scores


def build(profile: str, overrides: list[str], bank: int) -> Detector:
    cfg = load_config(profile=profile, overrides=overrides)
    detector = Detector(cfg, num_prompts=bank).eval()
    size = cfg.data.image_size
    generator = torch.Generator().manual_seed(0)
    detector.set_prompts(torch.randn(bank, detector.backbone.embedding_dim, generator=generator),
                         torch.rand(bank, 3, size, size, generator=generator), [f"p{i}" for i in range(bank)])
    detector.threshold.fill_(1.0)
    return detector


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    detectors = {name: build(profile, overrides, args.bank) for name, (profile, overrides) in CONFIGS.items()}
    rows, breakdown = [], []
    for batch in args.batches:
        x = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(1))
        for name, detector in detectors.items():
            detector.predict(x)  # warm-up (oneDNN primitive creation)
            totals, timer = [], Timer()
            for _ in range(args.repeats):
                start = time.perf_counter()
                detector.predict(x)
                totals.append(time.perf_counter() - start)
                timed_forward(detector, x, timer)
            per_image = statistics.median(totals) / batch
            rows.append(f"| {name} | {batch} | {per_image * 1000:.1f} | {1 / per_image:.2f} |")
            parts = {p: timer.seconds.get(p, 0.0) / args.repeats / batch * 1000 for p in PARTS}
            breakdown.append(f"| {name} | {batch} | " + " | ".join(f"{parts[p]:.1f}" for p in PARTS) + " |")
    header = (f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, torch "
              f"{torch.__version__}, 256 px input, prompt bank of {args.bank}, median of {args.repeats} runs.\n\n"
              "| configuration | batch | ms / image | images / s |\n|---|---:|---:|---:|\n")
    parts_header = ("\n\nBreakdown, ms / image (the same steps timed one by one):\n\n| configuration | batch | "
                    + " | ".join(PARTS) + " |\n|---|---:|" + "---:|" * len(PARTS) + "\n")
    return header + "\n".join(rows) + parts_header + "\n".join(breakdown) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bank", type=int, default=40)
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if args.out:
        args.out.write_text(f"Command: `python bench/bench_inference.py --threads {args.threads} --batches "
                            f"{' '.join(map(str, args.batches))} --repeats {args.repeats}`\n\n" + text)


if __name__ == "__main__":
    main()
