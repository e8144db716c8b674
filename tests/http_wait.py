"""Waiting for a server started by a test (bentoml serve, evidently ui) to answer on loopback."""

from __future__ import annotations

import subprocess
import time

import requests


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float) -> bool:
    """Poll ``url`` until it answers 200; False when the process dies or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return True
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet
        time.sleep(0.5)
    return False
