"""The drift check of one line on its own schedule: a one-step KFP pipeline, or a Kubernetes CronJob.

Every serving host ships its production rows to the object store (``redi.ops.log_shipping``); the
drift check reads all of them, compares them with the production version's drift reference and adds
the run to the shared Evidently workspace (an ``evidently ui`` service every host and the dashboard
reach). Two ways to run it per line, both built from the line's config (image, store secret, KFP
host, namespace, experiment):

- :func:`schedule_drift` (``redi monitor schedule --line L --cron "0 0 * * * *"``): a KFP recurring
  run of :func:`build_drift_pipeline` (one ``drift_check`` step, never cached: each run sees new rows);
- :func:`cronjob_manifest` (``redi monitor cronjob --line L --schedule "0 * * * *" > cronjob.yaml``):
  a ``batch/v1`` CronJob running ``redi monitor --from-store`` in the same image, for clusters
  without Kubeflow.

The store's credentials reach the step as the line pipeline's steps get them: the keys of the line's
``pipeline.store_secret`` become ``REDI_S3_*`` environment variables. The Evidently service's secret
(``evidently ui --secret``), when it has one, comes from the Kubernetes secret named by
``evidently_secret`` (key ``REDI_EVIDENTLY_SECRET``).
"""

# no `from __future__ import annotations`: KFP reads the pipeline function's annotations as types

import tempfile
from pathlib import Path
from typing import Any, Callable

from kfp import dsl, kubernetes

from components.common import REDI_IMAGE, S3_OPTIONAL, S3_SETTINGS
from components.drift_check import drift_check
from pipelines.line_pipeline import _client, load_line, step_image
from redi.core.config import RediConfig
from redi.core.errors import ConfigError
from redi.ops.monitoring import WORKSPACE_SECRET_ENV, check_line_name, is_remote_workspace

DRIFT_PIPELINE_NAME = "redi-drift"


def _check_workspace(workspace: str) -> str:
    """A scheduled run's workspace must be a service URL: a folder inside a pod is lost with it."""
    if workspace and not is_remote_workspace(workspace):
        raise ConfigError(f"--workspace {workspace!r} is a folder; a scheduled drift run runs in a pod, where a "
                          f"folder is lost with it and no dashboard sees it. Give the URL of the `evidently ui` "
                          f"service (e.g. http://evidently.monitoring:8000), or nothing for no workspace")
    return workspace


def build_drift_pipeline(cfg: RediConfig, workspace: str | None = None, evidently_secret: str | None = None,
                         last: int | None = None, min_rows: int | None = None) -> Callable[..., Any]:
    """The drift pipeline of one line; its parameters default to the given settings, else the line's
    ``monitor`` section.

    Parameters (overridable per run): ``line``, ``workspace`` (``evidently ui`` URL, "" = none),
    ``last`` (compare the latest N rows, 0 = all), ``min_rows``, ``cluster_mode`` (True: the object
    store must be configured; a local run sets it False).
    """
    workspace, evidently_secret, last, min_rows = _settings(cfg, workspace, evidently_secret, last, min_rows)
    _check_workspace(workspace)
    pipe = cfg.pipeline

    @dsl.pipeline(name=DRIFT_PIPELINE_NAME, description=f"redi line {cfg.line.name}: drift of every serving "
                                                        f"host's production rows vs the production reference")
    def drift_pipeline(line: str = cfg.line.name, workspace: str = workspace, last: int = last,
                       min_rows: int = min_rows, cluster_mode: bool = True):
        task = drift_check(line=line, workspace=workspace, last=last, min_rows=min_rows, cluster_mode=cluster_mode)
        task.set_display_name("redi monitor").set_caching_options(False)  # every run must read the new rows
        if pipe.store_secret:
            kubernetes.use_secret_as_env(task, pipe.store_secret, {k: k for k in S3_SETTINGS})
            kubernetes.use_secret_as_env(task, pipe.store_secret, {k: k for k in S3_OPTIONAL}, optional=True)
        if evidently_secret:
            kubernetes.use_secret_as_env(task, evidently_secret, {WORKSPACE_SECRET_ENV: WORKSPACE_SECRET_ENV})
        image = step_image(cfg)
        if image != REDI_IMAGE:
            task.set_container_image(image)

    return drift_pipeline


