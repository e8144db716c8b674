"""``redi review export|threshold|summary|sync``: operators' verdicts into data, thresholds without retrain.

Self-contained: ``redi/cli.py`` registers it with ``COMMANDS.update(add_review_commands(sub))``.
The store comes from ``REDI_S3_*`` or ``--store-dir`` (``redi.storage``), the review database from
``--db`` / ``REDI_REVIEW_DB`` (default: SQLite in ``REDI_LOG_DIR``, where the service keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

from redi.errors import InputError
from redi.storage import DEFAULT_LOCAL_DIR, ObjectStore, store_from_env

Handler = Callable[[argparse.Namespace], int]


def _store(args: argparse.Namespace) -> ObjectStore:
    return store_from_env(local_root=args.store_dir)


def _db(args: argparse.Namespace) -> Any:
    from redi.review import ReviewDB, default_db_url

    return ReviewDB(args.db or default_db_url())


def _export(args: argparse.Namespace) -> int:
    from redi.review_export import export_reviews

    result = export_reviews(_db(args), _store(args), args.line, args.data_repo, args.data_path or "", by=args.by or "",
                            push=args.push)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    for entry in result.written:
        print(f"wrote {entry['target']}" + (f" and {entry['mask']}" if entry["mask"] else "") + f" ({entry['verdict']})")
    for entry in result.needs_mask:
        print(f"NEEDS A MASK: {entry['target']}: draw ground_truth/<type>/<stem>_mask.png, then move both into "
              f"test/<type>/ and ground_truth/<type>/")
    for request_id in result.expired:
        print(f"skipped {request_id}: its image was deleted by the retention limits before the export")
    for entry in result.changed_after_export:
        print(f"verdict changed after export: {entry['request_id']} stays at {entry['target']}; move it by hand")
    if not result.committed:
        print(f"nothing new to export for line {args.line}; data revision stays {result.revision}")
        return 0
    print(f"revision {result.revision}")
    print(f"train on it: redi pipeline run --line {args.line} --data-repo {result.data_repo} "
          f"--data-path {result.data_path} --revision {result.revision}")
    return 0


def _threshold(args: argparse.Namespace) -> int:
    from redi.thresholds import override_history, set_threshold_override, threshold_override

    store = _store(args)
    if args.show:
        print(json.dumps({"override": threshold_override(store, args.line),
                          "history": override_history(store, args.line)}, indent=2, default=str))
        return 0
    if args.value is None and not args.clear:
        raise InputError("give --value X (a new threshold), --clear or --show")
    if not args.reason:
        raise InputError("--reason is required: it is recorded for the audit")
    record = set_threshold_override(store, args.line, None if args.clear else args.value, args.reason,
                                    by=args.by or "", model_version=args.version or "")
    what = "cleared" if args.clear else f"set to {record['value']}"
    print(f"line {args.line}: threshold override {what} for model {record['model_version']} by {record['by']} "
          f"({record['reason']}); the service applies it at its next reload (REDI_RELOAD_INTERVAL_S, or "
          f"POST /admin/reload)")
    return 0


def _summary(args: argparse.Namespace) -> int:
    summary = _db(args).summary(args.line, args.day)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"line {args.line}, UTC day {summary['day']}")
    print(f"{'model version':34s} {'today':>6s} {'flagged':>8s} {'judged':>7s} {'defects':>8s} {'false':>6s} {'FA rate':>8s}")
    for row in summary["by_model_version"] + [{"model_version": "all", **summary["totals"]}]:
        rate = "-" if row["false_alarm_rate"] is None else f"{100 * row['false_alarm_rate']:.0f} %"
        print(f"{row['model_version']:34s} {row['flagged_today']:6d} {row['flagged']:8d} {row['judged']:7d} "
              f"{row['confirmed']:8d} {row['false_alarms']:6d} {rate:>8s}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    print(json.dumps(_db(args).sync_from_store(_store(args), args.line)))
    return 0


def _handle(args: argparse.Namespace) -> int:
    return {"export": _export, "threshold": _threshold, "summary": _summary, "sync": _sync}[args.review_command](args)


def add_review_commands(subparsers: Any) -> dict[str, Handler]:
    """Register ``redi review ...`` on the CLI's sub-parsers; return ``{"review": handler}``."""
    review = subparsers.add_parser("review", help="verdicts on flagged parts into the line's data; thresholds",
                                   description="The review station's commands (docs/review.md).")
    sub = review.add_subparsers(dest="review_command", required=True, metavar="ACTION")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--line", required=True, help="product line")
        p.add_argument("--store-dir", default=os.environ.get("REDI_STORE_DIR"),
                       help=f"local store folder when REDI_S3_ENDPOINT is unset (default {DEFAULT_LOCAL_DIR})")
        p.add_argument("--db", help="review database URL (default REDI_REVIEW_DB, else SQLite in REDI_LOG_DIR)")
        return p

    p = add("export", "write judged images into the line's DVC dataset and commit a new data revision")
    p.add_argument("--data-repo", required=True, help="the git + DVC repository holding the line's data")
    p.add_argument("--data-path", help="the line's folder in it (default data/lines/<line>)")
    p.add_argument("--by", help="who exports (commit author when git has none)")
    p.add_argument("--push", action="store_true", help="dvc push the new data to the default remote")
    p.add_argument("--json", action="store_true")
    p = add("threshold", "set, clear or show the line's threshold override (no retrain; audited)")
    p.add_argument("--value", type=float, help="the new decision threshold")
    p.add_argument("--clear", action="store_true", help="decide with the model's own threshold again")
    p.add_argument("--show", action="store_true", help="print the override in force and its history")
    p.add_argument("--reason", help="why (recorded)")
    p.add_argument("--by", help="who (default: user@host)")
    p.add_argument("--version", help="the model version it is for (default: the production version)")
    p = add("summary", "flagged, confirmed and false alarms per model version")
    p.add_argument("--day", help="UTC day YYYY-MM-DD for 'today' (default: today)")
    p.add_argument("--json", action="store_true")
    add("sync", "index kept images the database lacks (after it was unreachable or replaced)")
    return {"review": _handle}
