"""``redi watch``: send a line camera's images to the service as they appear (``redi.ops.watcher``).

Self-contained: ``redi/cli/main.py`` calls :func:`add_watch_commands` with its sub-parsers and merges
the returned handlers into its command table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Callable

from redi.core.errors import ConfigError

Handler = Callable[[argparse.Namespace], int]


def _watch(args: argparse.Namespace) -> int:
    """Run the watcher until SIGTERM/SIGINT (or, with ``--once``, until the folder is done)."""
    from redi.ops.watcher import FolderWatcher, WatchSettings

    key = os.environ.get(args.key_env, "")
    if not key:
        raise ConfigError(f"the API key is read from the environment variable {args.key_env}, which is empty; "
                          f"export it (the service's REDI_API_KEY) or name another with --key-env")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    settings = WatchSettings(folder=args.folder, line=args.line, url=args.url, api_key=key, results=args.results,
                             state_dir=args.state_dir, poll_s=args.poll, stable_s=args.stable, inflight=args.inflight,
                             timeout_s=args.timeout, max_backoff_s=args.max_backoff, progress_s=args.progress,
                             mqtt=args.mqtt or "", topic=args.topic or "")
    watcher = FolderWatcher(settings)
    # SIGTERM (systemd, Kubernetes) stops after the window in flight; what is unsent waits in the folder
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop.set())
    try:
        summary = watcher.run(once=args.once)
    except KeyboardInterrupt:
        watcher.stop.set()
        summary = watcher.summary()
    finally:
        watcher.close()
    print(json.dumps(summary))
    return 0


def add_watch_commands(subparsers: argparse._SubParsersAction) -> dict[str, Handler]:
    """Register ``watch``; return ``{name: handler}``."""
    p = subparsers.add_parser("watch", help="send each new image in a camera folder to the service once; write its "
                                            "decision beside it or into ok/ and ng/ (and to MQTT)")
    p.add_argument("folder", help="the folder the camera software writes to (each subfolder is a camera)")
    p.add_argument("--line", required=True, help="product line the images belong to")
    p.add_argument("--url", default="http://127.0.0.1:3000", help="the redi service's base URL")
    p.add_argument("--key-env", default="REDI_API_KEY", help="environment variable holding the service's API key")
    p.add_argument("--results", choices=("beside", "folders"), default="beside",
                   help="beside: NAME.result.json next to the image; folders: move the image into ok/ or ng/")
    p.add_argument("--state-dir", help="the journal's folder (default FOLDER/.redi-watch)")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="also publish each decision to this MQTT broker (QoS 1)")
    p.add_argument("--topic", help="MQTT topic (default redi/<line>/decisions)")
    p.add_argument("--inflight", type=int, default=4, help="requests in flight per camera (decisions stay in order)")
    p.add_argument("--stable", type=float, default=1.0, help="seconds a file's size must stay unchanged before it is sent")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between two looks at an idle folder")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one answer before retrying")
    p.add_argument("--max-backoff", type=float, default=30.0, help="longest wait between retries while the service is down")
    p.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines (sent, rate, queue)")
    p.add_argument("--once", action="store_true", help="exit when every finished image is decided (cron, backlog)")
    return {"watch": _watch}
