"""``redi review export|threshold|summary|sync|user``: operators' verdicts into data, thresholds without
retrain, and the review page's operator accounts.

Self-contained: ``redi/cli/main.py`` registers it with ``COMMANDS.update(add_review_commands(sub))``.
The store comes from ``REDI_S3_*`` or ``--store-dir`` (``redi.ops.model_registry``), the review database from
``--db`` / ``REDI_REVIEW_DB`` (default: SQLite in ``REDI_LOG_DIR``, where the service keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

from redi.core.errors import InputError
from redi.ops.object_store import DEFAULT_LOCAL_DIR, ObjectStore, store_from_env

Handler = Callable[[argparse.Namespace], int]


def _store(args: argparse.Namespace) -> ObjectStore:
    return store_from_env(local_root=args.store_dir)


def _db(args: argparse.Namespace) -> Any:
    from redi.ops.review import ReviewDB, default_db_url

    return ReviewDB(args.db or default_db_url())


def _export(args: argparse.Namespace) -> int:
    from redi.ops.review_export import export_reviews

    result = export_reviews(_db(args), _store(args), args.line, args.data_repo, args.data_path or "", by=args.by or "",
                            push=args.push)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    for entry in result.recovered:  # what an earlier, interrupted export left and this one settled
        print(_recovered_line(entry))
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


def _recovered_line(entry: dict) -> str:
    """One line saying how an interrupted export was settled."""
    if entry["action"] == "recorded":
        return (f"an interrupted export ({entry['export_id']}) had committed revision {entry['revision']}: "
                f"recorded its {entry['recorded']} image(s) now, no second commit")
    if entry["action"] == "rolled_back":
        return (f"an interrupted export ({entry['export_id']}) stopped before its commit: removed the "
                f"{entry['removed']} file(s) it had written; they are exported again below")
    return (f"the judged images were already in the data repository: recorded {entry['recorded']} of them "
            f"at revision {entry['revision']}")


def _threshold(args: argparse.Namespace) -> int:
    from redi.ops.thresholds import override_history, set_threshold_override, threshold_override

    if args.suggest:
        if args.value is not None or args.clear or args.show:
            raise InputError("--suggest only proposes a threshold: give it without --value, --clear or --show")
        return _suggest(args)
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


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f} %"


def _suggest(args: argparse.Namespace) -> int:
    """Print a threshold proposed from the verdicts (``redi.ops.review_threshold``); apply nothing."""
    from redi.ops.review_threshold import apply_command, suggest_threshold

    result = suggest_threshold(_db(args), args.line, args.false_call_target, args.version or "", args.normal_rate)
    result["apply_command"] = apply_command(result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    c, seen = result["counts"], result["served_thresholds"]
    print(f"line {args.line}, model {result['model_version']}: threshold proposed from the operators' verdicts "
          f"(nothing is applied)")
    print(f"rests on {c['judged_defects']} judged defects and {c['judged_good']} judged good parts: "
          f"{c['judged_flagged']} flagged (of {c['kept_flagged']} kept) and {c['judged_sampled']} sampled passed parts "
          f"(of {c['kept_sampled']} kept, {c['judged_sampled_defects']} of them defects); weights per part: "
          f"{', '.join(f'{w:g}' for w in result['sample_weights'])}")
    print(f"judged parts were decided at threshold {seen['min']:g}" +
          (f" .. {seen['max']:g} (overrides)" if seen["max"] != seen["min"] else ""))
    print(f"{'estimated over all parts':28s} {'threshold':>10s} {'recall':>8s} {'escapes':>8s} {'false calls':>12s} "
          f"{'flag rate':>10s}   judged tp/fn/fp/tn")
    target = f"suggested (false calls <= {_pct(args.false_call_target)})"
    for name, row in (("served now", result["served"]), (target, result["suggested"])):
        n = row["counts"]
        print(f"{name:28s} {row['threshold']:10.5g} {_pct(row['recall']):>8s} {_pct(row['escape_rate']):>8s} "
              f"{_pct(row['false_call_rate']):>12s} {_pct(row['flag_rate']):>10s}   "
              f"{n['tp']}/{n['fn']}/{n['fp']}/{n['tn']}")
    for warning in result["warnings"]:
        print(f"WARNING: {warning}")
    print("to apply it (audited, the service picks it up at its next reload):")
    print(f"  {result['apply_command']}")
    return 0


def _threshold_range(row: dict[str, Any]) -> str:
    """The thresholds a summary row's judged parts were decided with (its flagged ones if none is judged)."""
    low, high = row.get("threshold_min"), row.get("threshold_max")
    if low is None:
        low, high = row.get("flagged_threshold_min"), row.get("flagged_threshold_max")
        if low is None:
            return "-"
    return f"{low:.4g}" if low == high else f"{low:.4g}..{high:.4g}"


