"""Object storage for models, reports, manifests and each product line's production pointer.

Two stores with one interface:

- :class:`S3Store`: any S3 server (MinIO in production) through the ``minio`` client;
- :class:`LocalStore`: a folder on disk, used when no endpoint is configured.

:func:`store_from_env` picks one from the environment:

==================  ==========================================================================
``REDI_S3_ENDPOINT``  ``host:port`` or ``http(s)://host:port`` of the S3 server; unset: local store
``REDI_S3_ACCESS_KEY`` / ``REDI_S3_SECRET_KEY``  credentials
``REDI_S3_BUCKET``    bucket (default ``redi``; created when missing)
``REDI_S3_SECURE``    ``true`` for HTTPS (default: from the URL scheme, else false)
``REDI_S3_REGION``    optional region
``REDI_STORE_DIR``    folder of the local store (default ``runs/pipeline/store``, the demo's)
==================  ==========================================================================

Layout (keys are ``/``-separated, the same in both stores)::

    lines/<line>/versions/<version>/<file>      every artifact of a candidate model
    lines/<line>/versions/<version>/index.json  written LAST: the list of files, sizes and sha256
    lines/<line>/promotions/<time>-<version>.json  one record per promotion (history)
    lines/<line>/production.json                the production pointer, moved LAST of all

Why this order is safe: a version counts as complete only once its ``index.json`` exists, and
:func:`promote` refuses a version whose index is missing or whose files do not match it. Each
object write is atomic (S3 PUT; ``os.replace`` on disk), so an upload interrupted at any point
leaves ``production.json`` naming the previous, complete version; rerunning the upload finishes
the new version (files are written again, nothing is deleted).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

from redi.errors import RediError
from redi.utils import sha256_file

DEFAULT_BUCKET = "redi"
DEFAULT_LOCAL_DIR = "runs/pipeline/store"  # the local pipeline's store (its workdir is runs/pipeline)
INDEX_NAME = "index.json"
POINTER_NAME = "production.json"


class StorageError(RediError):
    """Object storage is unreachable, misconfigured, or lacks an expected object."""


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise StorageError(f"invalid object key {key!r}: use a relative key like lines/<line>/...")
    return key


class ObjectStore(ABC):
    """The operations redi needs from an object store; keys are relative ``a/b/c`` strings."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path) -> None:
        """Upload a local file to ``key`` (replacing any object there)."""

    @abstractmethod
    def get_file(self, key: str, dest: str | Path) -> Path:
        """Download ``key`` to ``dest``; raise :class:`StorageError` when it does not exist."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` atomically."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """The object's content, or None when there is none."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when there is none."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, sorted."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """A human-readable address of ``key`` (``s3://bucket/key`` or a file path)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at ``key``; a missing object is not an error (deletion is idempotent)."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""
        return self.size(key) is not None

    def put_json(self, key: str, payload: Any) -> None:
        """Write ``payload`` as indented JSON."""
        self.put_bytes(key, json.dumps(payload, indent=2, default=str).encode())

    def get_json(self, key: str) -> Any | None:
        """Read a JSON object, or None when there is none."""
        data = self.get_bytes(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{self.uri(key)} is not valid JSON ({exc}); it was not written by redi") from exc


class LocalStore(ObjectStore):
    """A folder that behaves like a bucket (the default when no S3 endpoint is configured)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _write_atomic(self, key: str, writer) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
        try:
            writer(Path(tmp))
            os.replace(tmp, target)  # atomic: readers see the old or the new object, never half
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def put_file(self, key: str, path: str | Path) -> None:
        source = Path(path)
        if not source.is_file():
            raise StorageError(f"cannot upload {source}: no such file")
        self._write_atomic(key, lambda tmp: shutil.copyfile(source, tmp))

    def get_file(self, key: str, dest: str | Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"{source} does not exist in the local store")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        return dest

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomic(key, lambda tmp: tmp.write_bytes(data))

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        if not base.exists():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".part"))

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:  # drop emptied folders up to the root, as a bucket has none
            if parent == self.root or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()

    def __repr__(self) -> str:
        return f"LocalStore({self.root})"


class S3Store(ObjectStore):
    """A bucket on an S3 server (MinIO, SeaweedFS, AWS) through the ``minio`` client."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str = DEFAULT_BUCKET,
                 secure: bool | None = None, region: str | None = None) -> None:
        from minio import Minio

        parsed = urlparse(endpoint if "://" in endpoint else f"//{endpoint}")
        if not parsed.netloc:
            raise StorageError(f"REDI_S3_ENDPOINT {endpoint!r} is not host:port or http(s)://host:port")
        if secure is None:
            secure = parsed.scheme == "https"
        self.endpoint, self.bucket, self.secure = parsed.netloc, bucket, secure
        self.client = Minio(parsed.netloc, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=region or None)
        self._ensure_bucket()

    def _fail(self, action: str, exc: Exception) -> StorageError:
        return StorageError(f"S3 {action} on {self.describe()} failed: {exc}; check REDI_S3_ENDPOINT, "
                            f"REDI_S3_ACCESS_KEY / REDI_S3_SECRET_KEY and that the server is running")

    def describe(self) -> str:
        """``s3://bucket at host:port`` for messages."""
        return f"s3://{self.bucket} at {'https' if self.secure else 'http'}://{self.endpoint}"

    def _ensure_bucket(self) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except Exception as exc:  # network errors, bad keys, ... all mean "not usable"
            raise self._fail("bucket check", exc) from exc

    def _is_missing(self, exc: Exception) -> bool:
        from minio.error import S3Error

        return isinstance(exc, S3Error) and exc.code in ("NoSuchKey", "NotFound", "NoSuchObject")

    def put_file(self, key: str, path: str | Path) -> None:
        source = Path(path)
        if not source.is_file():
            raise StorageError(f"cannot upload {source}: no such file")
        try:
            self.client.fput_object(self.bucket, _check_key(key), str(source))
        except Exception as exc:
            raise self._fail(f"upload of {key}", exc) from exc

    def get_file(self, key: str, dest: str | Path) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.fget_object(self.bucket, _check_key(key), str(dest))
        except Exception as exc:
            if self._is_missing(exc):
                raise StorageError(f"{self.uri(key)} does not exist") from exc
            raise self._fail(f"download of {key}", exc) from exc
        return dest

    def put_bytes(self, key: str, data: bytes) -> None:
        content_type = "application/json" if key.endswith(".json") else "application/octet-stream"
        try:
            self.client.put_object(self.bucket, _check_key(key), io.BytesIO(data), len(data),
                                   content_type=content_type)
        except Exception as exc:
            raise self._fail(f"upload of {key}", exc) from exc

    def get_bytes(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(self.bucket, _check_key(key))
        except Exception as exc:
            if self._is_missing(exc):
                return None
            raise self._fail(f"read of {key}", exc) from exc
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def size(self, key: str) -> int | None:
        try:
            return int(self.client.stat_object(self.bucket, _check_key(key)).size)
        except Exception as exc:
            if self._is_missing(exc):
                return None
            raise self._fail(f"stat of {key}", exc) from exc

    def list(self, prefix: str) -> list[str]:
        try:
            return sorted(o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True))
        except Exception as exc:
            raise self._fail(f"listing of {prefix}", exc) from exc

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, _check_key(key))  # S3 DELETE succeeds on a missing key
        except Exception as exc:
            raise self._fail(f"delete of {key}", exc) from exc

    def __repr__(self) -> str:
        return f"S3Store({self.describe()})"


