"""What every redi KFP component shares: the image, the config, the work dir, fault records.

The components themselves (one module per stage in this package) are KFP lightweight Python
components: KFP copies each function's source into the step, so each function imports what it
needs inside its body, from this module and from ``redi`` (both installed in the image).
"""

import contextlib
import datetime as _dt
import json
import os
import shutil
import subprocess
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterator

# The component image (components/Dockerfile). Override at compile time with REDI_IMAGE, e.g.
# REDI_IMAGE=registry.example.com/factory/redi:0.1.0 redi pipeline compile
REDI_IMAGE = os.environ.get("REDI_IMAGE", "ghcr.io/redi-project/redi:0.1.0")

COMPONENT_OPTIONS = {"base_image": REDI_IMAGE, "install_kfp_package": False}  # no network at run time
_DIGEST = r"sha256:[0-9a-f]{64}"


def pinned_image(image: str, digest: str = "") -> str:
    """The image reference the steps run: ``image@digest`` when the digest is known.

    A tag can be moved to other content; a digest cannot, so a pinned pipeline runs the image it was
    compiled for. ``image`` may carry its digest already (``REDI_IMAGE=registry/redi:0.1.0@sha256:...``);
    ``digest`` is the line's ``pipeline.image_digest`` (``sha256:<64 hex>``, "" = none). The tag is kept
    beside the digest for people; the container runtime pulls by the digest.

    Raises:
        ConfigError: a malformed digest, or two different digests.
    """
    import re

    from redi.core.errors import ConfigError

    name, _, given = image.partition("@")
    for value, where in ((given, f"REDI_IMAGE {image!r}"), (digest, "pipeline.image_digest")):
        if value and not re.fullmatch(_DIGEST, value):
            raise ConfigError(f"{where}: {value!r} is not an image digest; give sha256:<64 hex digits>, the "
                              f"digest the registry holds (`podman push --digestfile FILE IMAGE` writes it)")
    if given and digest and given != digest:
        raise ConfigError(f"REDI_IMAGE {image!r} names digest {given} but pipeline.image_digest is {digest}; "
                          f"give one of them (or the same digest in both)")
    return f"{name}@{given or digest}" if given or digest else image


class StageFailed(RuntimeError):
    """A pipeline stage failed; the message names the stage and the cause."""


S3_SETTINGS = ("REDI_S3_ENDPOINT", "REDI_S3_ACCESS_KEY", "REDI_S3_SECRET_KEY")  # required in cluster mode
S3_OPTIONAL = ("REDI_S3_BUCKET", "REDI_S3_SECURE")
STATUS_ENV = "REDI_STATUS_DIR"  # set by the local runner: where the steps record success or failure
RUN_TAG_ENV = "REDI_RUN_TAG"  # set by the local runner: the run's tag (on a cluster KFP names the run)


def make_config(profile: str, *sections_json: str, data_root: str | Path | None = None):
    """The step's :class:`redi.core.config.RediConfig`: the profile's defaults < the given sections.

    Each of ``sections_json`` is a JSON mapping of config sections (e.g. ``{"data": {...}}``); a step
    receives only the sections its stage reads, so that its KFP cache key changes only with them.
    """
    from redi.core.config import from_dict
    from redi.core.errors import ConfigError

    data: dict[str, Any] = {}
    for text in sections_json:
        try:
            part = json.loads(text or "{}")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config sections are not valid JSON ({exc}): {text[:200]!r}") from exc
        if not isinstance(part, dict):
            raise ConfigError(f"config sections must be a mapping, got {type(part).__name__}")
        data.update(part)
    if profile:
        data["profile"] = profile
    if data_root:
        data["data"] = {**data.get("data", {}), "root": str(data_root)}
    return from_dict(data)


def line_dir(workdir: str, line: str) -> Path:
    """The persistent folder of a line (checkpoints); a temp folder without workdir."""
    if not workdir:
        return Path(tempfile.mkdtemp(prefix=f"redi-{line}-"))
    path = Path(workdir) / line
    path.mkdir(parents=True, exist_ok=True)
    return path


def status_dir() -> Path | None:
    """Where this run's stages record success or failure (``REDI_STATUS_DIR``; None: not recorded).

    The local runner sets it for its step subprocesses; on a cluster KFP's UI holds each step's status.
    """
    folder = os.environ.get(STATUS_ENV, "")
    return Path(folder) if folder else None


def _write_status(stage: str, record: dict[str, Any]) -> None:
    from redi.core.utils import atomic_write_text

    folder = status_dir()
    if folder is not None:
        atomic_write_text(folder / f"{stage}.json", json.dumps(record, indent=2, default=str))