def _settings(cfg: RediConfig, workspace: str | None, evidently_secret: str | None, last: int | None,
              min_rows: int | None) -> tuple[str, str, int, int]:
    """The given settings, each one not given taken from the line's ``monitor`` section."""
    mon = cfg.monitor
    return (mon.workspace if workspace is None else workspace,
            mon.evidently_secret if evidently_secret is None else evidently_secret,
            int(mon.last if last is None else last), int(mon.min_rows if min_rows is None else min_rows))


def kubernetes_cron(kfp_cron: str) -> str:
    """KFP's 6-field cron (seconds first) as a Kubernetes CronJob's 5 fields; the seconds must be 0."""
    fields = kfp_cron.split()
    if len(fields) != 6 or fields[0] != "0":
        raise ConfigError(f"cron {kfp_cron!r} is not a 6-field KFP cron with seconds 0 (e.g. '0 0 * * * *' = "
                          f"hourly); a CronJob cannot run at seconds other than 0")
    return " ".join(fields[1:])


def compile_drift_pipeline(out_path: str | Path, cfg: RediConfig, **settings: Any) -> Path:
    """Compile the line's drift pipeline to a KFP YAML package (offline)."""
    from kfp import compiler

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_drift_pipeline(cfg, **settings), str(out_path))
    return out_path


def schedule_drift(host: str, line: str, cron: str | None = None, workspace: str | None = None,
                   evidently_secret: str | None = None, last: int | None = None, min_rows: int | None = None,
                   experiment: str | None = None,
                   namespace: str | None = None, package_path: str | Path | None = None,
                   lines_dir: str | Path | None = None, config_file: str | Path | None = None,
                   client: Any = None) -> dict[str, Any]:
    """Create the line's drift recurring run on a KFP endpoint (``kfp.Client.create_recurring_run``).

    ``cron`` has KFP's 6 fields (seconds first), e.g. ``"0 0 * * * *"`` for hourly. ``host`` "" takes
    the line's ``pipeline.kfp_host``; each setting not given (None) the line's ``monitor`` section's
    (``monitor.schedule``, ``.workspace``, ...). At most one run at a time, no catch-up of missed runs.

    Returns:
        ``{"recurring_run_id", "host", "cron", "package", "arguments"}``.
    """
    cfg = load_line(line, lines_dir, None, None, config_file)
    cron = cfg.monitor.schedule if cron is None else cron
    if len(cron.split()) != 6:
        raise ConfigError(f"--cron {cron!r}: KFP takes 6 fields, seconds first (e.g. '0 0 * * * *' = hourly, "
                          f"'0 30 6 * * *' = 06:30 daily)")
    workspace, evidently_secret, last, min_rows = _settings(cfg, workspace, evidently_secret, last, min_rows)
    arguments = {"line": cfg.line.name, "workspace": _check_workspace(workspace), "last": int(last),
                 "min_rows": int(min_rows), "cluster_mode": True}
    client, host = _client(host, cfg, namespace, client)
    package = Path(package_path) if package_path else Path(tempfile.mkdtemp()) / f"{cfg.line.name}-drift.yaml"
    compile_drift_pipeline(package, cfg, workspace=workspace, evidently_secret=evidently_secret, last=last,
                           min_rows=min_rows)
    found = client.create_experiment(experiment or cfg.pipeline.experiment,
                                      namespace=namespace or cfg.pipeline.namespace or None)
    recurring = client.create_recurring_run(
        experiment_id=getattr(found, "experiment_id", None), job_name=f"{cfg.line.name}-drift",
        description=f"redi drift check of line {cfg.line.name} over every serving host, cron {cron}",
        cron_expression=cron, max_concurrency=1, no_catchup=True, params=arguments,
        pipeline_package_path=str(package), enable_caching=False)
    recurring_id = getattr(recurring, "recurring_run_id", None)
    print(f"scheduled the drift check of line {cfg.line.name!r} on {host}: recurring run {recurring_id}, "
          f"cron {cron!r}")
    return {"recurring_run_id": recurring_id, "host": host, "cron": cron, "package": str(package),
            "arguments": arguments}


