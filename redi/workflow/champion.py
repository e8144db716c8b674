"""A champion per line, chosen without test labels: fit the line's candidates, measure each on
validation (held-out normals plus synthetic defects, :mod:`redi.workflow.validation`), keep the best.

The rule (fixed before any test number was looked at, and the same for every line):

    selection score = mean of (validation image AUROC, validation pixel AP,
                               validation recall at the candidate's own served threshold)

The highest score wins; a candidate within :data:`TIE` of the best loses only to one listed
earlier in ``model.candidates`` (ReDi, the core, is listed first by default). The first two
measure how well the scores and maps separate synthetic defects from normals; the third is the
decision the line will act on, at the threshold each candidate would serve (set on the same
held-out normals by the line's threshold policy). Every candidate sees the very same validation
images: the held-out split and the synthetic defects depend only on the line's data and seed.

:func:`fit_candidates` and :func:`select_champion` are one stage each (files in, files out);
:func:`train_candidates` runs both, what ``redi train`` does when the line has candidates.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np

from redi.core.config import RediConfig
from redi.core.errors import ConfigError, DatasetError
from redi.core.utils import pick_device
from redi.methods.base import get_method, load_detector, method_names, save_detector
from redi.methods.common import log_stage, open_line, write_json
from redi.workflow.validation import validate_detector, validation_set

STAGE = "champion"
TIE = 0.005  # selection scores this close count as equal (a quarter of one synthetic defect in 50)
RULE = ("mean of validation image AUROC, validation pixel AP and validation recall at the served threshold; "
        f"ties within {TIE} go to the candidate listed first")


def check_candidates(cfg: RediConfig) -> list[str]:
    """The line's candidates (``model.candidates``, else ``[model.method]``), every name registered."""
    names = list(cfg.model.candidates) or [cfg.model.method]
    known = method_names()
    unknown = [n for n in names if n not in known]
    if not unknown:  # a combination's parts must be methods too
        unknown = [part for n in names for part in get_method(n).parts(cfg) if part not in known]
    if unknown:
        raise ConfigError(f"model.candidates names unknown methods {sorted(set(unknown))}; the methods are {known}")
    return names


def _as_method(cfg: RediConfig, name: str) -> RediConfig:
    part = copy.deepcopy(cfg)
    part.model.method = name
    return part


def fit_candidates(data_root: str | Path, out_dir: str | Path, cfg: RediConfig, line: str = "",
                   fitted: dict[str, Path] | None = None) -> dict[str, Path]:
    """Fit every candidate into ``out_dir/<name>/detector.pt``; a combination (``fused``) is built
    from the candidates it combines (fitted first when not candidates themselves). ``fitted`` names
    detectors fitted elsewhere (the pipeline's training steps), which are used as they are.
    Returns ``{name: detector path}`` in candidate order."""
    out_dir = Path(out_dir)
    names = check_candidates(cfg)
    fitted = {name: Path(path) for name, path in (fitted or {}).items()}

    def fit(name: str, where: Path) -> Path:
        method = get_method(name)
        started = time.perf_counter()
        log_stage(STAGE, f"fitting candidate {name} into {where}")
        needs = method.parts(cfg)
        if needs:
            parts = {p: fitted.get(p) or fit(p, where / p) for p in needs}
            path = method.combine(parts, data_root, where, _as_method(cfg, name), line)["detector"]
        else:
            path = method.fit(data_root, where, _as_method(cfg, name), line)["detector"]
        log_stage(STAGE, f"candidate {name} fitted in {time.perf_counter() - started:.0f} s")
        return path

    for name in sorted(names, key=lambda n: bool(get_method(n).parts(cfg))):  # parts before combinations
        if name not in fitted:
            fitted[name] = fit(name, out_dir / name)
    return {name: fitted[name] for name in names}


def selection_score(validation: dict[str, Any]) -> float:
    """The rule's score of one candidate's validation result (see the module docstring)."""
    metrics = validation["metrics"]
    parts = [metrics.get("image_auroc"), metrics.get("pixel_ap"), validation.get("recall_at_threshold")]
    return float(np.mean([0.0 if p is None else float(p) for p in parts]))


def choose(rows: list[dict[str, Any]]) -> int:
    """Index of the champion among rows holding ``selection_score``, in candidate order."""
    best = max(row["selection_score"] for row in rows)
    return next(i for i, row in enumerate(rows) if row["selection_score"] >= best - TIE)


