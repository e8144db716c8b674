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
``REDI_CLUSTER_MODE`` ``true``/``false``: cluster mode, where commands refuse a local store
                      (default: true inside a Kubernetes pod, i.e. when ``KUBERNETES_SERVICE_HOST`` is set)
==================  ==========================================================================

Each object write is atomic (S3 PUT; ``os.replace`` on disk). Objects that several writers move
(a line's production pointer) are written with a compare-and-swap, :meth:`ObjectStore.put_bytes_if`:
the write happens only when the object is still the one the writer read (S3: a conditional PUT with
``If-Match`` on the ETag, or ``If-None-Match: *`` for a new object; on disk: ``os.replace`` under an
``fcntl`` lock). What is stored where (versions, production pointers, audit records) is
:mod:`redi.ops.model_registry`'s business.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

from redi.core.errors import RediError

DEFAULT_BUCKET = "redi"
DEFAULT_LOCAL_DIR = "runs/pipeline/store"  # the local pipeline's store (its workdir is runs/pipeline)
LOCK_DIR = ".redi-locks"  # the local store's lock files (not objects: never listed)
CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"  # set by Kubernetes in every pod
CLUSTER_SETTING = "REDI_CLUSTER_MODE"  # explicit: true forces cluster mode, false turns the detection off


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

    @abstractmethod
    def get_bytes_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """``(content, version tag)`` of the object, or ``(None, None)`` when there is none.

        The tag identifies this exact content for :meth:`put_bytes_if` (the ETag on S3).
        """

    @abstractmethod
    def put_bytes_if(self, key: str, data: bytes, expected: str | None) -> bool:
        """Compare-and-swap: write ``data`` only while the object's tag is still ``expected``.

        ``expected`` None means "only if there is no object yet". Returns False, writing nothing,
        when another writer got there first (re-read with :meth:`get_bytes_versioned` and decide again).
        """

    @abstractmethod
    def describe(self) -> str:
        """Where this store keeps its objects, for messages (``s3://bucket at URL`` or the folder)."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""
        return self.size(key) is not None

    def get_json_versioned(self, key: str) -> tuple[Any | None, str | None]:
        """``(JSON object, version tag)`` or ``(None, None)`` (see :meth:`get_bytes_versioned`)."""
        data, tag = self.get_bytes_versioned(key)
        return (None, None) if data is None else (self._parse_json(key, data), tag)

    def put_json_if(self, key: str, payload: Any, expected: str | None) -> bool:
        """:meth:`put_bytes_if` of ``payload`` as indented JSON."""
        return self.put_bytes_if(key, json.dumps(payload, indent=2, default=str).encode(), expected)

    def put_json(self, key: str, payload: Any) -> None:
        """Write ``payload`` as indented JSON."""
        self.put_bytes(key, json.dumps(payload, indent=2, default=str).encode())

    def get_json(self, key: str) -> Any | None:
        """Read a JSON object, or None when there is none."""
        data = self.get_bytes(key)
        return None if data is None else self._parse_json(key, data)

    def _parse_json(self, key: str, data: bytes) -> Any:
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
        locks = self.root / LOCK_DIR
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".part") and locks not in p.parents)

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def describe(self) -> str:
        """``local folder <path>`` for messages."""
        return f"local folder {self.root}"

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """An exclusive ``fcntl`` lock for ``key``, shared by every process on this machine (and by
        NFS clients whose server supports locks); released when the block ends or the process dies."""
        import fcntl

        lock_path = self.root / LOCK_DIR / (_check_key(key).replace("/", "%") + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def get_bytes_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        data = self.get_bytes(key)  # os.replace: the old or the new content, never a mix
        return (None, None) if data is None else (data, hashlib.sha256(data).hexdigest())

    def put_bytes_if(self, key: str, data: bytes, expected: str | None) -> bool:
        with self._locked(key):
            _, current = self.get_bytes_versioned(key)
            if current != expected:
                return False
            self.put_bytes(key, data)
            return True

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:  # drop emptied folders up to the root, as a bucket has none
            if parent == self.root or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()

    def __repr__(self) -> str:
        return f"LocalStore({self.root})"


PROBE_KEY = "redi-probe/conditional-write"
_PRECONDITION_CODES = ("PreconditionFailed", "ConditionalRequestConflict")  # 412; 409 when two race


class S3Store(ObjectStore):
    """A bucket on an S3 server (MinIO, SeaweedFS, AWS) through the ``minio`` client."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str = DEFAULT_BUCKET,
                 secure: bool | None = None, region: str | None = None, http_client: Any = None,
                 check_bucket: bool = True) -> None:
        # http_client: a urllib3 PoolManager with the caller's timeouts and retries (minio's default
        # waits up to 300 s per attempt); check_bucket=False: no server round trip at construction
        from minio import Minio

        parsed = urlparse(endpoint if "://" in endpoint else f"//{endpoint}")
        if not parsed.netloc:
            raise StorageError(f"REDI_S3_ENDPOINT {endpoint!r} is not host:port or http(s)://host:port")
        if secure is None:
            secure = parsed.scheme == "https"
        self.endpoint, self.bucket, self.secure = parsed.netloc, bucket, secure
        self._conditional_ok = False
        self.client = Minio(parsed.netloc, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=region or None, http_client=http_client)
        if check_bucket:
            self._ensure_bucket()

    def _fail(self, action: str, exc: Exception) -> StorageError:
        return StorageError(f"S3 {action} on {self.describe()} failed: {exc}; check REDI_S3_ENDPOINT, "
                            f"REDI_S3_ACCESS_KEY / REDI_S3_SECRET_KEY and that the server is running")

    def describe(self) -> str:
        """``s3://bucket at host:port`` for messages."""
        return f"s3://{self.bucket} at {'https' if self.secure else 'http'}://{self.endpoint}"

    def _ensure_bucket(self) -> None:
        from minio.error import S3Error

        try:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:  # another replica made it between the check and the create: fine
                    if exc.code != "BucketAlreadyOwnedByYou":
                        raise
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

    def get_bytes_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            response = self.client.get_object(self.bucket, _check_key(key))
        except Exception as exc:
            if self._is_missing(exc):
                return None, None
            raise self._fail(f"read of {key}", exc) from exc
        try:
            return response.read(), (response.headers.get("ETag") or "").strip('"') or None
        finally:
            response.close()
            response.release_conn()

    def put_bytes_if(self, key: str, data: bytes, expected: str | None) -> bool:
        from minio.error import S3Error

        self._check_conditional_writes()
        condition = {"If-None-Match": "*"} if expected is None else {"If-Match": f'"{expected}"'}
        try:
            self._conditional_put(_check_key(key), data, condition)
        except S3Error as exc:
            if exc.code in _PRECONDITION_CODES:  # another writer moved it first
                return False
            raise self._fail(f"conditional write of {key}", exc) from exc
        except Exception as exc:
            raise self._fail(f"conditional write of {key}", exc) from exc
        return True

    def _conditional_put(self, key: str, data: bytes, condition: dict[str, str]) -> None:
        content_type = "application/json" if key.endswith(".json") else "application/octet-stream"
        # minio's put_object turns unknown headers into user metadata, so the PUT goes through its
        # lower-level call, which sends (and signs) the condition as is
        self.client._put_object(self.bucket, key, data, headers={**condition, "Content-Type": content_type})

    def _check_conditional_writes(self) -> None:
        """Refuse to move pointers on a server that ignores ``If-Match`` (once per store): there a
        compare-and-swap would silently be a plain overwrite. MinIO and SeaweedFS honour it."""
        if self._conditional_ok:
            return
        from minio.error import S3Error

        probe = PROBE_KEY
        self.put_bytes(probe, b"probe")
        try:
            self._conditional_put(probe, b"must not be written", {"If-Match": '"0123456789abcdef0123456789abcdef"'})
        except S3Error as exc:
            if exc.code not in _PRECONDITION_CODES:
                raise self._fail("conditional-write check", exc) from exc
            self._conditional_ok = True
        except Exception as exc:
            raise self._fail("conditional-write check", exc) from exc
        finally:
            with contextlib.suppress(Exception):
                self.delete(probe)
        if not self._conditional_ok:
            raise StorageError(f"the S3 server of {self.describe()} ignores conditional writes (If-Match), so a "
                               f"production pointer cannot be moved safely: two moves could overwrite each other. "
                               f"Use a server that honours them (MinIO since RELEASE.2024-11, SeaweedFS 4.x, AWS S3)")

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


