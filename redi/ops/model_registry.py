"""The model registry: each product line's versions, production pointer and promotion records.

It keeps them in an :class:`~redi.ops.object_store.ObjectStore`. Layout (keys are ``/``-separated,
the same in both stores)::

    lines/<line>/versions/<version>/<file>      every artifact of a candidate model
    lines/<line>/versions/<version>/index.json  written LAST: the list of files, sizes and sha256
    lines/<line>/promotions/<time>-<version>-<id>.json  one record per move or conflict (audit trail)
    lines/<line>/production.json                the production pointer, moved LAST of all
    lines/<line>/shadow.json                    the shadow pointer: the candidate scored beside production
    lines/<line>/shadow-moves/<time>-<version>-<id>.json  one audit record per shadow move

Why this order is safe: a version counts as complete only once its ``index.json`` exists, and
:func:`promote` refuses a version whose index is missing or whose files do not match it. Each
object write is atomic (S3 PUT; ``os.replace`` on disk), so an upload interrupted at any point
leaves ``production.json`` naming the previous, complete version; rerunning the upload finishes
the new version (files are written again, nothing is deleted).

The pointer moves only by compare-and-swap (:func:`move_production`): a move writes the pointer
only if it is still the one the mover read (S3 ``If-Match`` / ``If-None-Match``; ``os.replace``
under an ``fcntl`` lock on disk). A mover that loses re-reads the pointer and decides again, and
both the lost attempt and the re-decision are audit records (``outcome: conflict``).

The shadow pointer (:func:`move_shadow`) names a candidate the service scores beside production
on live traffic without answering with it (docs/serving.md, "Shadow mode"). It moves by the same
compare-and-swap, only to a version that passes :func:`check_promotable`, and each move is audited
in its own folder (so shadow moves never count as earlier production models for a rollback).
"""
from __future__ import annotations

import datetime as _dt
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from redi.core.utils import sha256_file
from redi.ops.object_store import ObjectStore, StorageError

INDEX_NAME = "index.json"
POINTER_NAME = "production.json"
SHADOW_NAME = "shadow.json"


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
    return store.get_json(pointer_key(line))


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


# -- moving the production pointer: a compare-and-swap ------------------------------------------
MAX_MOVE_ATTEMPTS = 5
_ANY = object()  # "the caller's decision did not depend on which pointer it saw"


class PointerConflict(StorageError):
    """The production pointer kept moving under this move (or moved so that it no longer applies)."""


def pointer_key(line: str) -> str:
    """``lines/<line>/production.json``."""
    return f"{line_prefix(line)}/{POINTER_NAME}"


def production_record_versioned(store: ObjectStore, line: str) -> tuple[dict[str, Any] | None, str | None]:
    """The line's production pointer and its version tag (for a compare-and-swap), or ``(None, None)``."""
    return store.get_json_versioned(pointer_key(line))


