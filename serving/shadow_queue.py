"""Shadow mode in the API service: score each answered request with the line's candidate, off the answer path.

``/predict`` answers with production alone; then it offers the request to :class:`ShadowScorer`, a
bounded queue drained by one asyncio task in the API worker. The task gathers up to ``BATCH``
queued requests (waiting ``LINGER_S`` at most for them), prepares each image for the candidate
(its own input size and aspect), asks the detector service's ``shadow_score`` for the batch,
and for each answer

- writes a row to the shadow log (``redi.ops.shadow``: ``<REDI_LOG_DIR>/shadow/<line>/<day>.jsonl``)
  with the production row's ``request_id`` and both models' decisions;
- counts ``redi_shadow_total{event="agree"|"disagree"}``;
- keeps a disagreement for review (``redi.ops.retention``, kind ``disagreement``, with both scores)
  unless production kept that image already (flagged or sampled: it is in the review queue).

Why a queue and not the same detector call: a candidate scored with production would add its
compute to every answer. Here a full queue drops the request for the candidate (counted as
``dropped``) and a candidate that fails counts ``failed``; neither ever reaches an answer.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from redi.ops.monitoring import ProductionLog
from redi.ops.retention import DISAGREEMENT, RetainedItem, Retainer

LOG = logging.getLogger("redi.serving.shadow")
BATCH = 8  # queued requests sent to the candidate in one call
# how long the consumer waits for a batch to fill: under load one call (and one round of pickling,
# answers and log rows) serves up to BATCH requests instead of one; a shadow row is late by this at most
LINGER_S = 0.25


@dataclass
class ShadowJob:
    """One answered request waiting for the candidate."""

    line: str
    candidate: dict[str, Any]  # the catalogue's entry of the candidate: model_version, image_size, input_hw, aspect
    row: dict[str, Any]  # the production row, as logged
    rgb: np.ndarray  # the decoded upload
    anomaly_map: np.ndarray  # production's map over the image's content (kept with a disagreement)
    kept: bool  # production kept this image already (it is in the review queue)

    @property
    def nbytes(self) -> int:
        return int(self.rgb.nbytes + self.anomaly_map.nbytes)


class ShadowScorer:
    """The bounded queue and its consumer (one per API worker; see the module docstring)."""

    def __init__(self, detector: Callable[[], Any], pool: Any, log: ProductionLog,
                 prepare: Callable[[np.ndarray, dict[str, Any]], np.ndarray],
                 retainer: Retainer | None, on_event: Callable[[str, str], None], max_items: int,
                 max_bytes: int) -> None:
        self.detector, self.pool, self.log, self.prepare = detector, pool, log, prepare
        self.retainer, self.on_event = retainer, on_event
        self.max_items, self.max_bytes = max_items, max_bytes
        self.queue: asyncio.Queue[ShadowJob] | None = None
        self.queued_bytes = 0
        self.counts = {"agree": 0, "disagree": 0, "dropped": 0, "failed": 0}
        self._task: asyncio.Task | None = None

    def offer(self, job: ShadowJob) -> bool:
        """Queue a job (call on the event loop); a full queue drops it, counted, and returns False."""
        if self.queue is None:
            self.queue = asyncio.Queue(maxsize=self.max_items)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="redi-shadow")
        if self.queue.full() or self.queued_bytes + job.nbytes > self.max_bytes:
            self._count("dropped", job.line)
            return False
        self.queued_bytes += job.nbytes
        self.queue.put_nowait(job)
        return True

    def status(self) -> dict[str, Any]:
        """This worker's queue and counts (``/metadata``)."""
        return {"queued": self.queue.qsize() if self.queue else 0, "queued_bytes": self.queued_bytes,
                "max_items": self.max_items, "max_bytes": self.max_bytes, **self.counts}

    def _count(self, event: str, line: str) -> None:
        self.counts[event] += 1
        self.on_event(event, line)

    async def _run(self) -> None:
        assert self.queue is not None
        while True:
            jobs = [await self.queue.get()]
            deadline = asyncio.get_running_loop().time() + LINGER_S
            while len(jobs) < BATCH:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            self.queued_bytes -= sum(job.nbytes for job in jobs)
            try:
                await self._score(jobs)
            except Exception as exc:  # the consumer outlives any failure; production never sees it
                LOG.error("shadow scoring failed for %d requests: %s", len(jobs), exc)
                for job in jobs:
                    self._count("failed", job.line)

    async def _score(self, jobs: list[ShadowJob]) -> None:
        loop = asyncio.get_running_loop()
        items = await loop.run_in_executor(self.pool, self._items, jobs)
        answers = await self.detector().to_async.shadow_score(items)
        for job, answer in zip(jobs, answers):
            if "error" in answer:
                if answer.get("status") != 404:  # 404: the candidate was turned off or replaced meanwhile
                    self._count("failed", job.line)
                    LOG.warning("line %s: shadow candidate failed: %s", job.line, answer["error"])
                continue
            row = shadow_row(job.row, answer)
            await asyncio.wrap_future(self.log.submit(row))
            self._count("agree" if row["agree"] else "disagree", job.line)
            if not row["agree"] and not job.kept and self.retainer is not None:
                self.retainer.offer(self._kept(job, row))

    def _items(self, jobs: list[ShadowJob]) -> list[dict[str, Any]]:
        """The candidate's input of each job (its own size and aspect), in the thread pool."""
        return [{"line": job.line, "version": job.candidate["model_version"], "aspect": job.candidate["aspect"],
                 "pixels": self.prepare(job.rgb, job.candidate)}
                for job in jobs]

    @staticmethod
    def _kept(job: ShadowJob, row: dict[str, Any]) -> RetainedItem:
        """The copy kept for review of a disagreement production did not keep itself."""
        production = job.row
        info = {k: production[k] for k in ("score", "threshold", "anomalous", "decision", "model_version", "model_tag",
                                           "latency_ms")}
        info.update({k: row[k] for k in ("shadow_version", "shadow_score", "shadow_threshold", "shadow_anomalous")},
                    threshold_source="model", camera=production.get("camera", ""))
        return RetainedItem(request_id=production["request_id"], line=job.line,
                            time=_dt.datetime.fromisoformat(production["time"]), kind=DISAGREEMENT, rgb=job.rgb,
                            anomaly_map=job.anomaly_map, info=info)


def shadow_row(production: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """The shadow log's row of one request: production's decision as answered beside the candidate's."""
    row = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
           **{k: production[k] for k in ("request_id", "line", "model_version", "score", "threshold", "anomalous")},
           "answered": production["time"], "shadow_version": answer["version"], "shadow_tag": answer["tag"],
           "shadow_score": answer["score"], "shadow_threshold": answer["threshold"],
           "shadow_model_threshold": answer["model_threshold"], "shadow_anomalous": bool(answer["anomalous"])}
    if production.get("camera"):
        row["camera"] = production["camera"]
    row["agree"] = row["anomalous"] == row["shadow_anomalous"]
    return row


__all__ = ["BATCH", "ShadowJob", "ShadowScorer", "shadow_row"]
