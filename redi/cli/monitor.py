"""The monitoring and serving sub-commands of ``redi``: ``monitor``, ``drift-reference``, ``serve-check``.

``redi monitor`` reads the production rows from the local log folder (``--log-dir``, one host), or from
the object store with ``--from-store`` (every serving host's shipped segments, ``redi.ops.log_shipping``).
In cluster mode (``REDI_CLUSTER_MODE``, or a Kubernetes pod) it always reads the store, and a missing
store is an error: a log folder inside a pod holds no host's rows. ``redi monitor schedule`` and
``redi monitor cronjob`` run it per line on a schedule (``pipelines/drift_pipeline.py``).

Self-contained: ``redi/cli/main.py`` only calls :func:`add_monitor_commands` with its sub-parsers and
merges the returned handlers into its command table::

    COMMANDS.update(add_monitor_commands(sub))

Every handler takes the parsed ``argparse.Namespace`` and returns the exit status. ``redi
monitor`` exits 1 when drift is found (0 when not), so a scheduler or CI job can act on it;
user errors raise :class:`redi.core.errors.RediError`, which the CLI turns into exit status 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

from redi.core.config import MonitorConfig
from redi.core.errors import InputError, RediError

Handler = Callable[[argparse.Namespace], int]
DRIFT_EXIT = 1


def _since(text: str | None) -> _dt.datetime | None:
    """Parse ``--since`` (ISO date or time; a naive value is taken as UTC)."""
    if not text:
        return None
    try:
        value = _dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise InputError(f"--since {text!r} is not an ISO date/time; use e.g. 2025-06-01 or 2025-06-01T08:00") from exc
    return value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)


def _monitor(args: argparse.Namespace) -> int:
    """``redi monitor``: Evidently drift report of one line; exit 1 on drift."""
    if args.monitor_command == "schedule":
        return _schedule(args)
    if args.monitor_command == "cronjob":
        return _cronjob(args)
    return _check(args)


def _rows_source(args: argparse.Namespace):
    """The store to read every host's rows from, or None for the local log folder (module docstring)."""
    from redi.ops.object_store import cluster_mode, store_for_command

    reason = cluster_mode()
    if not (args.from_store or reason):
        return None
    if reason and not args.from_store:
        print(f"[redi] monitor: {reason}, so the rows come from the object store (every host's segments), "
              f"not from --log-dir", file=sys.stderr, flush=True)
    store = store_for_command()  # cluster mode without REDI_S3_ENDPOINT: a loud error naming the settings
    print(f"[redi] monitor: reading every host's production rows from {store.describe()}", file=sys.stderr, flush=True)
    return store


def _check(args: argparse.Namespace) -> int:
    """The drift check itself (``redi monitor --line L ...``)."""
    import tempfile

    from redi.ops.monitoring import MonitorSettings, fetch_production_reference, run_monitor

    if not args.line:
        raise InputError("redi monitor needs --line L (the product line to check)")
    store = _rows_source(args)
    reference = args.reference
    if not reference:
        if store is None:
            raise InputError("redi monitor needs --reference (the line's drift reference table) when it reads a "
                             "local log folder; with --from-store it takes the production version's reference")
        reference = fetch_production_reference(store, args.line, Path(tempfile.mkdtemp()) / "reference.csv")
    settings = MonitorSettings(min_rows=args.min_rows, last=args.last or None, since=_since(args.since))
    if args.feature_p is not None:
        settings.feature_p_value = args.feature_p
    trigger = None
    if args.trigger_pipeline:  # the bridge to the orchestration; imports the pipeline only when it runs
        from redi.cli.pipeline import drift_trigger

        _check_trigger_target(args)  # before any work: a misconfigured trigger fails at every run, not on drift
        trigger = drift_trigger(args.kfp_host, args.pipeline_workdir, args.lines_dir)
    result = run_monitor(args.line, args.log_dir, reference, args.out, workspace=args.workspace,
                         settings=settings, trigger_pipeline=args.trigger_pipeline, trigger=trigger, store=store)
    print(json.dumps(result.to_dict(), indent=2, default=str))
    if result.drift_detected:
        print(f"redi monitor: drift found on line {args.line}: data drift {result.data_drift}, embedding drift "
              f"{result.embedding_drift}, score shift {result.score_shift}; report {result.html_path}")
        return 0 if args.no_fail else DRIFT_EXIT
    print(f"redi monitor: no drift on line {args.line} ({result.n_current} production rows); "
          f"report {result.html_path}")
    return 0