def select_champion(candidates: dict[str, Path], data_root: str | Path, out_dir: str | Path,
                    cfg: RediConfig) -> Path:
    """Measure each candidate on validation, keep the best by the rule; write ``out_dir/detector.pt``
    (the champion, its metadata naming the selection) and ``out_dir/selection.json``. Reads no test image."""
    out_dir = Path(out_dir)
    device = pick_device(cfg.train.device)
    category = open_line(data_root, cfg)
    candidates = {name: _kept(name, Path(path), out_dir) for name, path in candidates.items()}
    rows = []
    for name, path in candidates.items():
        detector = load_detector(path, device)
        try:
            normals, synthetic = validation_set(detector, category, cfg)
        except DatasetError as exc:
            raise DatasetError(f"candidate {name} cannot be validated, so no champion can be chosen: {exc}") from exc
        started = time.perf_counter()
        result = validate_detector(detector, normals, synthetic, cfg, margins=False)
        seconds = (time.perf_counter() - started) / max(normals.shape[0] + len(synthetic), 1)
        rows.append({"name": name, "method": detector.method, "path": str(path.relative_to(out_dir)),
                     "version": detector.metadata.get("version"), "threshold": result["threshold"],
                     "validation": {**result["metrics"], "recall_at_threshold": result["recall_at_threshold"],
                                    "false_alarm_rate_at_threshold": result["false_alarm_rate_at_threshold"],
                                    "n_normal": result["counts"]["normal"], "n_synthetic": result["counts"]["synthetic"]},
                     "selection_score": selection_score(result), "seconds_per_image": seconds,
                     "fit_seconds": detector.metadata.get("fit_seconds")})
        log_stage(STAGE, f"{name}: validation image AUROC {result['metrics']['image_auroc']:.3f}, pixel AP "
                         f"{result['metrics']['pixel_ap']:.3f}, recall at its threshold "
                         f"{result['recall_at_threshold']:.1%} -> score {rows[-1]['selection_score']:.4f}")
    winner = choose(rows)
    for i, row in enumerate(rows):
        row["chosen"] = i == winner
    chosen = rows[winner]
    log_stage(STAGE, f"champion: {chosen['name']} (score {chosen['selection_score']:.4f}; rule: {RULE})")
    selection = {"rule": RULE, "tie": TIE, "champion": chosen["name"], "candidates": rows, "data_root": str(category.root),
                 "seed": cfg.train.seed}
    champion = load_detector(out_dir / chosen["path"])
    save_detector(champion, out_dir / "detector.pt",
                  {"selection": {"champion": chosen["name"], "rule": RULE,
                                 "candidates": {r["name"]: r["selection_score"] for r in rows}}})
    return write_json(out_dir / "selection.json", selection)


def _kept(name: str, path: Path, out_dir: Path) -> Path:
    """The candidate's file inside ``out_dir/candidates/<name>/`` (copied there when it lies elsewhere,
    as a pipeline step's input does), so the selection travels with the champion."""
    import shutil

    target = out_dir / "candidates" / name / "detector.pt"
    if path.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return target


def train_candidates(data_root: str | Path, out_dir: str | Path, cfg: RediConfig, line: str = "") -> dict[str, Path]:
    """Fit the candidates into ``out_dir/candidates/`` and keep the champion as ``out_dir/detector.pt``."""
    out_dir = Path(out_dir)
    candidates = fit_candidates(data_root, out_dir / "candidates", cfg, line)
    selection = select_champion(candidates, data_root, out_dir, cfg)
    return {**{f"candidate_{name}": path for name, path in candidates.items()}, "selection": selection,
            "detector": out_dir / "detector.pt"}


def read_selection(detector_path: str | Path) -> dict[str, Any] | None:
    """The ``selection.json`` beside a champion's detector file (candidate paths made absolute), or
    None (a line with one method)."""
    import json

    path = Path(detector_path).with_name("selection.json")
    if not path.is_file():
        return None
    selection = json.loads(path.read_text())
    for row in selection["candidates"]:
        row["path"] = str(path.parent / row["path"])
    return selection


def champion_stage(data_root: str | Path, out_dir: str | Path, cfg: RediConfig, candidates: dict[str, Path],
                   line: str = "") -> Path:
    """Stage ``select_champion``: the line's candidates fitted by the training steps (``{name: detector}``),
    completed with the combinations ``model.candidates`` lists (``fused``), measured on validation;
    the champion goes to ``out_dir/detector.pt`` beside ``selection.json`` and ``candidates/``."""
    out_dir = Path(out_dir)
    complete = fit_candidates(data_root, out_dir / "candidates", cfg, line, fitted=candidates)
    select_champion(complete, data_root, out_dir, cfg)
    return out_dir / "detector.pt"
