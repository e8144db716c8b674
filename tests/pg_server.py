"""A real PostgreSQL server for tests: Debian's ``postgresql``, one cluster in a temp folder, a database per test.

``start_pg_server()`` runs ``initdb`` and ``pg_ctl`` (as the ``postgres`` user when we are root: the server
refuses to run as root) on a free loopback port with trust authentication and no fsync (a throwaway
cluster), yields a :class:`PgServer`, and stops and deletes the cluster at the end. ``PgServer.create_database``
makes a fresh empty database (cheap: a copy of ``template0``), so tests never see each other's rows.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PG_ROOT = Path("/usr/lib/postgresql")


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's ``bin`` folder (Debian's layout), or None."""
    found = sorted((p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


def ensure_postgres() -> tuple[Path | None, str]:
    """The server's ``bin`` folder, installing Debian's ``postgresql`` when missing and we are root;
    else ``(None, why)``."""
    from apt_install import apt_install

    found = postgres_bin()
    why = apt_install("postgresql") if found is None else ""
    found = found or postgres_bin()
    if found is None:
        return None, why or "apt-get installed postgresql but no PostgreSQL server binaries were found"
    return found, ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    """A running throwaway cluster: ``port``, its superuser ``user`` (no password, loopback only)."""

    port: int
    user: str
    folder: Path

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of one database (the form REDI_REVIEW_DB takes)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(sql)

    def create_database(self, prefix: str = "review") -> str:
        """A new empty database; returns its URL."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by :meth:`create_database`, closing whatever still holds it open."""
        self._admin(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def _as_server_user(args: list[str]) -> list[str]:
    """The command run as ``postgres`` when we are root (the server will not run as root)."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextmanager
def start_pg_server(bin_dir: Path, max_connections: int = 300) -> Iterator[PgServer]:
    """A cluster in a new temp folder on a free port; stopped (immediately) and deleted at the end."""
    folder = Path(tempfile.mkdtemp(prefix="redi-pg-"))
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    if os.geteuid() == 0:  # pytest's tmp folders are root's (0700): the cluster lives where postgres may write
        shutil.chown(folder, "postgres", "postgres")
    data, log = folder / "data", folder / "server.log"
    port = _free_port()
    try:
        subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--auth=trust",
                                        "--encoding=UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections={max_connections} "
                   f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        started = subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log),
                                                  "-o", options, "-w", "-t", "60", "start"]),
                                 capture_output=True, text=True, timeout=90)
        if started.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr}\n"
                               f"{log.read_text() if log.exists() else ''}")
        server = PgServer(port=port, user=user, folder=folder)
        _wait_ready(server)
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                            "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(server: PgServer, timeout_s: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            server._admin("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


REVIEW_BACKENDS = ("sqlite", "postgresql")


@contextmanager
def review_database(request, backend: str, folder: Path) -> Iterator[str]:
    """A fresh empty review database's URL on ``backend``: SQLite in ``folder``, or a new database on the
    session's PostgreSQL (the ``pg_server`` fixture; the test is skipped with the reason when it cannot run),
    dropped at the end."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'review.db'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(url)
