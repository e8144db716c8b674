"""Shadow mode's log and its comparison: a candidate's decisions on live traffic beside production's.

The service scores each request with the line's shadow candidate (the shadow pointer,
:func:`redi.ops.model_registry.move_shadow`) after it has answered with production, and writes
one row per scored request to the *shadow log*, a sibling of the production log::

    <REDI_LOG_DIR>/shadow/<line>/<YYYY-MM-DD>.jsonl

(the same durable :class:`~redi.ops.monitoring.ProductionLog` format). A row carries the request
id of its production row and both models' decisions: ``model_version``, ``score``, ``threshold``,
``anomalous`` (production, as answered) and ``shadow_version``, ``shadow_score``,
``shadow_threshold``, ``shadow_anomalous`` (the candidate at its own served threshold), ``agree``.

These rows are the one source of shadow statistics: ``redi model shadow-report``, the review
page's shadow section and the gate's shadow-period check (:func:`shadow_period_problems`) all
read them through :func:`shadow_report`.

A service with an object store ships its shadow log like its production log
(:mod:`redi.ops.log_shipping`), under its own prefix::

    shadow-log/<line>/<host id>/<YYYY-MM-DD>/<start>-<end>.jsonl

so a promotion that runs anywhere (``redi model promote --from-store``, a pipeline step) counts
every serving host's shadow decisions (:func:`shadow_rows_from_store`), each request once.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from redi.ops.monitoring import ProductionLog, _read_jsonl, check_line_name, read_store_rows

SHADOW_FOLDER = "shadow"
SHADOW_SEGMENTS = "shadow-log"  # the shipped shadow log's key prefix in the object store
DEFAULT_LOG_DIR = "production_logs"  # the service's REDI_LOG_DIR default (serving/settings.py)


def shadow_log(log_dir: str | Path, fsync: bool = True, ship_to: Any = None) -> ProductionLog:
    """The shadow log beside the production log folder ``log_dir``; with ``ship_to`` (an object store)
    its rows are shipped there as this host's segments under ``shadow-log/``."""
    return ProductionLog(Path(log_dir) / SHADOW_FOLDER, fsync=fsync, ship_to=ship_to, ship_prefix=SHADOW_SEGMENTS)


def shadow_rows_from_store(store: Any, line: str, version: str | None = None) -> list[dict[str, Any]]:
    """Every serving host's shipped shadow rows of ``line`` (of candidate ``version`` when given), each
    request once, oldest first."""
    frame = read_store_rows(store, check_line_name(line), prefix=SHADOW_SEGMENTS)
    rows = frame.to_dict("records") if not frame.empty else []
    for row in rows:  # back to the log's own form (the table parsed the times)
        row["time"] = row["time"].isoformat()
    if version is not None:
        rows = [r for r in rows if str(r.get("shadow_version")) == version]
    return rows


def shadow_rows(log_dir: str | Path, line: str, version: str | None = None) -> list[dict[str, Any]]:
    """Every shadow row of ``line`` (only those of candidate ``version`` when given), oldest first."""
    folder = Path(log_dir) / SHADOW_FOLDER / check_line_name(line)
    rows = [row for path in sorted(folder.glob("*.jsonl")) for row in _read_jsonl(path)]
    if version is not None:
        rows = [r for r in rows if str(r.get("shadow_version")) == version]
    return sorted(rows, key=lambda r: str(r.get("time", "")))


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def shadow_report(rows: Iterable[Mapping[str, Any]], line: str, version: str | None = None) -> dict[str, Any]:
    """Agreement, each model's flag rate and the disagreeing requests of the shadow ``rows``.

    ``version``: the candidate to report on; default the newest candidate in the rows (the rows
    of other candidates are left out, so a report never mixes two candidates).
    """
    rows = list(rows)
    if version is None and rows:
        version = str(rows[-1].get("shadow_version"))
    rows = [r for r in rows if str(r.get("shadow_version")) == version]
    production = [bool(r.get("anomalous")) for r in rows]
    candidate = [bool(r.get("shadow_anomalous")) for r in rows]
    disagree = [r for r, p, c in zip(rows, production, candidate) if p != c]
    first, last = (str(rows[0]["time"]), str(rows[-1]["time"])) if rows else (None, None)
    hours = ((_dt.datetime.fromisoformat(last) - _dt.datetime.fromisoformat(first)).total_seconds() / 3600.0
             if rows else 0.0)
    return {"line": line, "shadow_version": version, "n": len(rows),
            "production_versions": sorted({str(r.get("model_version")) for r in rows}),
            "agreement": None if not rows else 1.0 - len(disagree) / len(rows),
            "production_flag_rate": _rate(production), "shadow_flag_rate": _rate(candidate),
            "first": first, "last": last, "hours": hours,
            "disagreements": [{k: r.get(k) for k in ("request_id", "time", "camera", "model_version", "score",
                                                      "threshold", "anomalous", "shadow_score", "shadow_threshold",
                                                      "shadow_anomalous")} for r in disagree]}


def shadow_period_problems(report: Mapping[str, Any], min_requests: int, min_hours: float) -> list[str]:
    """Why the shadow period in ``report`` is not long enough yet (empty: it is, or none is required)."""
    problems = []
    version, line = report.get("shadow_version"), report.get("line")
    if min_requests > 0 and report["n"] < min_requests:
        problems.append(f"version {version} was scored in shadow on {report['n']} live requests of line {line}; "
                        f"the gate requires {min_requests} (gate.shadow_min_requests)")
    if min_hours > 0 and report["hours"] < min_hours:
        problems.append(f"version {version} has run in shadow for {report['hours']:.2f} h of logged traffic; the gate "
                        f"requires {min_hours:g} h (gate.shadow_min_hours)")
    if problems:
        problems.append(f"put it in shadow (`redi model shadow --line {line} --version {version}`) and let the "
                        f"service score live traffic; `redi model shadow-report --line {line}` shows the progress")
    return problems


def fmt_rate(value: float | None) -> str:
    """A rate as a percentage, ``-`` when nothing was measured."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100.0 * value:.1f}%"


__all__ = ["DEFAULT_LOG_DIR", "SHADOW_FOLDER", "fmt_rate", "shadow_log", "shadow_period_problems", "shadow_report",
           "shadow_rows"]