def cluster_mode(env: Mapping[str, str] | None = None) -> str | None:
    """Why this process runs in cluster mode (where a local store is never right), or None.

    ``REDI_CLUSTER_MODE`` true/false decides when set; otherwise a Kubernetes pod (whose
    environment always holds ``KUBERNETES_SERVICE_HOST``) is in cluster mode.
    """
    env = os.environ if env is None else env
    explicit = env.get(CLUSTER_SETTING, "").strip().lower()
    if explicit in ("1", "true", "yes", "on"):
        return f"{CLUSTER_SETTING} is {env[CLUSTER_SETTING]!r}"
    if explicit in ("0", "false", "no", "off"):
        return None
    if explicit:
        raise StorageError(f"{CLUSTER_SETTING}={env[CLUSTER_SETTING]!r} is neither true nor false")
    if env.get(CLUSTER_ENV, "").strip():
        return f"{CLUSTER_ENV} is set (this runs in a Kubernetes pod)"
    return None


def store_for_command(local_root: str | Path | None = None, env: Mapping[str, str] | None = None) -> ObjectStore:
    """The store of a ``redi`` command that reads or moves production (``redi model``, the drift trigger).

    Outside a cluster: :func:`store_from_env` (S3 when ``REDI_S3_ENDPOINT`` is set, else the local
    folder). In cluster mode (:func:`cluster_mode`) the S3 settings are required: a local folder
    inside a pod would be an empty production, lost with the pod, that no service reads.
    """
    env = os.environ if env is None else env
    reason = cluster_mode(env)
    if reason and not env.get("REDI_S3_ENDPOINT", "").strip():
        raise StorageError(f"{reason}, so this runs in cluster mode, where the object store is required, and "
                           f"REDI_S3_ENDPOINT is not set (a local folder here would be a production nobody serves, "
                           f"lost with the pod). Set REDI_S3_ENDPOINT, REDI_S3_ACCESS_KEY and REDI_S3_SECRET_KEY "
                           f"(the line's store secret), or {CLUSTER_SETTING}=false to use a local folder on purpose")
    return store_from_env(env, local_root, require_remote=bool(reason))


def store_from_env(env: Mapping[str, str] | None = None, local_root: str | Path | None = None,
                   require_remote: bool = False, **s3_options: Any) -> ObjectStore:
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
                   env.get("REDI_S3_REGION"), **s3_options)
