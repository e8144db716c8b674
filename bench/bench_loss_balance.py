"""Measure how L_S weighs against L_D (the unweighted ratio L_S / L_D) for several backbones' widths.

L_S compares softmax-over-channels self-correlation matrices; its size depends on the channel
count c, L_D's (1 - cosine) does not. This script prints, for both L_S normalisations ("area":
||g_X - g_Y||_F / hw; "width": c/hw * ||g_X - g_Y||_F), the ratio L_S / L_D:

1. random features (standard normal) with the channel widths of efficientnet_lite2 (24/48/120),
   efficientnet_lite0 (24/40/112) and wide_resnet50_2 (256/512/1024) at 256 px, strides 4/8/16
   (64x64, 32x32, 16x16): Y independent of X (an untrained recovery) and Y = X + 0.3 noise (close);
2. real features of a few ``train/good`` images of a line against a slightly perturbed copy
   (Gaussian pixel noise) and against an untrained Feature Recovery Block's output (the state at
   the start of discriminate training): ``efficientnet_lite2`` with its ImageNet weights, and
   ``wide_resnet50_2`` with RANDOM weights (its ImageNet weights are not installed here; the
   ratio's dependence on the channel count is what this row shows, not a trained WRN's value).

Prints a markdown table; ``--out`` also writes it to a file.

    .venv/bin/python bench/bench_loss_balance.py --data ../shared/data/metal_plate --images 4 --out /tmp/balance.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from redi.core.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, _ResNetBody, build_backbone
from redi.core.images import load_rgb, preprocess
from redi.methods.redi.losses import LS_NORMALISATIONS, cosine_distance_loss, self_correlation_loss
from redi.methods.redi.discriminate import DiscriminateHead

WIDTHS = {"efficientnet_lite2": (24, 48, 120), "efficientnet_lite0": (24, 40, 112),
          "wide_resnet50_2": (256, 512, 1024)}
STRIDES = (4, 8, 16)


def balance(reference: list[torch.Tensor], recovered: list[torch.Tensor]) -> dict[str, float]:
    """L_D, and L_S and L_S / L_D under each normalisation; "peak": how peaked the softmax of F_X is.

    peak = mean over levels and positions of the largest softmax probability over channels: 1/c
    for flat features (every entry of g about 1/c), near 1 when one channel dominates each position.
    """
    loss_d = float(cosine_distance_loss(reference, recovered))
    peak = sum(float(torch.softmax(f.float(), dim=1).amax(dim=1).mean()) for f in reference) / len(reference)
    row = {"l_d": loss_d, "peak": peak}
    for normalisation in LS_NORMALISATIONS:
        loss_s = float(self_correlation_loss(reference, recovered, normalisation))
        row[f"l_s_{normalisation}"] = loss_s
        row[f"ratio_{normalisation}"] = loss_s / loss_d
    return row


def random_rows(size: int, batch: int, seed: int) -> list[tuple[str, str, dict[str, float]]]:
    """Rows for random N(0, 1) features of each backbone's widths."""
    rows = []
    for name, channels in WIDTHS.items():
        generator = torch.Generator().manual_seed(seed)
        x = [torch.randn(batch, c, size // s, size // s, generator=generator) for c, s in zip(channels, STRIDES)]
        independent = [torch.randn(f.shape, generator=generator) for f in x]
        close = [f + 0.3 * torch.randn(f.shape, generator=generator) for f in x]
        rows.append((f"random {name}", "Y independent", balance(x, independent)))
        rows.append((f"random {name}", "Y = X + 0.3 N(0,1)", balance(x, close)))
    return rows


def _random_wrn() -> Backbone:
    """wide_resnet50_2's stem and layer1..3 with torchvision's random init (no weights are installed)."""
    from torchvision.models import wide_resnet50_2

    return Backbone("wide_resnet50_2", _ResNetBody(wide_resnet50_2(weights=None)), (256, 512, 1024),
                    IMAGENET_MEAN, IMAGENET_STD)


@torch.inference_mode()
def real_rows(data: Path, count: int, size: int, seed: int) -> list[tuple[str, str, dict[str, float]]]:
    """Rows for backbone features of ``count`` train/good images vs perturbed copies and an untrained FRB."""
    paths = sorted((data / "train" / "good").glob("*.png"))[:count]
    if not paths:
        raise SystemExit(f"no PNG images under {data / 'train' / 'good'}")
    images = preprocess([load_rgb(p) for p in paths], size)
    generator = torch.Generator().manual_seed(seed)
    perturbed = {sigma: (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)
                 for sigma in (0.02, 0.1)}
    torch.manual_seed(seed)
    backbones = [("efficientnet_lite2 (ImageNet)", build_backbone("efficientnet_lite2")),
                 ("wide_resnet50_2 (RANDOM init)", _random_wrn().eval())]
    rows = []
    for label, backbone in backbones:
        fx = backbone.features(images)
        for sigma, copy in perturbed.items():
            rows.append((label, f"copy + {sigma} pixel noise", balance(fx, backbone.features(copy))))
        head = DiscriminateHead(tuple(backbone.channels)).eval()  # untrained FRB: discriminate step 0
        rows.append((label, "untrained FRB(F_X)", balance(fx, head(fx))))
    return rows


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    """Markdown table of the rows."""
    lines = ["| features | Y | softmax peak | L_D | L_S area | L_S width | L_S/L_D area | L_S/L_D width |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for features, pair, r in rows:
        lines.append(f"| {features} | {pair} | {r['peak']:.3f} | {r['l_d']:.4g} | {r['l_s_area']:.3g} | "
                     f"{r['l_s_width']:.3g} | {r['ratio_area']:.3g} | {r['ratio_width']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/metal_plate"),
                        help="a line's folder (with train/good); '' skips the real-feature rows")
    parser.add_argument("--images", type=int, default=4, help="train/good images for the real-feature rows")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="samples per random-feature row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = random_rows(args.size, args.batch, args.seed)
    if str(args.data) not in ("", "."):
        rows += real_rows(args.data, args.images, args.size, args.seed)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
