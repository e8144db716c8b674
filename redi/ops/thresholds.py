"""Per-line threshold overrides: a new decision threshold without a retrain, recorded with who, when, why.

Stored next to the line's production pointer (``redi.ops.model_registry``)::

    lines/<line>/threshold_override.json               the override in force (``value`` null: cleared)
    lines/<line>/threshold_overrides/<time>.json       one audit record per change, written FIRST

An override belongs to one model version (``model_version``, default: the production version when
it is set): anomaly scores of different models are not on one scale, so a threshold chosen for
one model must not silently apply to the next. The service applies the override while it serves
that version and shows it in ``/metadata`` (``threshold_override``), with ``active: false`` once
another version is served.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

from redi.ops.object_store import ObjectStore, StorageError
from redi.ops.model_registry import actor, line_prefix, production_record

OVERRIDE_NAME = "threshold_override.json"


def override_key(line: str) -> str:
    """``lines/<line>/threshold_override.json``."""
    return f"{line_prefix(line)}/{OVERRIDE_NAME}"


def threshold_override(store: ObjectStore, line: str) -> dict[str, Any] | None:
    """The override record in force, or None (none set, or cleared)."""
    record = store.get_json(override_key(line))
    return record if record and record.get("value") is not None else None


def effective_threshold(model_threshold: float, model_version: str, override: dict[str, Any] | None) -> float:
    """The threshold to decide with: the override when it was set for this model version."""
    if override and override.get("value") is not None and str(override.get("model_version")) == model_version:
        return float(override["value"])
    return float(model_threshold)


def set_threshold_override(store: ObjectStore, line: str, value: float | None, reason: str, by: str = "",
                           model_version: str = "") -> dict[str, Any]:
    """Write an override (``value`` None clears it): the audit record first, then the override.

    Raises:
        StorageError: no reason, a non-positive or non-finite value, or no production model to
            attach the override to.
    """
    if not reason.strip():
        raise StorageError("a threshold override needs a reason (--reason): it is recorded for the audit")
    if value is not None and not (math.isfinite(value) and value > 0):
        raise StorageError(f"threshold {value} is not a positive finite number")
    if not model_version:
        pointer = production_record(store, line)
        if pointer is None:
            raise StorageError(f"line {line!r} has no production model in {store!r}; an override belongs to a "
                               f"model version: promote one first or pass --version")
        model_version = str(pointer["version"])
    previous = store.get_json(override_key(line))
    now = _dt.datetime.now(_dt.timezone.utc)
    record = {"line": line, "value": value, "model_version": model_version, "reason": reason.strip(),
              "by": by or actor(), "at": now.isoformat(timespec="seconds"),
              "previous_value": previous.get("value") if previous else None}
    store.put_json(f"{line_prefix(line)}/threshold_overrides/{now.strftime('%Y%m%dT%H%M%S%f')}.json", record)
    store.put_json(override_key(line), record)
    return record


def override_history(store: ObjectStore, line: str) -> list[dict[str, Any]]:
    """Every override change of a line, oldest first."""
    prefix = f"{line_prefix(line)}/threshold_overrides/"
    return [r for key in store.list(prefix) if key.endswith(".json") if (r := store.get_json(key)) is not None]


__all__ = ["OVERRIDE_NAME", "effective_threshold", "override_history", "override_key", "set_threshold_override",
           "threshold_override"]
