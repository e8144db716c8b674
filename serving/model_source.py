"""Where the service's detectors come from. One rule: a line serves its production pointer's version.

Two sources, both resolving to the version the gate (or ``redi model promote|rollback``) chose:

- ``store``: the object store's production pointers (``redi.ops.model_registry``: S3/MinIO via ``REDI_S3_*``,
  or a local folder via ``REDI_STORE_DIR``). Each detector is downloaded to a cache folder, its
  sha256 checked against the one recorded at promotion, and loaded. The service polls the
  pointers (and ``/admin/reload`` asks at once), so a promotion or rollback takes effect on the
  running service without a restart. For a service that follows production live.
- ``bento``: the models pinned in a built Bento (``redi.ops.packaging.build_production_bento`` puts
  each line's production version into the Bento through BentoML's own model references). The
  Bento is self-contained (``bentoml containerize``); what it serves changes only with a new
  Bento built from the moved pointers. For deployment targets that take a Bento.

When the store cannot be reached at start, ``store`` serves the last production model fetched for
each line (``StoreModels.cached``: the model cache remembers it with its pointer record, and the
file's sha256 is checked again) and the detector service reports itself degraded until it answers.

``auto`` picks ``bento`` when the service runs from a built Bento, else ``store`` when a store is
configured, and otherwise stops with a message naming the settings.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redi.core.errors import WeightsError
from redi.ops.object_store import ObjectStore, StorageError, store_from_env
from redi.ops.model_registry import (fetch_pointer_detector, fetch_production_detector, production_lines,
                                     production_record, shadow_record)
from redi.core.utils import sha256_file

SOURCES = ("auto", "store", "bento")
LOG = logging.getLogger("redi.serving.models")
MODEL_LABEL = {"redi": "detector"}


@dataclass(frozen=True)
class ModelRef:
    """One line's production model, resolved to a file whose hash was checked."""

    line: str
    version: str
    path: Path
    sha256: str
    source: str  # "store", "bento", "cache" (the last fetched from the store, served while it is unreachable)
    # or "shadow" (a candidate scored beside production, never answering: docs/serving.md, "Shadow mode")
    tag: str  # BentoML model tag (bento) or the store's version key (store)
    metrics: dict[str, Any]
    promoted: str = ""
    promoted_by: str = ""


def choose_source(requested: str, running_bento: Any, env: dict[str, str] | None = None) -> str:
    """The source to use for ``REDI_MODEL_SOURCE=requested`` (see the module docstring)."""
    env = dict(os.environ) if env is None else env
    if requested not in SOURCES:
        raise WeightsError(f"REDI_MODEL_SOURCE={requested!r} is not one of {SOURCES}")
    if requested != "auto":
        return requested
    if running_bento is not None:
        return "bento"
    if env.get("REDI_S3_ENDPOINT", "").strip() or env.get("REDI_STORE_DIR", "").strip():
        return "store"
    raise WeightsError("the service has no model source: set REDI_S3_ENDPOINT, REDI_S3_ACCESS_KEY and "
                       "REDI_S3_SECRET_KEY (the object store whose production pointers decide what each line "
                       "serves), or REDI_STORE_DIR (a local store, e.g. runs/pipeline/store after `make demo`), "
                       "or serve a built Bento (`bentoml serve redi:latest`)")


