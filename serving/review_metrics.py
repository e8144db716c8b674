"""The plant's Prometheus metrics, served on BentoML's own ``/metrics`` next to BentoML's.

BentoML runs ``prometheus_client`` in multiprocess mode: each worker process gets
``PROMETHEUS_MULTIPROC_DIR`` in its environment and ``/metrics`` merges every worker's files
(``MultiProcessCollector``). ``bentoml.metrics`` is deprecated in 1.4 in favour of
``prometheus_client`` itself, imported only after that variable is set, so the import happens
here, when the service instance is created inside the worker, never at module import.

Per line (label ``line``):

===================================  =========  ==========================================================
``redi_requests_total``              counter    answered ``/predict`` requests, label ``decision`` (normal /
                                                anomalous): flagged share = anomalous / all
``redi_decisions_total``             counter    the same requests, also labelled with what decided them:
                                                ``model_version``, ``threshold`` (the value, as ``/predict``
                                                answers it) and ``threshold_source`` (model / override)
``redi_anomaly_score``               histogram  image anomaly scores
``redi_score_to_threshold``          histogram  score / threshold (1 = at the threshold; comparable across models)
``redi_request_latency_seconds``     histogram  time to answer ``/predict`` (decode, batch, response)
``redi_model_info``                  gauge      1 for the served ``version``, 0 for one no longer served
``redi_threshold``                   gauge      the decision threshold in force (override included)
``redi_retention_total``             counter    kept-image events, label ``event``: stored, dropped (queue
                                                full), failed (upload error), deleted (retention limits)
``redi_shadow_total``                counter    shadow mode (docs/serving.md): requests the line's candidate
                                                scored, label ``event``: ``agree``, ``disagree``, ``dropped``
                                                (its queue was full: not scored, production unaffected),
                                                ``failed`` (it could not score: production unaffected)
===================================  =========  ==========================================================
"""

from __future__ import annotations

import threading
from typing import Any

SCORE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DECISIONS = ("normal", "anomalous")


def threshold_label(threshold: float) -> str:
    """The threshold as a label value: Python's shortest round-trip form, the digits ``/predict``'s
    JSON and ``redi_threshold`` show, so a dashboard can match them exactly."""
    return repr(float(threshold))


class PlantMetrics:
    """The metric objects; one per process (``prometheus_client`` registers each name once)."""

    _instance: "PlantMetrics | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        import prometheus_client as prom  # after BentoML set PROMETHEUS_MULTIPROC_DIR (see the docstring)

        self.requests = prom.Counter("redi_requests_total", "Answered /predict requests", ["line", "decision"])
        # A flag rate means nothing without the threshold it was made at, and a rate over a window
        # that spans an override mixes two. So the decisions are also counted per threshold, with the
        # threshold's value as a label. Prometheus advises against float labels because an unbounded
        # set of values makes unbounded series; this one is bounded: it changes only when a model is
        # promoted or someone sets an audited override (a handful a month), and each change adds two
        # series per line. The gauge redi_threshold alone could not do it: joining it to a rate needs
        # a window in which the threshold did not move, which a dashboard cannot know.
        self.decisions = prom.Counter("redi_decisions_total", "Answered /predict requests by the threshold that "
                                      "decided them", ["line", "model_version", "threshold", "threshold_source",
                                                       "decision"])
        self.score = prom.Histogram("redi_anomaly_score", "Image anomaly scores", ["line"], buckets=SCORE_BUCKETS)
        self.ratio = prom.Histogram("redi_score_to_threshold", "Anomaly score divided by the threshold", ["line"],
                                    buckets=RATIO_BUCKETS)
        self.latency = prom.Histogram("redi_request_latency_seconds", "Time to answer /predict", ["line"],
                                      buckets=LATENCY_BUCKETS)
        # livemostrecent: the latest value written by a live worker (workers agree after a reload)
        self.model = prom.Gauge("redi_model_info", "1 for the model version a line serves", ["line", "version"],
                                multiprocess_mode="livemostrecent")
        self.threshold = prom.Gauge("redi_threshold", "Decision threshold in force", ["line"],
                                    multiprocess_mode="livemostrecent")
        self.retention = prom.Counter("redi_retention_total", "Kept-image events", ["line", "event"])
        self.shadow = prom.Counter("redi_shadow_total", "Shadow candidate events (scored agree/disagree, dropped, "
                                   "failed)", ["line", "event"])
        self._served: dict[str, str] = {}

    @classmethod
    def get(cls) -> "PlantMetrics":
        """The process's metrics (created on first use)."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = PlantMetrics()
            return cls._instance

    def observe(self, line: str, decision: str, score: float, threshold: float, latency_s: float,
                model_version: str = "", source: str = "model") -> None:
        """Count one answered request (``source``: where its threshold came from, model or override)."""
        self.requests.labels(line, decision).inc()
        self._decision_series(line, model_version, threshold, source)[decision].inc()
        self.score.labels(line).observe(score)
        if threshold > 0:
            self.ratio.labels(line).observe(score / threshold)
        self.latency.labels(line).observe(latency_s)

    def _decision_series(self, line: str, version: str, threshold: float, source: str) -> dict[str, Any]:
        """Both decision series of one threshold; created together at 0, so ``rate()`` sees the first
        flagged part too (a counter that appears at 1 loses its first increment in PromQL)."""
        labels = (line, version, threshold_label(threshold), source)
        return {decision: self.decisions.labels(*labels, decision) for decision in DECISIONS}

    def serving(self, line: str, version: str, threshold: float, source: str = "model") -> None:
        """Record what a line serves now (after start, a reload or an override)."""
        previous = self._served.get(line)
        if previous is not None and previous != version:
            self.model.labels(line, previous).set(0)
        self._served[line] = version
        self.model.labels(line, version).set(1)
        self.threshold.labels(line).set(threshold)
        self._decision_series(line, version, threshold, source)
        for decision in DECISIONS:  # the flag-rate ratio needs both series from the start, at 0
            self.requests.labels(line, decision)

    def retention_event(self, event: str, line: str) -> None:
        """Count a retention event (stored, dropped, failed, deleted)."""
        self.retention.labels(line, event).inc()

    def shadow_event(self, event: str, line: str) -> None:
        """Count one shadow event (agree, disagree, dropped, failed)."""
        self.shadow.labels(line, event).inc()


def metric_value(text: str, name: str, **labels: Any) -> float | None:
    """The value of one sample in Prometheus text output (for checks and tests), or None."""
    for row in text.splitlines():
        if not row.startswith(name + "{") and not row.startswith(name + " "):
            continue
        head, _, value = row.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None