@contextlib.contextmanager
def stage_guard(stage: str, line: str) -> Iterator[dict[str, Any]]:
    """Run a stage's body; record its outputs, or turn any error into :class:`StageFailed`.

    The yielded dict collects what the stage wants to report (paths, tags, decisions). On
    failure, ``$REDI_STATUS_DIR/<stage>.json`` records the cause so the local runner can name it
    (KFP's own error only names the task).
    """
    record: dict[str, Any] = {"stage": stage, "line": line, "started": _now()}
    try:
        yield record
    except Exception as exc:
        cause = f"{type(exc).__name__}: {exc}"
        record.update({"status": "failed", "cause": cause, "traceback": traceback.format_exc(), "ended": _now()})
        _write_status(stage, record)
        raise StageFailed(f"redi stage {stage!r} failed for line {line!r}: {cause}") from exc
    record.update({"status": "succeeded", "ended": _now()})
    _write_status(stage, record)


def open_store(workdir: str, cluster_mode: bool):
    """The line's object store. Cluster mode: S3 from ``REDI_S3_*`` or an error naming the missing
    setting (a folder inside a pod would be an empty production, lost with the pod). Local runs:
    S3 when configured, else ``REDI_STORE_DIR`` or ``<workdir>/store``."""
    from redi.ops.object_store import store_from_env

    local_root = os.environ.get("REDI_STORE_DIR") or (str(Path(workdir) / "store") if workdir else None)
    return store_from_env(local_root=None if cluster_mode else local_root, require_remote=cluster_mode)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def out_dir(artifact_path: str) -> Path:
    """An output artifact's folder (created)."""
    path = Path(artifact_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def copy_files(src_dir: Path, dest_dir: Path, names: list[str]) -> None:
    """Copy the named files that exist from one folder to another."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, dest_dir / name)


# -- data source credentials ---------------------------------------------------------------------
# The keys of the line's data secret (pipeline.data_secret), handed as environment variables to the
# steps that fetch data and to no other: git over HTTPS reads the token through GIT_ASKPASS (never in
# a URL, a command line or a file), DVC's S3 remote reads the AWS_* variables itself.
GIT_USERNAME_ENV = "REDI_GIT_USERNAME"  # optional; hosts that take a token accept any user name
GIT_TOKEN_ENV = "REDI_GIT_TOKEN"
DATA_SECRET_KEYS = (GIT_USERNAME_ENV, GIT_TOKEN_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRET_VALUES = (GIT_TOKEN_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
CREDENTIALS_HINT = (f"credentials of a private repository or DVC remote go into the line's data secret "
                    f"(pipeline.data_secret, keys {GIT_TOKEN_ENV} and optionally {GIT_USERNAME_ENV} for git over "
                    f"HTTPS, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for an S3 remote; a local run reads them "
                    f"from its environment)")
# a git askpass program: it prints the user name or the token from the environment it is run in
_ASKPASS = f"""#!/bin/sh
case "$1" in
  Username*|username*) printf '%s\\n' "${{{GIT_USERNAME_ENV}:-git}}" ;;
  *) printf '%s\\n' "${GIT_TOKEN_ENV}" ;;
