"""Answer a retried request once: the service side of a client's ``Idempotency-Key``.

A client that cannot tell whether its request was scored (the connection broke, the service was
killed after writing the production row but before answering) sends it again with the same key.
The first answer's production row carries the key (``idempotency_key``), so the index finds it
in the production log, also after a restart or from another API worker, and the service answers
from that row instead of scoring and logging the part a second time.

Bounded: the index reads only the line's day files of today and yesterday (UTC; so a key is
remembered at least 24 hours), incrementally (the bytes appended since its last look), and holds at
most ``max_keys`` keys (oldest forgotten first). Two requests with the same key at the same time in
one worker wait for each other (:meth:`IdempotencyIndex.once`); across API workers only the log
protects, so a client should not send the same key twice at once (the watcher never does).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Awaitable, Callable

from redi.core.errors import InputError
from redi.ops.monitoring import check_line_name

KEY_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{8,128}$")
REPLAY_FIELDS = ("line", "request_id", "model_version", "model_tag", "threshold", "latency_ms", "anomalous", "decision")


def check_key(key: str) -> str:
    """The key itself, or :class:`InputError` saying what a key may contain."""
    if not KEY_PATTERN.match(key):
        raise InputError(f"the Idempotency-Key header {key[:40]!r} is not 8-128 characters of letters, digits "
                         f"and . _ : - ; send e.g. a hex hash of the camera, file name, size and time")
    return key


class IdempotencyIndex:
    """Production rows that carry an ``idempotency_key``, by (line, key), read from the production log."""

    def __init__(self, log_dir: str | Path, max_keys: int = 100_000) -> None:
        self.log_dir = Path(log_dir)
        self.max_keys = max_keys
        self._rows: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._offsets: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}

    def lookup(self, line: str, key: str) -> dict[str, Any] | None:
        """The logged row of the request with this key on this line, or None (reads new log rows first)."""
        try:
            check_line_name(line)
        except InputError:
            return None  # no log of it: the request goes on to its own 404
        with self._lock:
            self._refresh(line)
            return self._rows.get((line, key))

    def remember(self, line: str, key: str, row: dict[str, Any]) -> None:
        """Note a row this worker just logged (its own log read would find it too; this saves the wait)."""
        with self._lock:
            self._put(line, key, row)

    def _put(self, line: str, key: str, row: dict[str, Any]) -> None:
        self._rows[(line, key)] = row
        self._rows.move_to_end((line, key))
        while len(self._rows) > self.max_keys:
            self._rows.popitem(last=False)

    def _refresh(self, line: str) -> None:
        today = _dt.datetime.now(_dt.timezone.utc).date()
        for day in (today - _dt.timedelta(days=1), today):
            path = self.log_dir / line / f"{day:%Y-%m-%d}.jsonl"
            try:
                size = path.stat().st_size
            except OSError:
                continue
            start = self._offsets.get(path, 0)
            if size <= start:
                continue
            with open(path, "rb") as handle:
                handle.seek(start)
                data = handle.read(size - start)
            end = data.rfind(b"\n") + 1  # a row still being written is read next time, whole
            self._offsets[path] = start + end
            for raw in data[:end].splitlines():
                if b"idempotency_key" not in raw:
                    continue
                try:
                    row = json.loads(raw)
                except ValueError:  # a crashed write's fragment: never acknowledged
                    continue
                if isinstance(row, dict) and row.get("idempotency_key"):
                    self._put(line, str(row["idempotency_key"]), row)

    async def once(self, line: str, key: str, score: Callable[[], Awaitable[Any]],
                   lookup: Callable[[], Awaitable[dict[str, Any] | None]]) -> Any:
        """``score()`` unless this key was answered (``lookup()`` finds its row: its replay is returned)
        or is being answered in this worker right now (its answer is awaited and returned)."""
        while (line, key) in self._inflight:
            try:
                return replay_body(await asyncio.shield(self._inflight[(line, key)]))
            except Exception:  # noqa: BLE001 - the first try failed: this one scores
                continue
        row = await lookup()
        if row is not None:
            return replay_body(row)
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[(line, key)] = done
        try:
            answer = await score()
            done.set_result(answer)
            return answer
        except BaseException as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            del self._inflight[(line, key)]


def replay_body(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer to a repeated key: the first answer's decision (from its body or its production row),
    marked ``replayed`` (no new row was logged, no image kept again)."""
    if "anomaly_score" in answer:  # a body that is still in memory
        return {**answer, "replayed": True}
    body = {k: answer[k] for k in REPLAY_FIELDS if k in answer}
    body.update(anomaly_score=answer.get("score"), idempotency_key=answer.get("idempotency_key"),
                image_size={"width": answer.get("width"), "height": answer.get("height")}, replayed=True)
    return body
