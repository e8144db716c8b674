"""The object store: one interface over an S3 server (MinIO in production) or a local folder.

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

Each object write is atomic (S3 PUT; ``os.replace`` on disk). What is stored where (versions,
production pointers, audit records) is :mod:`redi.ops.model_registry`'s business.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from redi.core.errors import RediError

DEFAULT_BUCKET = "redi"
DEFAULT_LOCAL_DIR = "runs/pipeline/store"  # the local pipeline's store (its workdir is runs/pipeline)


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