esac
"""


def _userinfo(url: str) -> tuple[str, str] | None:
    """``(user, password)`` written into a repository URL, None when it names none."""
    from urllib.parse import urlsplit

    if "://" in url:
        parts = urlsplit(url)
        return (parts.username or "", parts.password or "") if "@" in parts.netloc else None
    head = url.split("/", 1)[0]  # scp-like [user[:password]@]host:path; a local path has no "@" here
    if "@" in head:
        name, _, password = head.rsplit("@", 1)[0].partition(":")
        return name, password
    return None


def redact_url(url: str) -> str:
    """``url`` with any user name and password in it replaced by ``***``."""
    import re

    return re.sub(r"(://)[^/\s]+@", r"\1***@", url) if "://" in url else re.sub(r"^[^/\s]+@", "***@", url)


def check_repo_url(url: str) -> str:
    """Refuse a data repository URL with credentials in it; return it unchanged otherwise.

    Such a URL would be written into the run's parameters, the data manifest and the logs. Allowed:
    an SSH user without a password (``git@host:org/repo``, ``ssh://git@host/repo``). Refused: any
    user or password in an http(s) URL (a token is often given as the user name) and any password.

    Raises:
        ConfigError: naming the fix (the line's data secret).
    """
    from redi.core.errors import ConfigError

    found = _userinfo(url or "")
    if found is None:
        return url
    user, password = found
    ssh = "://" not in url or url.split("://", 1)[0].lower() in ("ssh", "git+ssh", "ssh+git")
    if password or not ssh:
        raise ConfigError(f"data_repo {redact_url(url)!r} has credentials written into it; they would end up in the "
                          f"run's parameters, its data manifest and its logs. Give the URL without them (e.g. "
                          f"{redact_url(url).replace('***@', '')!r}); {CREDENTIALS_HINT}")
    return url


def redact(text: str) -> str:
    """``text`` with the data secret's values and any URL credentials replaced by ``***`` (for messages)."""
    import re

    for key in _SECRET_VALUES:
        value = os.environ.get(key, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(://)[^/\s]+@", r"\1***@", text)


@contextlib.contextmanager
def git_credentials() -> Iterator[dict[str, str]]:
    """The environment for git / ``dvc get``: the token from ``REDI_GIT_TOKEN`` through GIT_ASKPASS.

    Git (and DVC's git client) run the askpass program only when the server asks for credentials;
    it reads the token from the environment, so the token is in no file, URL or command line.
    Without a token git must not wait for a terminal prompt (a pod has none): it fails at once.
    """
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "DVC_NO_ANALYTICS": "1"}
    if not os.environ.get(GIT_TOKEN_ENV):
        yield env
        return
    folder = Path(tempfile.mkdtemp(prefix="redi-askpass-"))
    try:
        program = folder / "askpass.sh"
        program.write_text(_ASKPASS)
        program.chmod(0o700)
        yield {**env, "GIT_ASKPASS": str(program)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- data versioning ----------------------------------------------------------------------------
def fetch_dataset(data_path: str, data_repo: str, data_revision: str, dest: Path) -> dict[str, str]:
    """Copy a line's dataset into ``dest``: a plain folder, a DVC repo's working copy, or a DVC revision.

    - no ``data_repo``: ``data_path`` is a folder on disk (``data_revision`` must be empty);
    - ``data_repo`` is a local folder and no revision: its working copy ``data_repo/data_path``;
    - otherwise ``dvc get <data_repo> <data_path> --rev <data_revision>``: the files of that git
      revision, from the repo's DVC cache or remote (a git URL works on a cluster).

    Credentials of a private repository or DVC remote come from the environment (the line's data
    secret, :data:`DATA_SECRET_KEYS`); a ``data_repo`` with credentials in it is refused.

    Returns:
        ``{"source": ..., "revision": ...}`` describing what was fetched (no credentials in it).
    """
    from redi.core.errors import DatasetError

    check_repo_url(data_repo)
    if dest.exists():
        shutil.rmtree(dest)
    if not data_repo:
        if data_revision:
            raise DatasetError(f"data_revision {data_revision!r} needs data_repo (the DVC repository that "
                               f"versions {data_path}); set both, or leave the revision empty")
        _copy_tree(Path(data_path), dest)
        return {"source": str(Path(data_path).resolve()), "revision": "working copy"}
    if not data_revision and Path(data_repo).is_dir():
        _copy_tree(Path(data_repo) / data_path, dest)
        return {"source": str((Path(data_repo) / data_path).resolve()), "revision": "working copy"}
    command = [_dvc(), "get", data_repo, data_path, "-o", str(dest)]
    if data_revision:
        command += ["--rev", data_revision]
    with git_credentials() as env:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise DatasetError(redact(f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip()[-1500:]}; "
                                  f"check the repository, the path and that revision {data_revision or 'HEAD'} "
                                  f"was pushed to the DVC remote (`dvc push`); {CREDENTIALS_HINT}"))
    return {"source": f"{data_repo}:{data_path}", "revision": data_revision or "HEAD"}


def tree_hash(folder: str | Path) -> str:
    """sha256 over every file's relative path and content hash: the dataset's content fingerprint."""
    import hashlib

    from redi.core.utils import sha256_file

    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def resolve_revision(data_repo: str, revision: str = "HEAD") -> str:
    """The commit a git revision names in ``data_repo`` (a local repository or a git URL).

    A local repository: ``git rev-parse``; a URL: ``git ls-remote`` (branches, tags, HEAD; a
    revision it does not list, e.g. an abbreviated commit, is returned as given).
    """
    from redi.core.errors import DatasetError

    check_repo_url(data_repo)
    revision = revision or "HEAD"
    local = "://" not in data_repo and Path(data_repo).is_dir()
    if local:
        command = ["git", "-C", data_repo, "rev-parse", "--verify", f"{revision}^{{commit}}"]
    else:
        command = ["git", "ls-remote", data_repo, revision]
    with git_credentials() as env:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise DatasetError(redact(f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip()[-800:]}; "
                                  f"check that {data_repo} is a git repository and {revision} exists there; "
                                  f"{CREDENTIALS_HINT}"))
    found = done.stdout.split()
    if local:
        return found[0]
    return found[0] if found else revision


def _dvc() -> str:
    import sys

    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else "dvc"


def _copy_tree(src: Path, dest: Path) -> None:
    from redi.core.errors import DatasetError

    if not src.is_dir():
        raise DatasetError(f"dataset folder {src} does not exist; give the line's folder in MVTec-AD layout "
                           f"(train/good, test/<type>, ground_truth/<type>)")
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".dvc", ".git", "*.dvc"))


# -- reports ------------------------------------------------------------------------------------
def inline_html(index: Path, dest: Path) -> Path:
    """Write ``index.html`` with its local pictures embedded (KFP shows an HTML artifact as one file)."""
    import base64
    import mimetypes
    import re

    html = index.read_text(errors="replace")

    def embed(match: "re.Match[str]") -> str:
        target = index.parent / match.group(2)
        if not target.is_file():
            return match.group(0)
        mime = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        data = base64.b64encode(target.read_bytes()).decode()
        return f'{match.group(1)}"data:{mime};base64,{data}"'

    html = re.sub(r'(src=)"(?!data:|https?:)([^"]+)"', embed, html)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(html)
    return dest


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of a metrics dict (what KFP Metrics can show)."""
    import math

    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out