def cronjob_manifest(line: str, schedule: str | None = None, workspace: str | None = None,
                     evidently_secret: str | None = None, last: int | None = None, min_rows: int | None = None,
                     namespace: str | None = None,
                     lines_dir: str | Path | None = None, config_file: str | Path | None = None) -> dict[str, Any]:
    """A Kubernetes ``batch/v1`` CronJob running the line's drift check (``redi monitor --from-store``).

    ``schedule`` is a Kubernetes cron (5 fields, e.g. ``"0 * * * *"``; default: the line's
    ``monitor.schedule`` without its seconds field); each other setting not given (None) is the line's
    ``monitor`` section's. The pod is in cluster mode
    (Kubernetes sets ``KUBERNETES_SERVICE_HOST``), so it reads the store named by the line's
    ``pipeline.store_secret`` and fails loudly without it. A run that finds drift exits 1: the Job
    fails (not retried: ``backoffLimit: 0``), which is what cluster alerting sees; errors exit 2.
    """
    cfg = load_line(line, lines_dir, None, None, config_file)
    schedule = kubernetes_cron(cfg.monitor.schedule) if schedule is None else schedule
    if len(schedule.split()) != 5:
        raise ConfigError(f"--schedule {schedule!r}: a Kubernetes CronJob takes 5 fields (minute hour day month "
                          f"weekday), e.g. '0 * * * *' = hourly")
    workspace, evidently_secret, last, min_rows = _settings(cfg, workspace, evidently_secret, last, min_rows)
    name = check_line_name(cfg.line.name)
    args = ["monitor", "--line", name, "--from-store", "--out", "/tmp/monitoring", "--last", str(int(last)),
            "--min-rows", str(int(min_rows))]
    if _check_workspace(workspace):
        args += ["--workspace", workspace]
    env: list[dict[str, Any]] = [{"name": "REDI_CLUSTER_MODE", "value": "true"}]
    if evidently_secret:
        env.append({"name": WORKSPACE_SECRET_ENV, "valueFrom": {"secretKeyRef": {
            "name": evidently_secret, "key": WORKSPACE_SECRET_ENV}}})
    container: dict[str, Any] = {"name": "drift-check", "image": step_image(cfg), "command": ["redi"], "args": args,
                                 "env": env}
    if cfg.pipeline.store_secret:  # REDI_S3_ENDPOINT, _ACCESS_KEY, _SECRET_KEY, _BUCKET, ... as the pipeline's steps get them
        container["envFrom"] = [{"secretRef": {"name": cfg.pipeline.store_secret}}]
    metadata: dict[str, Any] = {"name": f"redi-drift-{name.lower().replace('_', '-').replace('.', '-')}"[:52],
                                "labels": {"app.kubernetes.io/name": "redi-drift", "redi.line": name}}
    if namespace or cfg.pipeline.namespace:
        metadata["namespace"] = namespace or cfg.pipeline.namespace
    return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": metadata,
            "spec": {"schedule": schedule, "concurrencyPolicy": "Forbid", "startingDeadlineSeconds": 600,
                     "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 5,
                     "jobTemplate": {"spec": {"backoffLimit": 0, "template": {
                         "metadata": {"labels": dict(metadata["labels"])},
                         "spec": {"restartPolicy": "Never", "containers": [container]}}}}}}


__all__ = ["DRIFT_PIPELINE_NAME", "build_drift_pipeline", "compile_drift_pipeline", "cronjob_manifest",
           "kubernetes_cron", "schedule_drift"]
