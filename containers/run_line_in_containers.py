"""Run a line's pipeline with every step in the component image: KFP's local DockerRunner, here against
podman's Docker-compatible API (no Docker engine needed).

    .venv/bin/python containers/run_line_in_containers.py --line bottle_caps --profile tiny \\
        --workdir /var/tmp/redi-run --image localhost/redi:0.1.0 [-o section.key=value ...] [--json]

Each step is the compiled component's own container command (``sh -c ... python3 -m
kfp.dsl.executor_main``) run in ``--image``, exactly as a cluster runs it, with:

- the work folder (demo data, checkpoints, KFP's artifacts, the run's status records, the Bento store)
  mounted at the same path: it is KFP's pipeline root, the one folder DockerRunner mounts;
- the host's network, so the steps reach the object store the host reaches (``REDI_S3_*`` are passed
  into every step, as the line's Kubernetes secret does on a cluster);
- the run tag and status folder of the local runner, so the result reads like a SubprocessRunner run
  (``pipelines.line_pipeline.summarize``).

When ``DOCKER_HOST`` is unset, ``podman system service`` is started on a private socket for the run and
stopped afterwards. Prints the run's summary (``--json``: as JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = "localhost/redi:0.1.0"
PASSED_ENV = ("REDI_S3_ENDPOINT", "REDI_S3_ACCESS_KEY", "REDI_S3_SECRET_KEY", "REDI_S3_BUCKET", "REDI_S3_SECURE",
              "REDI_DEVICE")


@contextlib.contextmanager
def docker_api() -> Iterator[str]:
    """A Docker API endpoint: ``DOCKER_HOST`` when set, else podman's service on a private socket."""
    if os.environ.get("DOCKER_HOST"):
        yield os.environ["DOCKER_HOST"]
        return
    if shutil.which("podman") is None:
        raise SystemExit("podman is not installed and DOCKER_HOST is unset: run containers/setup_podman.sh (root)")
    folder = Path(tempfile.mkdtemp(prefix="redi-podman-"))
    url = f"unix://{folder / 'podman.sock'}"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", url], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (folder / "podman.sock").exists():
            if service.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"podman system service did not start: {service.stderr.read().decode()[-1000:]}")
            time.sleep(0.2)
        os.environ["DOCKER_HOST"] = url
        yield url
    finally:
        os.environ.pop("DOCKER_HOST", None)
        service.terminate()
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.kill()
        shutil.rmtree(folder, ignore_errors=True)


def run_in_containers(line: str, image: str, workdir: str | Path, profile: str | None = None,
                      overrides: list[str] | None = None, demo_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``line``'s pipeline with KFP's DockerRunner in ``image``; return ``summarize``'s dict (+ run_tag, seconds)."""
    os.environ["REDI_IMAGE"] = image  # read when the components are defined (components/common.py)
    sys.path.insert(0, str(ROOT))
    from kfp import local

    from pipelines import line_pipeline as lp
    from components.common import REDI_IMAGE, RUN_TAG_ENV, STATUS_ENV

    if REDI_IMAGE != image:
        raise SystemExit(f"the components were already defined for image {REDI_IMAGE!r}; run this in a fresh process")
    cfg = lp.load_line(line, None, profile, overrides or [])
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    arguments = lp.pipeline_arguments(cfg, workdir)
    if not arguments["data_repo"]:
        lp.ensure_demo_data(cfg, arguments["data_path"], demo_options)
    run_tag = lp.new_run_tag()
    status = lp.status_folder(workdir, cfg.line.name, run_tag)
    environment = {RUN_TAG_ENV: run_tag, STATUS_ENV: str(status),
                   **{k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}}
    started = time.perf_counter()
    with docker_api():
        local.init(runner=local.DockerRunner(network_mode="host", environment=environment),
                   pipeline_root=str(workdir))
        try:
            lp.build_pipeline(cfg)(**{**arguments, "cluster_mode": False})
        except RuntimeError as exc:
            failed = [r for r in lp.read_status(workdir, cfg.line.name, run_tag).values() if r.get("status") == "failed"]
            where = f"stage {failed[0]['stage']!r}: {failed[0]['cause']}" if failed else str(exc)
            raise SystemExit(f"the containerised pipeline for line {line!r} stopped at {where}") from None
    summary = lp.summarize(cfg.line.name, lp.read_status(workdir, cfg.line.name, run_tag))
    summary.update({"run_tag": run_tag, "seconds": round(time.perf_counter() - started, 1), "image": image})
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--line", required=True, help="a line name (pipelines/lines/<line>.yaml) or a line file")
    parser.add_argument("--profile", help="config profile (default: the line file's)")
    parser.add_argument("--workdir", required=True, help="work folder (mounted into every step at the same path)")
    parser.add_argument("--image", default=os.environ.get("REDI_IMAGE", DEFAULT_IMAGE), help="the component image")
    parser.add_argument("-o", "--override", action="append", default=[], help="section.key=value (repeatable)")
    parser.add_argument("--demo-options", default="{}", help="make_demo_line arguments as JSON (demo lines)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    summary = run_in_containers(args.line, args.image, args.workdir, args.profile, args.override,
                                json.loads(args.demo_options))
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        from pipelines import line_pipeline as lp

        print(f"pipeline run {summary['run_tag']} of line {args.line!r} in {args.image} took {summary['seconds']} s")
        lp.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