def store_from_env(env: Mapping[str, str] | None = None, local_root: str | Path | None = None,
                   require_remote: bool = False) -> ObjectStore:
    """The store the environment configures: S3 when ``REDI_S3_ENDPOINT`` is set, else a local folder.

    Args:
        env: the variables to read (default ``os.environ``).
        local_root: folder of the local store; default ``REDI_STORE_DIR`` or ``runs/pipeline/store``.
        require_remote: cluster mode: no local fallback. A missing ``REDI_S3_ENDPOINT`` (or key) is
            an error naming the setting, and an unreachable server fails here, before any work.
    """
    env = os.environ if env is None else env
    endpoint = env.get("REDI_S3_ENDPOINT", "").strip()
    if not endpoint:
        if require_remote:
            raise StorageError("REDI_S3_ENDPOINT is not set, and this step runs in cluster mode, where the object "
                               "store is required (a local folder inside a pod would be an empty production and "
                               "would be lost): give the step REDI_S3_ENDPOINT, REDI_S3_ACCESS_KEY and "
                               "REDI_S3_SECRET_KEY (the line's pipeline.store_secret Kubernetes secret)")
        return LocalStore(local_root or env.get("REDI_STORE_DIR") or DEFAULT_LOCAL_DIR)
    access, secret = env.get("REDI_S3_ACCESS_KEY", ""), env.get("REDI_S3_SECRET_KEY", "")
    if not access or not secret:
        raise StorageError("REDI_S3_ENDPOINT is set but REDI_S3_ACCESS_KEY or REDI_S3_SECRET_KEY is empty; "
                           "set both (or unset REDI_S3_ENDPOINT to use the local store)")
    secure_text = env.get("REDI_S3_SECURE", "").strip().lower()
    secure = None if not secure_text else secure_text in ("1", "true", "yes", "on")
    return S3Store(endpoint, access, secret, env.get("REDI_S3_BUCKET") or DEFAULT_BUCKET, secure,
                   env.get("REDI_S3_REGION"))


