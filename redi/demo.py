"""The main job on demo data: a synthetic product line, trained, evaluated, ready to serve."""

from __future__ import annotations

import sys
from pathlib import Path

from redi.config import load_config
from redi.data.demo import make_demo_line


def run_demo(line: str, profile: str, workdir: Path, overrides: list[str] | None = None) -> dict[str, Path]:
    """Make the SYNTHETIC demo line (once), train every stage, evaluate, and say where things are."""
    from redi.stages import evaluate, train_all

    data_root = workdir / "data" / line
    if not (data_root / "train").is_dir():
        make_demo_line(data_root, line)
    cfg = load_config(profile=profile, overrides=[f"data.root={data_root}", *(overrides or [])])
    run_dir = workdir / "runs" / line
    paths = train_all(data_root, run_dir, cfg, line)
    paths["metrics"] = evaluate(paths["detector"], data_root, run_dir / "eval", cfg)
    paths["report"] = run_dir / "eval" / "report" / "index.html"
    print(f"demo line {line!r} (synthetic data), profile {profile}", file=sys.stderr)
    for key in ("detector", "metrics", "report"):
        print(f"{key}: {paths[key]}")
    return paths
