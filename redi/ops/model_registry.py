"""The model registry: each product line's versions, production pointer and promotion records.

It keeps them in an :class:`~redi.ops.object_store.ObjectStore`. Layout (keys are ``/``-separated,
the same in both stores)::

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
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from redi.core.utils import sha256_file
from redi.ops.object_store import ObjectStore, StorageError

INDEX_NAME = "index.json"
POINTER_NAME = "production.json"


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
