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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BentoServer:
    """``bentoml serve TARGET`` on a free loopback port, in its own session, stopped by its PID.

    ``wait_ready``: wait for ``/readyz`` to answer 200 (None: do not wait; the caller checks).
    """

    def __init__(self, env: dict[str, str], log: "Path", target: str = "serving.service:RediService",
                 wait_ready: float | None = 180.0) -> None:
        import sys
        from pathlib import Path

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        self._file = open(self.log, "w")
        bentoml = Path(sys.executable).parent / "bentoml"
        self.proc = subprocess.Popen([str(bentoml), "serve", target, "--host", "127.0.0.1", "--port", str(self.port)],
                                     cwd=Path(__file__).resolve().parents[1], env=env, stdout=self._file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if wait_ready is not None and not wait_for_http(f"{self.url}/readyz", self.proc, wait_ready):
            self.stop()
            raise RuntimeError(f"bentoml serve {target} did not become ready:\n{self.output()[-3000:]}")

    def output(self) -> str:
        """Everything the server wrote so far."""
        self._file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the server's session after 30 s."""
        import os
        import signal

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._file.close()