# -- the line / version layout -----------------------------------------------------------------
def line_prefix(line: str) -> str:
    """``lines/<line>``; line names are folder-safe identifiers."""
    if not line or "/" in line or line.startswith("."):
        raise StorageError(f"invalid product line name {line!r}: use letters, digits, '_' or '-'")
    return f"lines/{line}"


def version_key(line: str, version: str, name: str = "") -> str:
    """Key of a version's folder, or of one file in it."""
    if not version or "/" in version:
        raise StorageError(f"invalid model version {version!r}")
    base = f"{line_prefix(line)}/versions/{version}"
    return f"{base}/{name}" if name else base


def _expand(files: Mapping[str, str | Path]) -> list[tuple[str, Path]]:
    """(name in the version folder, local file) for each file, folders expanded recursively."""
    items: list[tuple[str, Path]] = []
    for name, path in files.items():
        path = Path(path)
        if path.is_dir():
            items += [(f"{name}/{p.relative_to(path).as_posix()}", p) for p in sorted(path.rglob("*")) if p.is_file()]
        elif path.is_file():
            items.append((name, path))
        else:
            raise StorageError(f"artifact {name!r} at {path} does not exist; nothing was uploaded for it")
    return items


def publish_version(store: ObjectStore, line: str, version: str, files: Mapping[str, str | Path],
                    info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Upload every artifact of a model version, check each, then write the version's index last.

    Args:
        files: name in the version folder -> local file or folder (folders keep their layout).
        info: extra fields recorded in the index (metrics, decision, data revision, ...).

    Returns:
        the index: ``line, version, files [{name, key, size, sha256}], uploaded, info``.
    """
    entries = []
    for name, path in _expand(files):
        key = version_key(line, version, name)
        store.put_file(key, path)
        size = path.stat().st_size
        if store.size(key) != size:  # a truncated upload must never be indexed
            raise StorageError(f"upload of {path} to {store.uri(key)} is incomplete; rerun the upload")
        entries.append({"name": name, "key": key, "size": size, "sha256": sha256_file(path)})
    index = {"line": line, "version": version, "files": entries,
             "uploaded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "info": dict(info or {})}
    store.put_json(version_key(line, version, INDEX_NAME), index)
    return index


def version_index(store: ObjectStore, line: str, version: str) -> dict[str, Any] | None:
    """The index of a completely uploaded version, or None."""
    return store.get_json(version_key(line, version, INDEX_NAME))


def verify_version(store: ObjectStore, line: str, version: str) -> dict[str, Any]:
    """The version's index after checking every file it names is stored with the right size."""
    index = version_index(store, line, version)
    if index is None:
        raise StorageError(f"version {version} of line {line!r} has no {INDEX_NAME} in {store!r}: its upload "
                           f"did not finish; rerun the pipeline's gate step to upload it again")
    for entry in index["files"]:
        if store.size(entry["key"]) != entry["size"]:
            raise StorageError(f"{store.uri(entry['key'])} is missing or has the wrong size; "
                               f"upload version {version} again")
    return index


def production_record(store: ObjectStore, line: str) -> dict[str, Any] | None:
    """The line's production pointer (``version``, ``detector`` key, ``metrics``, ...), or None."""
    return store.get_json(f"{line_prefix(line)}/{POINTER_NAME}")


def actor() -> str:
    """Who is acting, for audit records: ``user@host`` of this process."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = os.environ.get("USER") or "unknown"
    return f"{user}@{socket.gethostname()}"


def detector_sha256(index: Mapping[str, Any]) -> str | None:
    """The sha256 of a version's ``detector.pt`` as its index recorded it."""
    return next((e["sha256"] for e in index.get("files", []) if e["name"] == "detector.pt"), None)


def check_promotable(store: ObjectStore, line: str, version: str, verify_hash: bool = True) -> dict[str, Any]:
    """The version's index, after every check a promotion or rollback must pass.

    - the upload is complete (:func:`verify_version`: every file there, right sizes);
    - the gate passed it (its index records ``promote: true``): a refused model is never served;
    - with ``verify_hash``, the stored ``detector.pt`` has the sha256 the index recorded.

    Raises:
        StorageError: a check failed; the message says which and what to do.
    """
    index = verify_version(store, line, version)
    if (index.get("info") or {}).get("promote") is not True:
        raise StorageError(f"version {version} of line {line!r} was refused by the gate (or never gated), so it "
                           f"cannot be promoted: a refused model is never served. Train a better model, or see "
                           f"`redi model show --line {line} --version {version}` for the gate's reasons")
    expected = detector_sha256(index)
    if not expected:
        raise StorageError(f"version {version} of line {line!r} has no detector.pt; it cannot be served")
    if verify_hash:
        with tempfile.TemporaryDirectory() as tmp:
            got = sha256_file(store.get_file(version_key(line, version, "detector.pt"), Path(tmp) / "detector.pt"))
        if got != expected:
            raise StorageError(f"{store.uri(version_key(line, version, 'detector.pt'))} has sha256 {got[:12]}..., "
                               f"not the {expected[:12]}... its index recorded: the object was changed or "
                               f"corrupted; upload version {version} again")
    return index


def promote(store: ObjectStore, line: str, version: str, record: Mapping[str, Any] | None = None, *,
            action: str = "promote", by: str = "", reason: str = "", verify_hash: bool = True) -> dict[str, Any]:
    """Point the line's production at ``version``: check it, write the audit record, move the pointer last.

    Args:
        record: extra fields kept in the pointer (metrics, gate reasons, ...).
        action: ``promote`` or ``rollback`` (recorded).
        by, reason: who acts and why (recorded; ``by`` defaults to :func:`actor`).
        verify_hash: download the detector and compare its sha256 with the index (see
            :func:`check_promotable`).

    Returns:
        the new pointer (``version``, ``detector`` key, ``sha256``, ``promoted``, ``by``, ``reason``, ...).
    """
    index = check_promotable(store, line, version, verify_hash)
    previous = production_record(store, line)
    now = _dt.datetime.now(_dt.timezone.utc)
    names = {entry["name"]: entry["key"] for entry in index["files"]}
    pointer = {**dict(record or {}),  # extra fields first: they never override the pointer's own
               "line": line, "version": version, "index": version_key(line, version, INDEX_NAME),
               "detector": names.get("detector.pt"), "sha256": detector_sha256(index), "files": names,
               "promoted": now.isoformat(timespec="seconds"), "action": action, "by": by or actor(),
               "reason": reason, "previous_version": previous.get("version") if previous else None}
    # the audit record is written before the switch: no production change without its record
    store.put_json(f"{line_prefix(line)}/promotions/{now.strftime('%Y%m%dT%H%M%S%f')}-{version}.json", pointer)
    store.put_json(f"{line_prefix(line)}/{POINTER_NAME}", pointer)  # the single atomic switch
    return pointer


def promotion_history(store: ObjectStore, line: str) -> list[dict[str, Any]]:
    """Every promotion and rollback of a line (the audit records), oldest first."""
    prefix = f"{line_prefix(line)}/promotions/"
    return [record for key in store.list(prefix) if key.endswith(".json")
            if (record := store.get_json(key)) is not None]


def rollback(store: ObjectStore, line: str, version: str | None = None, *, by: str = "",
             reason: str = "") -> dict[str, Any]:
    """Put back an earlier production model: ``version``, or the one served before the current one.

    The target goes through the same checks as a promotion (:func:`check_promotable`).
    """
    current = production_record(store, line)
    if current is None:
        raise StorageError(f"line {line!r} has no production model in {store!r}: nothing to roll back")
    if version is None:
        earlier = [r["version"] for r in promotion_history(store, line) if r.get("version") != current["version"]]
        if not earlier:
            raise StorageError(f"line {line!r} has had no production model other than {current['version']}: "
                               f"nothing to roll back to; name a version with --version")
        version = earlier[-1]
    if version == current["version"]:
        raise StorageError(f"version {version} is already line {line!r}'s production model")
    target = version_index(store, line, version) or {}
    metrics = ((target.get("info") or {}).get("metrics")) or {}
    return promote(store, line, version, {"metrics": metrics}, action="rollback", by=by, reason=reason)


def production_lines(store: ObjectStore) -> list[str]:
    """Every line that has a production pointer."""
    return sorted({key.split("/")[1] for key in store.list("lines/") if key.endswith("/" + POINTER_NAME)
                   and key.count("/") == 2})


def fetch_file(store: ObjectStore, key: str, dest: str | Path) -> Path:
    """Download one object (e.g. the production pointer's ``detector`` key) to ``dest``."""
    return store.get_file(key, dest)


def fetch_production_detector(store: ObjectStore, line: str, dest: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """Download the line's production detector to ``dest`` and check its sha256; None when the line has none.

    Raises:
        StorageError: the pointer names no detector, or the downloaded file's hash differs from the
            one recorded at promotion (the file is then removed).
    """
    pointer = production_record(store, line)
    if pointer is None:
        return None
    if not pointer.get("detector"):
        raise StorageError(f"the production pointer of line {line!r} names no detector.pt; promote a version again")
    path = fetch_file(store, pointer["detector"], dest)
    expected = pointer.get("sha256")
    if expected and sha256_file(path) != expected:
        path.unlink()
        raise StorageError(f"{store.uri(pointer['detector'])} (production of line {line!r}, version "
                           f"{pointer['version']}) does not have the sha256 recorded at promotion; it was "
                           f"changed after promotion. Promote or roll back to a verified version")
    return path, pointer


def list_versions(store: ObjectStore, line: str) -> list[str]:
    """Versions of a line whose upload completed (those with an index), oldest first by name."""
    prefix = f"{line_prefix(line)}/versions/"
    return sorted({k[len(prefix):].split("/")[0] for k in store.list(prefix) if k.endswith("/" + INDEX_NAME)})


def version_summary(store: ObjectStore, line: str, version: str,
                    production: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``redi model list/show`` tells of a version: gate decision, metrics, hash, production flag."""
    index = version_index(store, line, version)
    if index is None:
        raise StorageError(f"line {line!r} has no complete version {version!r} in {store!r}; "
                           f"`redi model list --line {line}` lists the versions")
    info = index.get("info") or {}
    production = production_record(store, line) if production is None else production
    return {"version": version, "uploaded": index.get("uploaded"),
            "gate": "passed" if info.get("promote") is True else "refused",
            "reasons": info.get("reasons", []), "metrics": info.get("metrics", {}),
            "detector_sha256": detector_sha256(index), "files": len(index.get("files", [])),
            "data_revision": (info.get("info") or {}).get("data_revision", ""),
            "production": bool(production and production.get("version") == version)}


def iter_keys(store: ObjectStore, line: str) -> Iterable[str]:
    """Every stored key of a line (for inspection and tests)."""
    return store.list(line_prefix(line) + "/")