def same_pointer(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two reads saw the same pointer move (not merely the same version: A, B, A differs)."""
    if a is None or b is None:
        return a is None and b is None
    return all(a.get(k) == b.get(k) for k in ("version", "move_id", "promoted", "action", "by"))


def _record_key(line: str, version: str, when: _dt.datetime) -> str:
    """An audit record's key: sorted by time; unique even for two writers in the same microsecond."""
    return (f"{line_prefix(line)}/promotions/{when.strftime('%Y%m%dT%H%M%S%f')}-{version or 'none'}-"
            f"{uuid.uuid4().hex[:8]}.json")


def _moved_by(pointer: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a conflict record says of the pointer another writer left."""
    if pointer is None:
        return {"version": None}
    return {k: pointer.get(k) for k in ("version", "action", "by", "promoted", "move_id")}


def record_conflict(store: ObjectStore, line: str, *, action: str, version: str | None, by: str,
                    expected: Mapping[str, Any] | None, found: Mapping[str, Any] | None, stage: str,
                    outcome: str) -> dict[str, Any]:
    """Write an audit record of a pointer conflict: who meant to move it where, what it found, what followed.

    ``stage``: ``read`` (the pointer changed while the mover decided, e.g. during the gate's
    evaluation) or ``write`` (the compare-and-swap lost to another writer).
    """
    now = _dt.datetime.now(_dt.timezone.utc)
    record = {"line": line, "version": version, "action": action, "by": by or actor(),
              "promoted": now.isoformat(timespec="seconds"), "outcome": "conflict",
              "conflict": {"stage": stage, "expected": _moved_by(expected), "found": _moved_by(found),
                           "then": outcome}}
    store.put_json(_record_key(line, f"conflict-{version or 'none'}", now), record)
    return record


def move_production(store: ObjectStore, line: str, propose: Callable[[dict[str, Any] | None], dict[str, Any] | None],
                    *, action: str, by: str = "", version_hint: str | None = None, based_on: Any = _ANY,
                    attempts: int = MAX_MOVE_ATTEMPTS) -> dict[str, Any] | None:
    """Move the line's production pointer with a compare-and-swap; re-read and re-decide on every conflict.

    Each attempt reads the pointer (and its tag), asks ``propose(current)`` for the new pointer (its
    fields; None: no move is needed any more), writes the audit record, then writes the pointer only
    if it is still the one read (:meth:`ObjectStore.put_bytes_if`). A lost race is recorded
    (``outcome: conflict``) and the next attempt decides again on what it now reads, so a move is
    never applied twice, never records a stale ``previous_version``, and never silently overwrites
    another writer's move.

    Args:
        propose: the decision; may raise (e.g. :class:`PointerConflict` when the move no longer applies).
        based_on: the pointer the caller's decision was made on (the gate's evaluated production);
            when the pointer read first differs, that is recorded as a conflict before ``propose``
            decides again.
        version_hint: the intended version, for conflict records.

    Returns:
        the pointer written, or None when ``propose`` decided no move was needed.

    Raises:
        PointerConflict: ``attempts`` compare-and-swaps in a row lost to other writers.
    """
    key = pointer_key(line)
    for _ in range(attempts):
        current, tag = store.get_json_versioned(key)
        if based_on is not _ANY and not same_pointer(current, based_on):
            record_conflict(store, line, action=action, version=version_hint, by=by, expected=based_on,
                            found=current, stage="read", outcome="decided again on the pointer found")
            based_on = _ANY
        proposal = propose(current)
        if proposal is None:
            return None
        now = _dt.datetime.now(_dt.timezone.utc)
        pointer = {**proposal, "promoted": now.isoformat(timespec="seconds"), "action": action,
                   "by": by or actor(), "move_id": uuid.uuid4().hex,
                   "previous_version": current.get("version") if current else None,
                   "previous_move_id": current.get("move_id") if current else None}
        record_key = _record_key(line, pointer["version"], now)
        # the audit record is written before the switch: no production change without its record
        store.put_json(record_key, {**pointer, "outcome": "intended"})
        if store.put_json_if(key, pointer, tag):  # the single atomic switch, only over what was read
            store.put_json(record_key, {**pointer, "outcome": "applied"})
            return pointer
        found = production_record(store, line)
        store.put_json(record_key, {**pointer, "outcome": "conflict",
                                    "conflict": {"stage": "write", "expected": _moved_by(current),
                                                 "found": _moved_by(found), "then": "read again and decided again"}})
    raise PointerConflict(f"the production pointer of line {line!r} in {store.describe()} moved under {attempts} "
                          f"attempts in a row to {action} it; nothing was changed by this command. See `redi model "
                          f"history --line {line}` and retry")


def _pointer_fields(store: ObjectStore, line: str, version: str, index: Mapping[str, Any],
                    record: Mapping[str, Any] | None, reason: str) -> dict[str, Any]:
    names = {entry["name"]: entry["key"] for entry in index["files"]}
    return {**dict(record or {}),  # extra fields first: they never override the pointer's own
            "line": line, "version": version, "index": version_key(line, version, INDEX_NAME),
            "detector": names.get("detector.pt"), "sha256": detector_sha256(index), "files": names,
            "reason": reason}


def promote(store: ObjectStore, line: str, version: str, record: Mapping[str, Any] | None = None, *,
            action: str = "promote", by: str = "", reason: str = "", verify_hash: bool = True) -> dict[str, Any]:
    """Point the line's production at ``version``: check it, write the audit record, move the pointer last.

    The move is a compare-and-swap (:func:`move_production`): when another writer moves the pointer
    at the same time, this one re-reads it and moves from what it finds (its ``previous_version`` is
    then the other writer's version). When ``version`` is already in production (a rerun, or
    another writer's identical move), nothing is written and the pointer in force is returned.

    Args:
        record: extra fields kept in the pointer (metrics, gate reasons, ...).
        action: ``promote`` or ``rollback`` (recorded).
        by, reason: who acts and why (recorded; ``by`` defaults to :func:`actor`).
        verify_hash: download the detector and compare its sha256 with the index (see
            :func:`check_promotable`).

    Returns:
        the pointer in force (``version``, ``detector`` key, ``sha256``, ``promoted``, ``by``,
        ``reason``, ``previous_version``, ``move_id``, ...).
    """
    index = check_promotable(store, line, version, verify_hash)
    fields = _pointer_fields(store, line, version, index, record, reason)

    def propose(current: dict[str, Any] | None) -> dict[str, Any] | None:
        # already there (a rerun, or another writer's identical move won the race): nothing to record
        return None if current is not None and current.get("version") == version else fields

    moved = move_production(store, line, propose, action=action, by=by, version_hint=version)
    return moved if moved is not None else dict(production_record(store, line) or {})


def promotion_history(store: ObjectStore, line: str, include_conflicts: bool = True) -> list[dict[str, Any]]:
    """Every promotion and rollback of a line (the audit records), oldest first.

    Records of moves that lost a race or were decided again (``outcome: conflict``) are part of the
    audit trail; ``include_conflicts=False`` leaves them out (the moves that may have happened).
    """
    prefix = f"{line_prefix(line)}/promotions/"
    records = [record for key in store.list(prefix) if key.endswith(".json")
               if (record := store.get_json(key)) is not None]
    return records if include_conflicts else [r for r in records if r.get("outcome") != "conflict"]


def rollback(store: ObjectStore, line: str, version: str | None = None, *, by: str = "",
             reason: str = "") -> dict[str, Any]:
    """Put back an earlier production model: ``version``, or the one served before the current one.

    The target goes through the same checks as a promotion (:func:`check_promotable`). The move is
    a compare-and-swap: without ``version`` the rollback undoes the production model it read first;
    when another writer replaced that model meanwhile, the rollback no longer applies and raises
    :class:`PointerConflict` (recorded) rather than rolling back a model nobody meant to.
    """
    current = production_record(store, line)
    if current is None:
        raise StorageError(f"line {line!r} has no production model in {store.describe()}: nothing to roll back")
    undoing = current
    if version is None:
        earlier = [r["version"] for r in promotion_history(store, line, include_conflicts=False)
                   if r.get("version") != current["version"]]
        if not earlier:
            raise StorageError(f"line {line!r} has had no production model other than {current['version']}: "
                               f"nothing to roll back to; name a version with --version")
        target, explicit = earlier[-1], False
    else:
        target, explicit = version, True
    if target == current["version"]:
        raise StorageError(f"version {target} is already line {line!r}'s production model")
    index = check_promotable(store, line, target)
    metrics = ((index.get("info") or {}).get("metrics")) or {}
    fields = _pointer_fields(store, line, target, index, {"metrics": metrics}, reason)

    def propose(now: dict[str, Any] | None) -> dict[str, Any] | None:
        if same_pointer(now, undoing):
            return fields
        found = (now or {}).get("version")
        if explicit and found != target:
            return fields  # "put <version> back" still means the same whatever was there
        outcome = ("nothing rolled back: " + (f"{target} is already production" if found == target else
                   f"production moved from {undoing['version']} to {found} meanwhile"))
        record_conflict(store, line, action="rollback", version=target, by=by, expected=undoing, found=now,
                        stage="read", outcome=outcome)
        if found == target:
            return None
        raise PointerConflict(f"line {line!r}: {outcome} (by {(now or {}).get('by')}); the rollback of "
                              f"{undoing['version']} no longer applies. Check `redi model history --line {line}` "
                              f"and name the version to put back with --version")

    moved = move_production(store, line, propose, action="rollback", by=by, version_hint=target)
    return moved if moved is not None else dict(production_record(store, line) or {})


# -- the shadow pointer: a candidate scored beside production -----------------------------------
def shadow_key(line: str) -> str:
    """``lines/<line>/shadow.json``."""
    return f"{line_prefix(line)}/{SHADOW_NAME}"


def shadow_record(store: ObjectStore, line: str) -> dict[str, Any] | None:
    """The line's shadow pointer when a candidate is in shadow (``version`` set), else None."""
    pointer = store.get_json(shadow_key(line))
    return pointer if pointer and pointer.get("version") else None


def move_shadow(store: ObjectStore, line: str, version: str | None, *, by: str = "", reason: str = "",
                verify_hash: bool = True, attempts: int = MAX_MOVE_ATTEMPTS) -> dict[str, Any]:
    """Put ``version`` in shadow on the line (None: turn the shadow off); compare-and-swap, audited.

    The candidate must pass :func:`check_promotable` (complete, gate-passed, detector hash) and must
    not be the production model. Turning the shadow off writes a pointer with ``version: null``
    (a compare-and-swap needs an object to swap). Each attempt writes an audit record under
    ``shadow-moves/`` (``intended``, then ``applied`` or ``conflict``) before and after the switch.

    Returns:
        the shadow pointer in force (``version`` None when off).

    Raises:
        StorageError: the version cannot be shadowed (the message says why).
        PointerConflict: ``attempts`` compare-and-swaps in a row lost to other writers.
    """
    fields: dict[str, Any] = {"line": line, "version": None, "reason": reason}
    if version is not None:
        production = production_record(store, line)
        if production is not None and production.get("version") == version:
            raise StorageError(f"version {version} is line {line!r}'s production model already; shadow a candidate")
        fields = _pointer_fields(store, line, version, check_promotable(store, line, version, verify_hash), None,
                                 reason)
    key = shadow_key(line)
    for _ in range(attempts):
        current, tag = store.get_json_versioned(key)
        if (current or {}).get("version") == version:
            return dict(current or {"line": line, "version": None})  # already so: nothing to record
        now = _dt.datetime.now(_dt.timezone.utc)
        pointer = {**fields, "since": now.isoformat(timespec="seconds"), "action": "shadow" if version else
                   "shadow-off", "by": by or actor(), "move_id": uuid.uuid4().hex,
                   "previous_version": (current or {}).get("version")}
        record_key = (f"{line_prefix(line)}/shadow-moves/{now.strftime('%Y%m%dT%H%M%S%f')}-{version or 'off'}-"
                      f"{uuid.uuid4().hex[:8]}.json")
        store.put_json(record_key, {**pointer, "outcome": "intended"})
        if store.put_json_if(key, pointer, tag):
            store.put_json(record_key, {**pointer, "outcome": "applied"})
            return pointer
        store.put_json(record_key, {**pointer, "outcome": "conflict"})
    raise PointerConflict(f"the shadow pointer of line {line!r} in {store.describe()} moved under {attempts} attempts "
                          f"in a row; nothing was changed. See `redi model shadow-report --line {line}` and retry")


def shadow_history(store: ObjectStore, line: str) -> list[dict[str, Any]]:
    """Every shadow move of a line (audit records, conflicts included), oldest first."""
    prefix = f"{line_prefix(line)}/shadow-moves/"
    return [record for key in store.list(prefix) if key.endswith(".json")
            if (record := store.get_json(key)) is not None]


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
    return None if pointer is None else (fetch_pointer_detector(store, line, pointer, dest), pointer)


def fetch_pointer_detector(store: ObjectStore, line: str, pointer: Mapping[str, Any], dest: str | Path) -> Path:
    """Download the detector a production pointer (as read earlier) names, checking its sha256."""
    if not pointer.get("detector"):
        raise StorageError(f"the production pointer of line {line!r} names no detector.pt; promote a version again")
    path = fetch_file(store, pointer["detector"], dest)
    expected = pointer.get("sha256")
    if expected and sha256_file(path) != expected:
        path.unlink()
        raise StorageError(f"{store.uri(pointer['detector'])} (production of line {line!r}, version "
                           f"{pointer['version']}) does not have the sha256 recorded at promotion; it was "
                           f"changed after promotion. Promote or roll back to a verified version")
    return path


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