class StoreModels:
    """Production models from an object store, cached on disk by line and version.

    The cache also remembers, per line, the last production model fetched (``<line>/current.json``:
    the pointer record it came with), so that a service started while the store is unreachable
    serves those (:meth:`cached`) instead of nothing.
    """

    def __init__(self, store: ObjectStore, cache_dir: Path, lines: list[str] | None = None) -> None:
        self.store, self.cache_dir, self.fixed_lines = store, Path(cache_dir), list(lines or [])

    @classmethod
    def from_env(cls, cache_dir: Path, lines: list[str] | None = None,
                 store: ObjectStore | None = None) -> "StoreModels":
        """The store of ``REDI_S3_*`` / ``REDI_STORE_DIR`` (S3 when an endpoint is set), or ``store``."""
        return cls(store or store_from_env(), cache_dir, lines)

    def lines(self) -> list[str]:
        """The lines to serve: ``REDI_LINES`` when given, else every line with a production pointer."""
        lines = self.fixed_lines or production_lines(self.store)
        if not lines:
            raise WeightsError(f"{self.store!r} holds no production model for any line; run a line's pipeline "
                               f"(`redi pipeline run --line L`) or promote a version (`redi model promote`)")
        return lines

    def production_version(self, line: str) -> str | None:
        """The version the line's pointer names now (one small read: what the poll checks)."""
        pointer = production_record(self.store, line)
        return None if pointer is None else str(pointer["version"])

    def resolve(self, line: str) -> ModelRef:
        """Download (or reuse from the cache) the line's production detector, hash checked."""
        pointer = production_record(self.store, line)
        if pointer is None:
            raise WeightsError(f"line {line!r} has no production model in {self.store!r}; promote one "
                               f"(`redi model promote --line {line} ...`) or fix REDI_LINES")
        version = str(pointer["version"])
        cached = self.cache_dir / line / version / "detector.pt"
        expected = pointer.get("sha256") or ""
        if not (cached.is_file() and expected and sha256_file(cached) == expected):
            cached.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
                fetched = fetch_production_detector(self.store, line, Path(tmp) / "detector.pt")
                if fetched is None:  # the pointer vanished between the two reads
                    raise WeightsError(f"line {line!r} lost its production pointer while loading; retry")
                path, pointer = fetched
                os.replace(path, cached)  # the cache only ever holds verified files
            version = str(pointer["version"])
        ref = _ref_from_pointer(line, pointer, cached, "store")
        self._remember(ref, pointer)
        return ref

    def shadow_version(self, line: str) -> str | None:
        """The version the line's shadow pointer names now, or None (no candidate in shadow)."""
        pointer = shadow_record(self.store, line)
        return None if pointer is None else str(pointer["version"])

    def resolve_shadow(self, line: str) -> ModelRef | None:
        """Download (or reuse from the cache) the line's shadow candidate, hash checked; None when there is none.

        The same cache layout as production (``<line>/<version>/detector.pt``, verified files only),
        but never remembered as the line's production model (``current.json``).
        """
        pointer = shadow_record(self.store, line)
        if pointer is None:
            return None
        cached = self.cache_dir / line / str(pointer["version"]) / "detector.pt"
        expected = pointer.get("sha256") or ""
        if not (cached.is_file() and expected and sha256_file(cached) == expected):
            cached.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
                os.replace(fetch_pointer_detector(self.store, line, pointer, Path(tmp) / "detector.pt"), cached)
        return _ref_from_pointer(line, {**pointer, "promoted": pointer.get("since", "")}, cached, "shadow")

    def _remember(self, ref: ModelRef, pointer: dict[str, Any]) -> None:
        """Record ``ref`` as the line's last fetched production model (atomically)."""
        record = {"pointer": {**pointer, "sha256": ref.sha256}, "path": str(ref.path.relative_to(self.cache_dir))}
        target = self.cache_dir / ref.line / "current.json"
        tmp = target.with_name(f".current.{os.getpid()}.json")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, target)

    def cached(self) -> list[ModelRef]:
        """The last production model fetched for each line (``REDI_LINES`` when given), hash checked.

        What a service started during a store outage serves; a line whose cached file is gone or
        altered is left out (with a log line), never served unchecked.
        """
        refs = []
        for record_file in sorted(self.cache_dir.glob("*/current.json")):
            line = record_file.parent.name
            if self.fixed_lines and line not in self.fixed_lines:
                continue
            try:
                record = json.loads(record_file.read_text())
                path = self.cache_dir / record["path"]
                pointer = record["pointer"]
                if not path.is_file() or sha256_file(path) != pointer["sha256"]:
                    raise WeightsError(f"{path} is missing or does not match its recorded sha256")
            except (OSError, ValueError, KeyError, WeightsError) as exc:
                LOG.error("line %s: the cached production model cannot be used: %s", line, exc)
                continue
            refs.append(_ref_from_pointer(line, pointer, path, "cache"))
        return refs


def _ref_from_pointer(line: str, pointer: dict[str, Any], path: Path, source: str) -> ModelRef:
    return ModelRef(line=line, version=str(pointer["version"]), path=path, sha256=sha256_file(path), source=source,
                    tag=str(pointer.get("detector")), metrics=dict(pointer.get("metrics") or {}),
                    promoted=str(pointer.get("promoted", "")), promoted_by=str(pointer.get("by", "")))


def bento_models(bento: Any) -> list[ModelRef]:
    """The detectors pinned in the running Bento, one per line, hash checked."""
    import bentoml

    refs = []
    for info in bento.info.all_models:
        model = bentoml.models.get(info.tag)
        labels = model.info.labels or {}
        if any(labels.get(k) != v for k, v in MODEL_LABEL.items()):
            continue
        meta = dict(model.info.metadata or {})
        path = Path(model.path_of("detector.pt"))
        digest = sha256_file(path)
        if meta.get("sha256") and meta["sha256"] != digest:
            raise WeightsError(f"model {info.tag} in the Bento has sha256 {digest[:12]}..., not the "
                               f"{str(meta['sha256'])[:12]}... recorded when it was packaged; rebuild the Bento")
        metrics = meta.get("metrics") or {}
        refs.append(ModelRef(line=str(labels.get("line")), version=str(meta.get("model_version") or info.tag.version),
                             path=path, sha256=digest, source="bento", tag=str(info.tag),
                             metrics=json.loads(metrics) if isinstance(metrics, str) else dict(metrics),
                             promoted=str(meta.get("promoted", "")), promoted_by=str(meta.get("promoted_by", ""))))
    if not refs:
        raise WeightsError(f"the Bento {bento.tag} pins no redi detector; build it with "
                           f"`redi bento build` (redi.ops.packaging.build_production_bento)")
    return refs


__all__ = ["ModelRef", "SOURCES", "StoreModels", "StorageError", "bento_models", "choose_source"]