def _drift_module():
    """``pipelines.drift_pipeline``, imported on first use: it loads kfp, which the check itself never needs."""
    from pipelines import drift_pipeline

    return drift_pipeline


def _schedule(args: argparse.Namespace) -> int:
    """``redi monitor schedule``: the line's drift check as a KFP recurring run."""
    result = _drift_module().schedule_drift(
        args.kfp_host or "", args.line, args.cron, workspace=args.workspace,
        evidently_secret=args.evidently_secret, last=args.last, min_rows=args.min_rows,
        experiment=args.experiment, namespace=args.namespace, lines_dir=args.lines_dir)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _cronjob(args: argparse.Namespace) -> int:
    """``redi monitor cronjob``: print the line's drift-check CronJob manifest (YAML) for ``kubectl apply -f -``."""
    import yaml

    manifest = _drift_module().cronjob_manifest(
        args.line, args.schedule, workspace=args.workspace, evidently_secret=args.evidently_secret,
        last=args.last, min_rows=args.min_rows, namespace=args.namespace, lines_dir=args.lines_dir)
    text = yaml.safe_dump(manifest, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}; apply it with `kubectl apply -f {args.out}`", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _add_schedule_commands(monitor: argparse.ArgumentParser) -> None:
    """``redi monitor schedule`` and ``redi monitor cronjob``: the drift check per line on a schedule."""
    sub = monitor.add_subparsers(dest="monitor_command", required=False, metavar="[schedule|cronjob]")
    for name, help_text in (("schedule", "run the line's drift check on a KFP recurring run (drift pipeline)"),
                            ("cronjob", "print a Kubernetes CronJob manifest that runs the line's drift check")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--line", required=True, help="product line name (its config gives image, store secret, "
                                                     "KFP host, namespace)")
        if name == "schedule":
            p.add_argument("--cron", help="KFP cron, 6 fields seconds first: '0 0 * * * *' = hourly "
                                          "(default: the line's monitor.schedule)")
            p.add_argument("--kfp-host", help="KFP endpoint (default: the line's pipeline.kfp_host)")
            p.add_argument("--experiment", help="KFP experiment (default: the line's pipeline.experiment)")
        else:
            p.add_argument("--schedule", help="Kubernetes cron, 5 fields: '0 * * * *' = hourly (default: the line's "
                                              "monitor.schedule without its seconds)")
            p.add_argument("--out", help="write the manifest here instead of stdout")
        p.add_argument("--workspace", help="URL of the `evidently ui` service the runs go to (the dashboard; "
                                           "default: the line's monitor.workspace)")
        p.add_argument("--evidently-secret", help="Kubernetes secret with key REDI_EVIDENTLY_SECRET "
                                                  "(the service's --secret), if it has one (default: the line's "
                                                  "monitor.evidently_secret)")
        p.add_argument("--last", type=int, help="compare the latest N production rows (0: all; default: the "
                                                "line's monitor.last)")
        p.add_argument("--min-rows", type=int, help="refuse a verdict on fewer rows (default: the line's "
                                                    "monitor.min_rows)")
        p.add_argument("--namespace", help="Kubernetes namespace (default: the line's pipeline.namespace)")
        p.add_argument("--lines-dir", help="folder of line config files (default pipelines/lines)")


def _check_trigger_target(args: argparse.Namespace) -> None:
    """Say where a drift-triggered retraining would go, and refuse a local store in cluster mode.

    With a KFP host the run's steps take the store from the line's secret. Without one the pipeline
    runs here and its gate promotes into this process's store, which in a pod (or with
    ``REDI_CLUSTER_MODE=true``) must be the S3 store: a folder inside the pod is not production.
    """
    from redi.cli.pipeline import pipeline_module
    from redi.ops.object_store import store_for_command

    host = args.kfp_host or pipeline_module().load_line(args.line, args.lines_dir).pipeline.kfp_host
    if host:
        print(f"[redi] drift trigger: retraining runs on KFP at {host}; its gate uses the store of the line's "
              f"store secret", file=sys.stderr, flush=True)
        return
    local_root = os.environ.get("REDI_STORE_DIR") or str(Path(args.pipeline_workdir) / "store")  # as the local run's
    store = store_for_command(local_root=local_root)
    print(f"[redi] drift trigger: retraining runs locally in {args.pipeline_workdir}; its gate promotes into "
          f"{store.describe()}", file=sys.stderr, flush=True)


def _drift_reference(args: argparse.Namespace) -> int:
    """``redi drift-reference``: the drift_reference stage."""
    from redi.core.config import load_config
    from redi.ops.monitoring import build_reference

    overrides = list(args.set or []) + [f"data.root={args.data}"]
    cfg = load_config(args.config, args.profile, overrides)
    model = Path(args.model)
    model = model / "detector.pt" if model.is_dir() else model
    path = build_reference(model, args.data, args.out, cfg)
    print(json.dumps({"reference": str(path)}))
    return 0


def _multipart(fields: dict[str, str], file_field: str, file_path: Path) -> tuple[bytes, str]:
    """Encode a multipart/form-data body (the standard library has no encoder)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append((f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
                  f'filename="{file_path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode())
    parts.append(file_path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _serve_check(args: argparse.Namespace) -> int:
    """``redi serve-check``: is a running service ready, and does it score an image of a line?"""
    url = args.url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=args.timeout) as response:
            ready = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        raise RediError(f"the service at {url} is not reachable or not ready ({exc}); start it with "
                        f"`bentoml serve serving.service:RediService` and wait for /readyz") from exc
    image = Path(args.image)
    if not image.is_file():
        raise InputError(f"image {image} does not exist")
    body, content_type = _multipart({"line": args.line, "return_regions": "true"}, "image", image)
    headers = {"Content-Type": content_type}
    key = args.api_key or os.environ.get("REDI_API_KEY", "")
    if key:
        headers["X-API-Key"] = key
    request = urllib.request.Request(f"{url}/predict", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise RediError(f"{url}/predict answered {exc.code}: {detail}") from exc
    print(json.dumps({"ready": ready, **answer}, indent=2))
    return 0


def add_monitor_commands(subparsers: argparse._SubParsersAction) -> dict[str, Handler]:
    """Register ``monitor``, ``drift-reference`` and ``serve-check``; return ``{name: handler}``."""
    p = subparsers.add_parser("monitor", help="drift report of a line's production images vs its training images "
                                               "(Evidently); exit 1 on drift")
    p.add_argument("--line", help="product line name (required)")
    p.add_argument("--log-dir", default=os.environ.get("REDI_LOG_DIR", "production_logs"),
                   help="the service's production log folder (REDI_LOG_DIR): this host's rows only")
    p.add_argument("--from-store", action="store_true",
                   help="read every serving host's rows from the object store (REDI_S3_*): the segments the "
                        "services ship; always so in cluster mode")
    p.add_argument("--reference", help="the line's drift reference table (drift-reference stage); with "
                                       "--from-store the default is the production version's")
    p.add_argument("--out", default="monitoring", help="folder for report.html, snapshot.json, result.json")
    p.add_argument("--workspace", help="Evidently workspace: the URL of an `evidently ui` service (shared by every "
                                       "host and the dashboard) or a local folder; the run is added to project "
                                       "redi-<line>")
    p.add_argument("--last", type=int, default=MonitorConfig.last,
                   help=f"compare the latest N production rows (0: all; default {MonitorConfig.last})")
    p.add_argument("--since", help="only rows logged at/after this ISO date/time (UTC)")
    p.add_argument("--min-rows", type=int, default=MonitorConfig.min_rows,
                   help=f"refuse a verdict on fewer rows (default {MonitorConfig.min_rows})")
    p.add_argument("--feature-p", type=float, help="K-S p-value below which an image feature drifts (0.01)")
    p.add_argument("--trigger-pipeline", action="store_true",
                   help="on drift, retrain: run the line's pipeline with the line's own profile on the newest "
                        "revision of its data repository (on --kfp-host / the line's pipeline.kfp_host, else locally)")
    p.add_argument("--kfp-host", help="KFP endpoint for the triggered run (default: the line's pipeline.kfp_host; "
                                      "none: run locally)")
    p.add_argument("--pipeline-workdir", default="runs/pipeline", help="work dir of a local triggered run")
    p.add_argument("--lines-dir", help="folder of line config files (default pipelines/lines)")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when drift is found")
    _add_schedule_commands(p)

    p = subparsers.add_parser("drift-reference", help="stage: the monitoring rows of a line's normal training images")
    p.add_argument("model", help="detector.pt or a run folder holding it")
    p.add_argument("data", help="line folder in MVTec-AD layout")
    p.add_argument("--out", required=True, help="reference table path (.csv)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--profile", help="named budget")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[])

    p = subparsers.add_parser("serve-check", help="check a running service: /readyz, then /predict on one image")
    p.add_argument("image", help="an image of the line")
    p.add_argument("--line", required=True)
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--api-key", help="default: REDI_API_KEY")
    p.add_argument("--timeout", type=float, default=60.0)
    return {"monitor": _monitor, "drift-reference": _drift_reference, "serve-check": _serve_check}
