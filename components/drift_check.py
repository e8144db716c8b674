"""KFP component ``drift_check``: the scheduled drift run of one line over every host's production rows.

Not a stage of the line's pipeline (``redi.stages``): it is the one step of the drift pipeline
(``pipelines/drift_pipeline.py``), which ``redi monitor schedule`` runs on a cron per line.
"""

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def drift_check(line: str, workspace: str, last: int, min_rows: int, cluster_mode: bool,
                report: Output[Artifact]) -> bool:
    """``redi.ops.monitoring.run_monitor`` on the rows every serving host shipped to the object store
    (``production-log/<line>/<host>/...``) against the production version's drift reference.

    Writes ``report.html``, ``snapshot.json`` and ``result.json`` into ``report``, adds the run to the
    Evidently ``workspace`` (an ``evidently ui`` URL; "" = none) and returns whether drift was found.
    In ``cluster_mode`` the object store must be configured (``REDI_S3_*``, from the line's
    ``pipeline.store_secret``): a missing or unreachable store fails here, naming the setting.
    """
    from components.common import open_store, out_dir, stage_guard
    from redi.ops.monitoring import MonitorSettings, fetch_production_reference, run_monitor

    with stage_guard("drift_check", line) as record:
        store = open_store("", cluster_mode)  # first: no rows to judge without the store
        folder = out_dir(report.path)
        reference = fetch_production_reference(store, line, folder / "reference.csv")
        settings = MonitorSettings(min_rows=min_rows, last=last or None)
        result = run_monitor(line, None, reference, folder, workspace=workspace or None, settings=settings,
                             store=store)
        report.metadata.update({"line": line, "drift_detected": result.drift_detected,
                                "n_current": result.n_current, "rows_per_host": result.rows_per_host})
        record.update({"drift_detected": result.drift_detected, "n_current": result.n_current,
                       "rows_per_host": result.rows_per_host, "report": result.html_path,
                       "workspace_project": result.workspace_project})
        return bool(result.drift_detected)
