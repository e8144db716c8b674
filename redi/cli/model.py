"""``redi model list|show|history|promote|rollback|shadow|shadow-report``, ``redi bento build``: what lines serve.

The line's production pointer in the object store (``redi.ops.model_registry``) is the one place that decides
what a line serves: the gate moves it, these commands move it by hand, and the service follows it.
Promote and rollback run the same checks as the gate's promotion (complete upload, passed gate,
detector hash) and write an audit record (who, when, why) before the pointer moves.

``redi model shadow`` puts a gate-passed candidate in shadow (the service scores live traffic with it
beside production, answering with production only) or turns it off; ``redi model shadow-report``
compares the two from the shadow log (``redi.ops.shadow``). ``promote`` refuses a version whose gate
required a shadow period (``gate.shadow_min_requests`` / ``shadow_min_hours``) until the log holds it.

Self-contained: ``redi/cli/main.py`` registers it with ``COMMANDS.update(add_model_commands(sub))``.
The store comes from the environment (``REDI_S3_*``) or ``--store-dir`` (see ``redi.ops.model_registry``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from redi.ops.object_store import DEFAULT_LOCAL_DIR, ObjectStore, StorageError, store_for_command
from redi.ops.model_registry import (list_versions, move_shadow, production_lines, production_record, promotion_history,
    rollback, shadow_history, version_index, version_summary)
from redi.ops.shadow import DEFAULT_LOG_DIR, fmt_rate, shadow_report, shadow_rows, shadow_rows_from_store

Handler = Callable[[argparse.Namespace], int]
_METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def _store(args: argparse.Namespace) -> ObjectStore:
    """The command's store (S3 from ``REDI_S3_*``, else the local folder; S3 required in a cluster),
    opened once per command and named on stderr, so the operator always knows which production
    the command read or moved (stdout stays the command's answer, e.g. its JSON)."""
    store = getattr(args, "_opened_store", None)
    if store is None:
        store = store_for_command(local_root=args.store_dir)
        args._opened_store = store
        print(f"[redi] model store: {store.describe()}", file=sys.stderr, flush=True)
    return store


def _fmt(value: Any) -> str:
    return f"{float(value):.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    lines = [args.line] if args.line else production_lines(store)
    rows = []
    for line in lines:
        production = production_record(store, line)
        rows += [{"line": line, **version_summary(store, line, v, production)} for v in list_versions(store, line)]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no model versions in {store.describe()}" + (f" for line {args.line!r}" if args.line else ""))
        return 0
    header = f"{'line':16s} {'version':34s} {'gate':8s} " + " ".join(f"{m:>11s}" for m in _METRICS) + \
        "  sha256        uploaded"
    print(header)
    for row in rows:
        mark = " *production" if row["production"] else ""
        print(f"{row['line']:16s} {row['version']:34s} {row['gate']:8s} "
              + " ".join(f"{_fmt(row['metrics'].get(m)):>11s}" for m in _METRICS)
              + f"  {(row['detector_sha256'] or '')[:12]:12s}  {row['uploaded']}{mark}")
    return 0


def _show(args: argparse.Namespace) -> int:
    store = _store(args)
    version = args.version
    if version is None:
        pointer = production_record(store, args.line)
        if pointer is None:
            raise StorageError(f"line {args.line!r} has no production model in {store.describe()}; name a --version")
        version = pointer["version"]
    summary = version_summary(store, args.line, version)
    index = version_index(store, args.line, version) or {}
    summary["files"] = [{k: e[k] for k in ("name", "size", "sha256")} for e in index.get("files", [])]
    summary["promotions"] = [r for r in promotion_history(store, args.line) if r.get("version") == version]
    print(json.dumps({"line": args.line, **summary}, indent=2, default=str))
    return 0


def _history(args: argparse.Namespace) -> int:
    records = promotion_history(_store(args), args.line)
    shadow_moves = shadow_history(_store(args), args.line)
    if args.json:
        print(json.dumps(records + shadow_moves, indent=2, default=str))
        return 0
    for r in shadow_moves:  # the shadow pointer's own audit trail (redi model shadow, the gate)
        print(f"{r.get('since')}  {r.get('action', 'shadow'):10s} {r.get('version') or '-':34s} by {r.get('by', '?')}: "
              f"{r.get('reason', '')} [{r.get('outcome')}]")
    for r in records:
        if r.get("outcome") == "conflict":  # a move that lost a race or was decided again
            c = r.get("conflict") or {}
            print(f"{r.get('promoted')}  CONFLICT {r.get('action', '?')} of {r.get('version')} by {r.get('by', '?')}: "
                  f"expected {(c.get('expected') or {}).get('version')}, found {(c.get('found') or {}).get('version')} "
                  f"(by {(c.get('found') or {}).get('by')}); {c.get('then', '')}")
            continue
        print(f"{r.get('promoted')}  {r.get('action', 'promote'):8s} {r['version']:34s} by {r.get('by', '?')}: "
              f"{r.get('reason', '')}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from redi.ops.gate import promote_after_shadow

    store = _store(args)
    pointer, report = promote_after_shadow(store, args.line, args.version, None if args.from_store else args.log_dir,
                                           _recorded_metrics(args),
                                           by=args.by or "", reason=args.reason)
    shadow = "" if report is None else (f"; shadow period: {report['n']} requests over {report['hours']:.2f} h, "
                                        f"agreement {fmt_rate(report['agreement'])}")
    print(f"line {args.line}: production is now {pointer['version']} (was {pointer['previous_version']}); "
          f"recorded by {pointer['by']}: {pointer['reason']}{shadow} [store: {store.describe()}]")
    return 0


def _shadow(args: argparse.Namespace) -> int:
    if bool(args.version) == bool(args.off):
        raise StorageError("name the candidate with --version V, or turn the line's shadow off with --off")
    store = _store(args)
    pointer = move_shadow(store, args.line, None if args.off else args.version, by=args.by or "",
                          reason=args.reason or ("shadow turned off" if args.off else "shadow period"))
    if pointer.get("version") is None:
        print(f"line {args.line}: no shadow candidate (was {pointer.get('previous_version')}); the service stops "
              f"scoring it at its next pointer check [store: {store.describe()}]")
    else:
        production = (production_record(store, args.line) or {}).get("version")
        print(f"line {args.line}: {pointer['version']} is in shadow since {pointer.get('since')} (was "
              f"{pointer.get('previous_version')}); production {production} still answers. The service scores it "
              f"from its next pointer check [store: {store.describe()}]")
    return 0


def _shadow_report(args: argparse.Namespace) -> int:
    version = args.version  # default: the newest candidate in the log (the report never mixes two)
    rows = (shadow_rows_from_store(_store(args), args.line) if args.from_store
            else shadow_rows(args.log_dir, args.line))
    report = shadow_report(rows, args.line, version)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    if not report["n"]:
        where = "the store's shipped shadow logs" if args.from_store else Path(args.log_dir) / "shadow"
        print(f"line {args.line}: no shadow decisions logged in {where}"
              + (f" for version {version}" if version else ""))
        return 0
    print(f"line {args.line}: candidate {report['shadow_version']} beside production "
          f"{', '.join(report['production_versions'])}: {report['n']} requests, {report['first']} .. {report['last']}")
    print(f"  agreement {fmt_rate(report['agreement'])}; flag rate production "
          f"{fmt_rate(report['production_flag_rate'])}, candidate {fmt_rate(report['shadow_flag_rate'])}; "
          f"{len(report['disagreements'])} disagreements")
    for d in report["disagreements"]:
        print(f"  {d['request_id']}  {d['time']}  production {d['score']:.4f} "
              f"{'anomalous' if d['anomalous'] else 'normal'}  candidate {d['shadow_score']:.4f} "
              f"{'anomalous' if d['shadow_anomalous'] else 'normal'}")
    return 0


def _recorded_metrics(args: argparse.Namespace) -> dict[str, Any]:
    index = version_index(_store(args), args.line, args.version) or {}
    return {"metrics": (index.get("info") or {}).get("metrics", {})}


def _rollback(args: argparse.Namespace) -> int:
    store = _store(args)
    pointer = rollback(store, args.line, args.version, by=args.by or "", reason=args.reason)
    print(f"line {args.line}: rolled back to {pointer['version']} (was {pointer['previous_version']}); "
          f"recorded by {pointer['by']}: {pointer['reason']} [store: {store.describe()}]")
    return 0


def _convert_artifact(args: argparse.Namespace) -> int:
    from redi.methods.base import convert_artifact, read_artifact

    if not args.trust:
        raise StorageError(f"converting {args.path} loads it the old way, which runs any code the file holds: "
                           f"add --trust only if you know where the file comes from (e.g. you trained it)")
    out = convert_artifact(args.path, args.out)
    read_artifact(out)  # the result loads weights-only
    print(f"converted {args.path} -> {out}: tensors and plain data only (loads weights-only). Its sha256 changed: "
          f"gate it again (a new version) rather than replacing a file in the store")
    return 0


def _bento_build(args: argparse.Namespace) -> int:
    if args.bentoml_home:  # BentoML reads it once, when first imported
        os.environ["BENTOML_HOME"] = str(Path(args.bentoml_home).resolve())
    from redi.ops.packaging import build_production_bento

    result = build_production_bento(_store(args), args.line or None, args.bentoml_home)
    print(json.dumps(result, indent=2))
    return 0


_HANDLERS: dict[str, Handler] = {"list": _list, "show": _show, "history": _history, "promote": _promote,
                                 "rollback": _rollback, "convert-artifact": _convert_artifact, "shadow": _shadow,
                                 "shadow-report": _shadow_report}


def add_model_commands(subparsers: Any) -> dict[str, Handler]:
    """Register ``redi model ...`` on the CLI's sub-parsers; return ``{"model": handler}``."""
    model = subparsers.add_parser("model", help="model versions per line: list, show, promote, roll back",
                                  description="What each line serves (its production pointer) and its history.")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    store_help = (f"local store folder when REDI_S3_ENDPOINT is unset (default REDI_STORE_DIR or "
                  f"{DEFAULT_LOCAL_DIR})")

    def add(name: str, help_text: str, line_required: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--line", required=line_required, help="product line")
        p.add_argument("--store-dir", default=os.environ.get("REDI_STORE_DIR"), help=store_help)
        return p

    p = add("list", "every version of a line (or of every line) with gate decision, metrics, hash", False)
    p.add_argument("--json", action="store_true")
    p = add("show", "one version (default: production) with its files, hashes and promotions")
    p.add_argument("--version")
    p = add("history", "every promotion, rollback and shadow move of a line: who, when, why")
    p.add_argument("--json", action="store_true")
    for name, text in (("promote", "make a gate-passed version the line's production model"),
                       ("rollback", "put back an earlier production model (default: the one before)")):
        p = add(name, text)
        p.add_argument("--version", required=name == "promote")
        p.add_argument("--reason", required=True, help="why (kept in the audit record)")
        p.add_argument("--by", help="who (default: user@host of this shell)")
        if name == "promote":
            p.add_argument("--log-dir", default=os.environ.get("REDI_LOG_DIR", DEFAULT_LOG_DIR),
                           help="the service's production log folder (REDI_LOG_DIR): its shadow log shows whether "
                                "a shadow period the gate required is done")
            p.add_argument("--from-store", action="store_true",
                           help="count every serving host's shadow decisions shipped to the object store instead "
                                "of one host's --log-dir")
    p = add("shadow", "score a gate-passed candidate beside production on live traffic (answers stay production's)")
    p.add_argument("--version", help="the candidate to put in shadow")
    p.add_argument("--off", action="store_true", help="stop shadowing on this line")
    p.add_argument("--reason", help="why (kept in the audit record)")
    p.add_argument("--by", help="who (default: user@host of this shell)")
    p = add("shadow-report", "agreement, flag rates and disagreeing requests of the line's shadow candidate")
    p.add_argument("--version", help="the candidate (default: the newest one in the shadow log)")
    p.add_argument("--log-dir", default=os.environ.get("REDI_LOG_DIR", DEFAULT_LOG_DIR),
                   help="the service's production log folder (REDI_LOG_DIR); the shadow log is its shadow/ folder")
    p.add_argument("--from-store", action="store_true",
                   help="every serving host's shadow decisions shipped to the object store instead of --log-dir")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("convert-artifact", help="rewrite a trusted detector file from an older redi so that it "
                                                "loads weights-only (no pickled code)")
    p.add_argument("path", help="the detector.pt to convert")
    p.add_argument("--out", help="where to write the converted file (default: in place)")
    p.add_argument("--trust", action="store_true",
                   help="confirm you trust the file: converting loads it the old way, which runs code it holds")

    p = subparsers.add_parser("bento", help="build a Bento that pins every line's production model",
                              description="`redi bento build`: a self-contained Bento (for `bentoml containerize` "
                                          "and BentoML's deployment targets) with each line's production model.")
    bento_sub = p.add_subparsers(dest="bento_command", required=True, metavar="ACTION")
    p = bento_sub.add_parser("build", help="bentoml build with the production models pinned")
    p.add_argument("--line", action="append", help="only these lines (repeatable; default: every line)")
    p.add_argument("--store-dir", default=os.environ.get("REDI_STORE_DIR"), help=store_help)
    p.add_argument("--bentoml-home", help="BentoML's store (default BENTOML_HOME or ~/bentoml)")
    return {"model": lambda args: _HANDLERS[args.model_command](args), "bento": _bento_build}