def _summary(args: argparse.Namespace) -> int:
    summary = _db(args).summary(args.line, args.day)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"line {args.line}, UTC day {summary['day']}; threshold: the one the judged parts were decided with "
          f"(scores and thresholds of different model versions are not comparable)")
    print(f"{'model version':34s} {'threshold':>15s} {'today':>6s} {'flagged':>8s} {'judged':>7s} {'defects':>8s} "
          f"{'false':>6s} {'FA rate':>8s}")
    for row in summary["by_model_version"] + [{"model_version": "all", **summary["totals"]}]:
        rate = "-" if row["false_alarm_rate"] is None else f"{100 * row['false_alarm_rate']:.0f} %"
        print(f"{row['model_version']:34s} {_threshold_range(row):>15s} {row['flagged_today']:6d} {row['flagged']:8d} "
              f"{row['judged']:7d} {row['confirmed']:8d} {row['false_alarms']:6d} {rate:>8s}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    print(json.dumps(_db(args).sync_from_store(_store(args), args.line)))
    return 0


def _read_password(args: argparse.Namespace) -> str:
    """The new password: one line of stdin (``--password-stdin``, for scripts) or typed twice at a prompt.

    Never an argument: the command line shows in ``ps`` and the shell history."""
    import getpass
    import sys

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise InputError("--password-stdin: stdin gave no password (one line expected)")
        return password
    if not sys.stdin.isatty():
        raise InputError("no terminal to type the password at: pipe it in with --password-stdin")
    password = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("the same password again: ") != password:
        raise InputError("the two passwords differ; nothing was changed")
    return password


def _user(args: argparse.Namespace) -> int:
    """``redi review user add|list|disable|enable|passwd``: the review page's operator accounts."""
    from redi.ops.review_accounts import AccountError, OperatorAccounts

    accounts = OperatorAccounts(_db(args))
    try:
        if args.user_command == "list":
            rows = accounts.list()
            if args.json:
                print(json.dumps(rows, indent=2))
            for row in [] if args.json else rows:
                state = "active" if row["active"] else f"disabled {row['disabled_at'][:19]}"
                print(f"{row['username']:24s} {state:28s} sessions {row['live_sessions']:3d}  "
                      f"created {row['created_at'][:19]} by {row['created_by'] or '-'}")
            if not rows and not args.json:
                print("no operator accounts; add one with `redi review user add --name NAME`")
        elif args.user_command == "add":
            created = accounts.add(args.name, _read_password(args), by=args.by or _whoami())
            print(f"operator {created['username']} added; they log in at /review/login")
        elif args.user_command == "passwd":
            revoked = accounts.set_password(args.name, _read_password(args))
            print(f"new password set for {args.name.strip().lower()}; {revoked} session(s) logged out")
        elif args.user_command == "disable":
            revoked = accounts.disable(args.name)
            print(f"operator {args.name.strip().lower()} disabled; {revoked} session(s) logged out at once")
        else:
            accounts.enable(args.name)
            print(f"operator {args.name.strip().lower()} may log in again")
    except AccountError as exc:
        raise InputError(str(exc)) from exc
    return 0


def _whoami() -> str:
    import getpass
    import socket

    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # no user name in a bare container: the record just says nobody
        return ""


def _handle(args: argparse.Namespace) -> int:
    return {"export": _export, "threshold": _threshold, "summary": _summary, "sync": _sync,
            "user": _user}[args.review_command](args)


def _add_user_commands(sub: Any) -> None:
    """``redi review user ACTION``: operator accounts of the review page, in the review database."""
    user = sub.add_parser("user", help="the review page's operator accounts: add, list, disable, enable, passwd",
                          description="Operator accounts of the review page (/review/login), stored in the review "
                                      "database with scrypt password hashes. Passwords are read from a prompt or "
                                      "--password-stdin, never from the command line.")
    actions = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    for name, help_text in (("add", "create an account (asks for its password)"),
                            ("list", "every account, its state and live sessions"),
                            ("disable", "refuse the account's logins and end its sessions now"),
                            ("enable", "let a disabled account log in again"),
                            ("passwd", "set a new password (ends the account's sessions)")):
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--db", help="review database URL (default REDI_REVIEW_DB, else SQLite in REDI_LOG_DIR, "
                                    "where the service keeps it)")
        if name == "list":
            p.add_argument("--json", action="store_true")
            continue
        p.add_argument("--name", required=True, help="the operator's username (recorded with their verdicts)")
        if name in ("add", "passwd"):
            p.add_argument("--password-stdin", action="store_true",
                           help="read the password from the first line of stdin (scripts) instead of a prompt")
        if name == "add":
            p.add_argument("--by", help="who creates it (default: user@host)")


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
    p = add("threshold", "set, clear or show the line's threshold override (no retrain; audited), or propose one "
                         "from the verdicts (--suggest)")
    p.add_argument("--value", type=float, help="the new decision threshold")
    p.add_argument("--clear", action="store_true", help="decide with the model's own threshold again")
    p.add_argument("--show", action="store_true", help="print the override in force and its history")
    p.add_argument("--suggest", action="store_true",
                   help="propose a threshold from the operators' verdicts and print the command that applies it "
                        "(applies nothing)")
    p.add_argument("--false-call-target", type=float, default=0.01,
                   help="--suggest: highest share of good parts flagged (default 0.01)")
    p.add_argument("--normal-rate", type=float,
                   help="--suggest: the share of passed parts the service kept (REDI_RETAIN_NORMAL_RATE), for parts "
                        "kept before the rate was recorded")
    p.add_argument("--json", action="store_true", help="--suggest: print the proposal as JSON")
    p.add_argument("--reason", help="why (recorded)")
    p.add_argument("--by", help="who (default: user@host)")
    p.add_argument("--version", help="the model version it is for (default: the production version; with "
                                     "--suggest the latest version with verdicts)")
    p = add("summary", "flagged, confirmed and false alarms per model version")
    p.add_argument("--day", help="UTC day YYYY-MM-DD for 'today' (default: today)")
    p.add_argument("--json", action="store_true")
    add("sync", "index kept images the database lacks (after it was unreachable or replaced)")
    _add_user_commands(sub)
    return {"review": _handle}
