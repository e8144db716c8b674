"""The method study of issue 9: every option on the real dev sets, validation and test side by side.

Each variant is a profile plus ``--set`` overrides; each run trains every stage (``redi train``),
scores the synthetic validation set built from the training data alone (``redi validate``) and
the test split (``redi evaluate``). Options are chosen on the validation columns; the test
columns show whether validation predicted them.

    python bench/method_study.py --data ../shared/data/hazelnut ../shared/data/metal_plate \
        --variants rd small small_imgscale --seeds 0 --runs runs/study --out docs/method_study.json
    python bench/method_study.py --out docs/method_study.json --table   # the markdown tables
    python bench/method_study.py --out docs/anticopy_study.json --decisions   # the champion rule's
        # validation score beside the test decisions at the served threshold

Each row's CLI equivalent is in its ``command`` field.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from redi.core.config import load_config, save_config
from redi.workflow.stages import evaluate, train_all
from redi.workflow.validation import validate

SMALL = ["model.recover.base_width=16", "model.recover.depth=4", "model.recover.input_size=128"]
# The study ran before the cpu profile adopted flips and the 2x bottleneck; every variant pins the
# settings it ran with, so each row is reproduced whatever the profile's defaults become.
PINNED = ["model.bottleneck_ratio=1.0", "train.augment_flip=false"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "rd": ("cpu", ["model.recover.enabled=false"]),  # recover off: Reverse Distillation + L_S
    "paper_width": ("cpu_wide", []),  # the paper-width recover net (32-512, 5 levels, 256 px)
    "small": ("cpu", SMALL),  # a narrower, shallower recover net at 128 px
    "tinyrec": ("cpu", ["model.recover.base_width=8", "model.recover.depth=3", "model.recover.input_size=128"]),
    "small_imgscale": ("cpu", [*SMALL, "model.selfmap.scale=image"]),
    "small_oof": ("cpu", [*SMALL, "train.recover_folds=3"]),
    "small_bestval": ("cpu", [*SMALL, "train.recover_select=best_val"]),
    "small_flip": ("cpu", [*SMALL, "train.augment_flip=true"]),
    "small_flip_bankaug": ("cpu", [*SMALL, "train.augment_flip=true", "model.prompt_transforms=[hflip,vflip,rot180]"]),
    "small_flip_bottleneck": ("cpu", [*SMALL, "train.augment_flip=true", "model.bottleneck_channels=240"]),
    "small_k3": ("cpu", [*SMALL, "model.prompt_k=3"]),
    "small_bankaug": ("cpu", [*SMALL, "model.prompt_transforms=[hflip,vflip,rot180]"]),
    "small_lswidth": ("cpu", [*SMALL, "train.ls_normalisation=width"]),
    "small_letterbox": ("cpu", [*SMALL, "data.aspect=letterbox"]),
    "small_bottleneck": ("cpu", [*SMALL, "model.bottleneck_channels=240"]),
    "rd_bottleneck": ("cpu", ["model.recover.enabled=false", "model.bottleneck_channels=240"]),
    # twice the cpu profile's step budget, both stages, milestones at the same fractions
    "small_2x": ("cpu", [*SMALL, "train.recover.steps=480", "train.recover.milestones=[300,420]",
                         "train.discriminate.steps=360", "train.discriminate.milestones=[180,300]"]),
    "rd_2x": ("cpu", ["model.recover.enabled=false", "train.discriminate.steps=360",
                      "train.discriminate.milestones=[180,300]"]),
}
VARIANTS = {name: (profile, [*PINNED, *overrides]) for name, (profile, overrides) in VARIANTS.items()}
VARIANTS["default"] = ("cpu", [])  # whatever the cpu profile is now (after the study: its chosen settings)
# ReDi alone at the cpu profile's current settings, and the anti-copying options of issue 17 on top
VARIANTS["redi"] = ("cpu", ["model.candidates=[]"])
VARIANTS["redi_dropout"] = ("cpu", ["model.candidates=[]", "model.bottleneck_dropout=0.2"])
VARIANTS["redi_masknoise"] = ("cpu", ["model.candidates=[]", "train.feature_noise=1.0"])
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def cli_command(profile: str, overrides: list[str], data: Path, run: Path, seed: int) -> str:
    """The redi commands that make the same row."""
    sets = " ".join(f"--set {o}" for o in [*overrides, f"train.seed={seed}"])
    return (f"redi train {data} --out {run} --profile {profile} {sets}; "
            f"redi validate-detector {run} {data} --out {run}/val; redi evaluate {run} {data} --out {run}/eval")


def run_variant(name: str, data: Path, runs: Path, seed: int) -> dict:
    """Train, validate on synthetic defects and evaluate on the test split: one row."""
    profile, overrides = VARIANTS[name]
    cfg = load_config(profile=profile, overrides=[f"data.root={data}", f"train.seed={seed}", *overrides])
    run = runs / data.name / f"{name}_s{seed}"
    save_config(cfg, run / "config.yaml")
    started = time.perf_counter()
    detector = train_all(data, run, cfg, line=data.name)["detector"]
    train_seconds = time.perf_counter() - started
    recover_history = run / "recover_history.json"
    recover_seconds = (sum(e["seconds"] for e in json.loads(recover_history.read_text()))
                       if recover_history.is_file() else 0.0)
    val = json.loads(validate(detector, data, run / "val", cfg).read_text())
    test = json.loads(evaluate(detector, data, run / "eval", cfg).read_text())
    row = {"variant": name, "data": data.name, "seed": seed, "profile": profile, "overrides": overrides,
           "train_seconds": train_seconds, "recover_seconds": recover_seconds,
           "test_seconds_per_image": test.get("seconds_per_image"),
           "command": cli_command(profile, overrides, data, run, seed)}
    row.update({f"val_{k}": val["metrics"].get(k) for k in METRICS})
    row.update({f"test_{k}": test.get(k) for k in METRICS})
    row["val_margin"] = val.get("recommended_margin")
    row["val_recall"] = val.get("recall_at_threshold")  # at the served threshold: the champion rule's third term
    row["test_false_alarm_rate"] = test.get("false_alarm_rate_at_threshold")
    row["test_recall"] = test.get("recall_at_threshold")
    return row


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _spread(rows: list[dict], key: str) -> str:
    """Mean in percent, with the seeds' standard deviation when there are several."""
    values = [100 * r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown_table(results: list[dict]) -> str:
    """One row per (data set, variant): means over its seeds, validation and test side by side, in percent."""
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}"

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["data"], r["variant"]), []).append(r)
    lines = ["| data | variant | seeds | val image AUROC | val pixel AP | test image AUROC | test pixel AUROC "
             "| test pixel AP | test AUPRO | train s | recover s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (data, variant), rows in sorted(groups.items()):
        seeds = ",".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
        lines.append(f"| {data} | {variant} | {seeds} | {pct(_mean(rows, 'val_image_auroc'))} | "
                     f"{_spread(rows, 'val_pixel_ap')} | {pct(_mean(rows, 'test_image_auroc'))} | "
                     f"{pct(_mean(rows, 'test_pixel_auroc'))} | {_spread(rows, 'test_pixel_ap')} | "
                     f"{pct(_mean(rows, 'test_aupro'))} | {_mean(rows, 'train_seconds'):.0f} | "
                     f"{_mean(rows, 'recover_seconds'):.0f} |")
    return "\n".join(lines) + "\n"


def decision_table(results: list[dict]) -> str:
    """One row per (data set, variant), means ± seeds' sd in percent: the champion rule's validation
    score (mean of validation image AUROC, pixel AP and recall at the served threshold,
    :func:`redi.workflow.champion.selection_score`) beside the test numbers at the served threshold."""
    for r in results:
        if None not in (r.get("val_image_auroc"), r.get("val_pixel_ap"), r.get("val_recall")):
            r["val_score"] = statistics.fmean([r["val_image_auroc"], r["val_pixel_ap"], r["val_recall"]])
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["data"], r["variant"]), []).append(r)
    keys = ("val_score", "val_image_auroc", "val_pixel_ap", "val_recall", "test_image_auroc", "test_pixel_ap",
            "test_aupro", "test_recall", "test_false_alarm_rate")
    lines = ["| data | variant | seeds | val score | val image AUROC | val pixel AP | val recall @thr | "
             "test image AUROC | test pixel AP | test AUPRO | test recall @thr | test false calls @thr |",
             "|---|---|---|" + "---:|" * len(keys)]
    for (data, variant), rows in sorted(groups.items()):
        seeds = ",".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
        lines.append(f"| {data} | {variant} | {seeds} | " + " | ".join(_spread(rows, k) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def margin_rows(runs: Path, data: str, variant: str, seeds: list[int]) -> str:
    """Markdown rows: the margin validation recommends, and the test recall / false alarms it gives
    against the default margin 1.0 (read from each run's val_metrics.json and eval/scores.json)."""
    lines = []
    for seed in seeds:
        run = runs / data / f"{variant}_s{seed}"
        val = json.loads((run / "val" / "val_metrics.json").read_text())
        scores = json.loads((run / "eval" / "scores.json").read_text())
        threshold = json.loads((run / "eval" / "metrics.json").read_text())["threshold"]
        margin = val["recommended_margin"]

        def rates(limit: float) -> str:
            flagged = [s for s in scores if s["score"] > limit]
            defects = [s for s in scores if s["label"] == 1]
            normals = [s for s in scores if s["label"] == 0]
            recall = sum(s["label"] == 1 for s in flagged) / max(len(defects), 1)
            false_alarms = sum(s["label"] == 0 for s in flagged) / max(len(normals), 1)
            return f"{100 * recall:.1f} / {100 * false_alarms:.1f}"

        lines.append(f"| {data} | {variant} | {seed} | {margin:.2f} | {rates(threshold)} | "
                     f"{rates(threshold * margin)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", default=[])
    parser.add_argument("--variants", nargs="+", default=["rd", "small"], choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/study"))
    parser.add_argument("--out", type=Path, default=Path("docs/method_study.json"))
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    parser.add_argument("--decisions", action="store_true",
                        help="print the validation score and the decisions at the served threshold of --out and stop")
    args = parser.parse_args()
    if args.table or args.decisions:
        results = json.loads(args.out.read_text())
        print((decision_table if args.decisions else markdown_table)(results), end="")
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    for seed in args.seeds:
        for name in args.variants:
            for data in args.data:
                row = run_variant(name, data.resolve(), args.runs, seed)
                key = (row["data"], name, seed)
                results = [r for r in results if (r["data"], r["variant"], r["seed"]) != key] + [row]
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2))  # after every run: nothing lost if stopped
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
