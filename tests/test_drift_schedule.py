"""The drift check on its own schedule per line: KFP recurring run and Kubernetes CronJob.

The REAL ``kfp.Client`` sends the recurring run to the recording KFP API server of
``tests/test_schedule.py``; the request body is what a KFP backend would schedule. The CronJob
manifest printed by ``redi monitor cronjob`` is checked field by field as Kubernetes reads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_schedule import API, kfp_api  # noqa: F401 (the fixture) - tests/ is on sys.path (rootdir conftest)

from redi.cli.main import main
from redi.core.errors import ConfigError

LINE = "bottle_caps"
REPO = Path(__file__).resolve().parents[1]


def test_schedule_sends_a_recurring_drift_run_with_the_store_secret(kfp_api, tmp_path, capsys):  # noqa: F811
    code = main(["monitor", "schedule", "--line", LINE, "--cron", "0 0 * * * *", "--kfp-host", kfp_api.url,
                 "--workspace", "http://evidently.monitoring:8000", "--evidently-secret", "redi-evidently",
                 "--last", "500", "--min-rows", "20"])
    assert code == 0
    (body,) = kfp_api.bodies("POST", f"{API}/recurringruns")
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 * * * *"
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    assert body["display_name"] == f"{LINE}-drift" and body["experiment_id"] == "exp-1"
    assert body["runtime_config"]["parameters"] == {"line": LINE, "workspace": "http://evidently.monitoring:8000",
                                                    "last": 500, "min_rows": 20, "cluster_mode": True}
    spec = body["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "redi-drift"
    (task,) = spec["root"]["dag"]["tasks"].values()  # one step, never cached: each run must read new rows
    assert task["componentRef"]["name"] == "comp-drift-check" and not task.get("cachingOptions", {}).get("enableCache")
    executor = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"][
        "exec-drift-check"]
    secrets = {(s["secretName"], e["envVar"], s.get("optional", False)) for s in executor["secretAsEnv"]
               for e in s["keyToEnv"]}
    assert {("redi-s3", "REDI_S3_ENDPOINT", False), ("redi-s3", "REDI_S3_SECRET_KEY", False),
            ("redi-s3", "REDI_S3_BUCKET", True), ("redi-evidently", "REDI_EVIDENTLY_SECRET", False)} <= secrets
    image = spec["deploymentSpec"]["executors"]["exec-drift-check"]["container"]["image"]
    assert image.startswith("ghcr.io/redi-project/redi")
    assert '"recurring_run_id": "rec-1"' in capsys.readouterr().out


def test_schedule_refuses_a_folder_workspace_and_a_five_field_cron(kfp_api):  # noqa: F811
    from pipelines.drift_pipeline import schedule_drift

    with pytest.raises(ConfigError, match="6 fields, seconds first"):
        schedule_drift(kfp_api.url, LINE, "0 * * * *")
    with pytest.raises(ConfigError, match="is a folder; a scheduled drift run runs in a pod"):
        schedule_drift(kfp_api.url, LINE, "0 0 * * * *", workspace="evidently_ws")
    assert not kfp_api.bodies("POST", f"{API}/recurringruns")  # nothing half-scheduled


def test_cronjob_manifest_runs_the_check_from_the_store(tmp_path, capsys):
    out = tmp_path / "cronjob.yaml"
    assert main(["monitor", "cronjob", "--line", LINE, "--schedule", "*/30 * * * *", "--workspace",
                 "http://evidently.monitoring:8000", "--evidently-secret", "redi-evidently", "--namespace", "factory",
                 "--out", str(out)]) == 0
    manifest = yaml.safe_load(out.read_text())
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "CronJob"
    meta = manifest["metadata"]
    assert meta["name"] == "redi-drift-bottle-caps" and meta["namespace"] == "factory"
    assert len(meta["name"]) <= 52  # CronJob names are at most 52 characters (the Job adds a suffix)
    spec = manifest["spec"]
    assert spec["schedule"] == "*/30 * * * *" and spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0  # a run that found drift exits 1: reported, not retried
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"] == ["redi"]
    args = container["args"]
    assert args[:4] == ["monitor", "--line", LINE, "--from-store"]
    assert args[args.index("--workspace") + 1] == "http://evidently.monitoring:8000"
    assert container["envFrom"] == [{"secretRef": {"name": "redi-s3"}}]
    env = {e["name"]: e for e in container["env"]}
    assert env["REDI_CLUSTER_MODE"]["value"] == "true"
    assert env["REDI_EVIDENTLY_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "redi-evidently",
                                                                         "key": "REDI_EVIDENTLY_SECRET"}
    # the command it runs is one this CLI accepts
    from redi.cli.main import build_parser

    parsed = build_parser().parse_args(args)
    assert parsed.from_store and parsed.line == LINE and parsed.monitor_command is None


def test_cronjob_refuses_a_kfp_style_cron():
    from pipelines.drift_pipeline import cronjob_manifest

    with pytest.raises(ConfigError, match="5 fields"):
        cronjob_manifest(LINE, "0 0 * * * *")


def test_monitor_in_cluster_mode_without_a_store_is_a_loud_error(monkeypatch, tmp_path, capsys):
    for name in ("REDI_S3_ENDPOINT", "REDI_S3_ACCESS_KEY", "REDI_S3_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDI_CLUSTER_MODE", "true")
    code = main(["monitor", "--line", LINE, "--log-dir", str(tmp_path), "--reference", str(tmp_path / "r.csv")])
    assert code == 2
    err = capsys.readouterr().err
    assert "cluster mode" in err and "REDI_S3_ENDPOINT is not set" in err


def test_monitor_needs_a_line_and_a_reference_for_a_local_log(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("REDI_CLUSTER_MODE", "false")
    assert main(["monitor", "--reference", "r.csv"]) == 2
    assert "needs --line" in capsys.readouterr().err
    assert main(["monitor", "--line", LINE, "--log-dir", str(tmp_path)]) == 2
    assert "needs --reference" in capsys.readouterr().err


def test_the_lines_monitor_section_schedules_its_drift_check(kfp_api, tmp_path, capsys):  # noqa: F811
    """Without --cron / --schedule / --last / --min-rows the line's own ``monitor`` section decides."""
    lines = tmp_path / "lines"
    lines.mkdir()
    own = (REPO / "pipelines" / "lines" / f"{LINE}.yaml").read_text()
    (lines / f"{LINE}.yaml").write_text(own + "\nmonitor:\n  schedule: 0 15 */2 * * *\n  last: 300\n  min_rows: 40\n")
    assert main(["monitor", "schedule", "--line", LINE, "--lines-dir", str(lines), "--kfp-host", kfp_api.url]) == 0
    (body,) = kfp_api.bodies("POST", f"{API}/recurringruns")
    assert body["trigger"]["cron_schedule"]["cron"] == "0 15 */2 * * *"
    assert body["runtime_config"]["parameters"] == {"line": LINE, "workspace": "", "last": 300, "min_rows": 40,
                                                    "cluster_mode": True}
    out = tmp_path / "cronjob.yaml"
    assert main(["monitor", "cronjob", "--line", LINE, "--lines-dir", str(lines), "--out", str(out)]) == 0
    manifest = yaml.safe_load(out.read_text())
    assert manifest["spec"]["schedule"] == "15 */2 * * *"  # the same times, without KFP's seconds field
    args = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--last") + 1] == "300" and args[args.index("--min-rows") + 1] == "40"
    (lines / f"{LINE}.yaml").write_text(own + "\nmonitor:\n  schedule: 30 15 * * * *\n")
    capsys.readouterr()
    # a CronJob could not keep it: refused when the line is loaded, naming the setting
    assert main(["monitor", "cronjob", "--line", LINE, "--lines-dir", str(lines)]) == 2
    assert "monitor.schedule '30 15 * * * *' must be a 6-field cron with seconds 0" in capsys.readouterr().err
