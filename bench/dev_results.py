"""Train and evaluate full ReDi and its ablations on real dev sets; write a results table.

The ReDi variants use the ``cpu_wide`` profile (the paper-width recover net). The rows in
docs/results_runs.json were made when that net was the ``cpu`` profile's, with a 40-epoch budget;
the method study of issue 9 (``bench/method_study.py``) supersedes them.

Variants share what they can, exactly as the stage functions allow:
- ``full``: every stage (``redi train`` + ``redi evaluate``);
- ``ls_off``: full's prompt bank and recover net, discriminate net retrained without L_S;
- ``recover_off``: full's prompt bank, no recover net (the recovery branch sees X: RD + L_S);
- ``prompt_none``: the recover net retrained with a zero prompt (the paper's "Free");
- ``fast``: every stage with the ``fast`` profile;
- ``fast_png``: ``fast`` with lossless (PNG) prompt images instead of the default WebP q85.

    python bench/dev_results.py --data ../shared/data/metal_plate ../shared/data/hazelnut \
        --variants full recover_off ls_off prompt_none fast --runs runs/results --out docs/results_runs.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from redi.core.config import load_config, save_config
from redi.methods.redi.fit import precompute_selfmaps, train_discriminate, train_recover
from redi.workflow.stages import evaluate, train_all

VARIANTS = {
    "full": ("cpu_wide", []),
    "recover_off": ("cpu_wide", ["model.recover.enabled=false"]),
    "ls_off": ("cpu_wide", ["train.use_self_correlation=false"]),
    "prompt_none": ("cpu_wide", ["model.prompt=none"]),
    "fast": ("fast", []),
    "fast_png": ("fast", ["model.prompt_codec=png"]),  # lossless prompts: what the WebP default costs
}

CLI = {
    "full": "redi train {data} --out {run} --profile cpu_wide",
    "recover_off": "redi train-discriminate {data} --bank {full}/prompt_bank.pt --recover none --out {run} "
                   "--profile cpu_wide --set model.recover.enabled=false",
    "ls_off": "redi train-discriminate {data} --bank {full}/prompt_bank.pt --recover {full}/recover.pt --out {run} "
              "--profile cpu_wide --set train.use_self_correlation=false",
    "prompt_none": "redi train-recover {data} --bank {full}/prompt_bank.pt --out {run} --profile cpu_wide "
                   "--set model.prompt=none; redi train-discriminate ... --set model.prompt=none",
    "fast": "redi train {data} --out {run} --profile fast",
    "fast_png": "redi train {data} --out {run} --profile fast --set model.prompt_codec=png",
}


def run_variant(name: str, data: Path, runs: Path) -> dict:
    """Train (reusing full's artifacts where the variant allows) and evaluate one variant."""
    profile, overrides = VARIANTS[name]
    cfg = load_config(profile=profile, overrides=[f"data.root={data}", *overrides])
    run, full = runs / name, runs / "full"
    started = time.perf_counter()
    save_config(cfg, run / "config.yaml")
    if name in ("full", "fast", "fast_png"):
        detector = train_all(data, run, cfg, line=data.name)["detector"]
    elif name == "recover_off":
        detector = train_discriminate(data, full / "prompt_bank.pt", run / "none", run, cfg, line=data.name)
    elif name == "ls_off":
        detector = train_discriminate(data, full / "prompt_bank.pt", full / "recover.pt", run, cfg, line=data.name)
    else:  # prompt_none
        maps = precompute_selfmaps(data, run, cfg)
        recover = train_recover(data, full / "prompt_bank.pt", run, cfg, maps)
        detector = train_discriminate(data, full / "prompt_bank.pt", recover, run, cfg, line=data.name)
    train_seconds = time.perf_counter() - started
    metrics = json.loads(evaluate(detector, data, run / "eval", cfg).read_text())
    history = {}
    for stage in ("recover", "discriminate"):
        path = run / f"{stage}_history.json"
        if path.is_file() and json.loads(path.read_text()):
            epochs = json.loads(path.read_text())
            history[f"{stage}_seconds_per_epoch"] = sum(e["seconds"] for e in epochs) / len(epochs)
    return {"variant": name, "data": data.name, "profile": profile, "overrides": overrides,
            "train_seconds": train_seconds, "command": CLI[name].format(data=data, run=run, full=full),
            **history, **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro",
                                                       "threshold", "recall_at_threshold",
                                                       "false_alarm_rate_at_threshold", "seconds_per_image")}}


def markdown_table(results: list[dict]) -> str:
    """The results as a markdown table, one row per (data set, variant), in percent."""
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}"

    lines = ["| data | variant | profile | image AUROC | pixel AUROC | pixel AP | AUPRO | recall / false alarms at threshold "
             "| train s | recover s/epoch | discriminate s/epoch |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['data']} | {r['variant']} | {r['profile']} | {pct(r['image_auroc'])} | "
                     f"{pct(r['pixel_auroc'])} | {pct(r['pixel_ap'])} | {pct(r['aupro'])} | "
                     f"{pct(r['recall_at_threshold'])} / {pct(r['false_alarm_rate_at_threshold'])} | "
                     f"{r['train_seconds']:.0f} | {r.get('recover_seconds_per_epoch', 0):.1f} | "
                     f"{r.get('discriminate_seconds_per_epoch', 0):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", default=[])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs", type=Path, default=Path("runs/results"))
    parser.add_argument("--out", type=Path, default=Path("docs/results_runs.json"))
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())), end="")
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    for data in args.data:
        for name in args.variants:
            row = run_variant(name, data.resolve(), args.runs / data.name)
            results = [r for r in results if (r["data"], r["variant"]) != (row["data"], name)] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))  # after every run: nothing lost if stopped
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
