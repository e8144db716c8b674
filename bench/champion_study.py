"""The champion per line of issue 17 on the real dev sets: every candidate on validation and test,
which one validation chose, and how far the chosen one is from the best on test.

Each run is ``redi train DATA --out RUN --profile cpu --set train.seed=SEED`` then
``redi evaluate RUN DATA --out RUN/eval`` (the cpu profile's candidates: redi, patchcore, fused).

    python bench/champion_study.py --data ../shared/data/hazelnut ../shared/data/metal_plate \
        ../shared/data/grid --seeds 0 1 2 --runs runs/champion --out docs/champion_study.json
    python bench/champion_study.py --runs runs/champion --out docs/champion_study.json --table

``--collect`` reads finished runs (``RUNS/s<seed>_<set>``) without training. ``--set KEY=VALUE``
(repeatable) goes to ``redi train``, e.g. ``--set data.aspect=native`` for the strip study.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

KEYS = ("image_auroc", "pixel_ap", "aupro", "recall_at_threshold", "false_call_rate_at_threshold")
VAL_KEYS = ("image_auroc", "pixel_ap", "recall_at_threshold")


def run_one(data: Path, out: Path, seed: int, settings: list[str] = ()) -> None:
    redi = [str(Path(sys.executable).parent / "redi")]
    extra = [arg for setting in settings for arg in ("--set", setting)]
    out.parent.mkdir(parents=True, exist_ok=True)
    for command in ([*redi, "train", str(data), "--out", str(out), "--profile", "cpu", "--set", f"train.seed={seed}",
                     *extra],
                    [*redi, "evaluate", str(out), str(data), "--out", str(out / "eval"), "--set", f"train.seed={seed}"]):
        with open(out.with_suffix(".log"), "a") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)


def collect(runs: Path) -> list[dict]:
    """One record per finished run: set, seed, and the evaluate stage's candidate table."""
    records = []
    for metrics_path in sorted(runs.glob("s*_*/eval/metrics.json")):
        run = metrics_path.parents[1]
        seed, name = run.name[1:].split("_", 1)
        metrics = json.loads(metrics_path.read_text())
        summary = metrics["candidates"]
        records.append({"set": name, "seed": int(seed), "champion": summary["champion"],
                        "test_best": summary.get("test_best"), "kendall_tau": summary.get("kendall_tau"),
                        "candidates": {row["name"]: {"selection_score": row["selection_score"],
                                                     "validation": {k: row["validation"].get(k) for k in VAL_KEYS},
                                                     "test": {k: row["test"].get(k) for k in KEYS}}
                                       for row in summary["rows"]}})
    return records


def _mean(values: list[float | None]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(records: list[dict]) -> str:
    lines = ["| set | candidate | chosen (seeds) | val score | val image AUROC | val pixel AP | val recall @thr | "
             "test image AUROC | test pixel AP | test AUPRO | test recall @thr | test false calls @thr |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in sorted({r["set"] for r in records}):
        runs = [r for r in records if r["set"] == name]
        for candidate in runs[0]["candidates"]:
            rows = [r["candidates"][candidate] for r in runs]
            chosen = [str(r["seed"]) for r in runs if r["champion"] == candidate]
            lines.append(f"| {name} | {candidate} | {','.join(chosen) or '-'} | "
                         f"{_mean([row['selection_score'] for row in rows])} | "
                         + " | ".join(_mean([row["validation"][k] for row in rows]) for k in VAL_KEYS) + " | "
                         + " | ".join(_mean([row["test"][k] for row in rows]) for k in KEYS) + " |")
        served = [r["candidates"][r["champion"]]["test"] for r in runs]
        lines.append(f"| {name} | **served (the champion)** | {len(runs)} seeds | | | | | "
                     + " | ".join(_mean([s[k] for s in served]) for k in KEYS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="*", type=Path, default=[])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--collect", action="store_true", help="read finished runs only")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting for redi train (repeatable)")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    if not args.collect:
        for seed in args.seeds:
            for data in args.data:
                out = args.runs / f"s{seed}_{data.name}"
                run_one(data, out, seed, args.settings)
    records = collect(args.runs)
    args.out.write_text(json.dumps(records, indent=2) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
