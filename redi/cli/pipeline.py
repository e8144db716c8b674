"""``redi pipeline compile|run|run-all|submit|schedule``: the Kubeflow pipeline from the command line.

Self-contained: ``redi/cli/main.py`` only calls :func:`add_pipeline_commands` on its sub-parsers and
registers the handler it returns (``COMMANDS.update(add_pipeline_commands(sub))``). The pipeline
modules (kfp and the components) are imported only when a pipeline command runs, through
:func:`pipeline_module` (``redi.cli.monitor`` builds the drift trigger with :func:`drift_trigger`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from redi.core.config import PROFILES

PROJECT_ROOT = Path(__file__).resolve().parents[2]
Handler = Callable[[argparse.Namespace], int]
_GATE_OPTIONS = (("--min-image-auroc", "min_image_auroc"), ("--min-pixel-auroc", "min_pixel_auroc"),
                 ("--min-aupro", "min_aupro"), ("--tolerance", "tolerance"), ("--min-recall", "min_recall"),
                 ("--max-false-call-rate", "max_false_call_rate"), ("--rate-tolerance", "rate_tolerance"))


def _add_run_options(parser: argparse.ArgumentParser, with_line: bool = True) -> None:
    """Options shared by run, run-all and submit."""
    if with_line:
        parser.add_argument("--line", default="bottle_caps",
                            help="product line: a name in pipelines/lines/ or a line config file")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="config profile (default: the line file's)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="config setting on top of the line file's, e.g. --set train.seed=3")
    parser.add_argument("--config", help="redi config file; its settings go over the line file's")
    parser.add_argument("--lines-dir", help="folder of line config files (default pipelines/lines)")
    for flag, dest in _GATE_OPTIONS:
        parser.add_argument(flag, dest=dest, type=float, help=f"gate: override the line's {dest}")
    if with_line:
        parser.add_argument("--revision", help="git revision of the data in the DVC repository (default: the line's)")
        parser.add_argument("--data-repo", help="DVC repository (path or git URL) versioning the data")
        parser.add_argument("--data-path", help="the line's data folder (inside --data-repo when given)")


def pipeline_module() -> ModuleType:
    """``pipelines.line_pipeline``, imported on first use: it loads kfp, which most commands never need."""
    from pipelines import line_pipeline

    return line_pipeline


def run_line_pipeline(line: str, profile: str | None = None, workdir: str | Path = "runs/pipeline",
                      **kwargs: Any) -> dict[str, Any]:
    """:func:`pipelines.line_pipeline.run_line_pipeline` (see there): run one line's pipeline locally.

    ``profile`` None takes the line file's own profile."""
    return pipeline_module().run_line_pipeline(line, profile, workdir, **kwargs)


def latest_revision(data_repo: str) -> str:
    """The newest commit of a data repository (``git rev-parse HEAD`` of a local one, ``git ls-remote``
    of a URL); "" when the line has no repository (a plain folder has no revisions)."""
    if not data_repo:
        return ""
    from components.common import resolve_revision

    return resolve_revision(data_repo, "HEAD")


def drift_trigger(kfp_host: str | None = None, workdir: str | Path = "runs/pipeline",
                  lines_dir: str | Path | None = None, client: Any = None,
                  quiet: bool = False) -> Callable[[str], dict[str, Any]]:
    """The retraining that drift starts: ``trigger(line)`` runs the line's pipeline with the line's OWN
    profile on the newest revision of its data repository.

    Where it runs: on the KFP endpoint ``kfp_host`` or the line's ``pipeline.kfp_host`` when either is
    set (``client`` replaces ``kfp.Client``), else locally with KFP's runner in ``workdir``.

    Returns:
        A function of the line name that returns ``{"where", "profile", "data_revision", "result"}``.
    """
    def trigger(line: str) -> dict[str, Any]:
        module = pipeline_module()
        cfg = module.load_line(line, lines_dir)
        revision = latest_revision(cfg.line.data_repo) or None  # None: the line's configured source as is
        host = kfp_host or cfg.pipeline.kfp_host
        if host or client is not None:
            result = module.submit(host or "", line, data_revision=revision, lines_dir=lines_dir, client=client)
            where = result["host"]
        else:
            result = module.run_line_pipeline(line, None, workdir, data_revision=revision, lines_dir=lines_dir,
                                              quiet=quiet)
            where = "local"
        return {"line": cfg.line.name, "where": where, "profile": cfg.profile, "data_revision": revision or "",
                "result": result}

    return trigger


def _gate_overrides(args: argparse.Namespace) -> dict[str, float]:
    return {dest: getattr(args, dest) for _, dest in _GATE_OPTIONS if getattr(args, dest, None) is not None}


def _compile(args: argparse.Namespace) -> int:
    module = pipeline_module()
    cfg = module.load_line(args.line, args.lines_dir, args.profile, args.set, args.config)
    path = module.compile_pipeline(args.out, cfg=cfg)
    image = module.step_image(cfg)
    pinned = "" if "@sha256:" in image else (" (NOT pinned by digest: a moved tag changes what runs; give "
                                             "--set pipeline.image_digest=sha256:... or REDI_IMAGE=IMAGE@sha256:...)")
    print(f"compiled line {args.line}: {path}\nstep image: {image}{pinned}")
    return 0


def _run(args: argparse.Namespace) -> int:
    summary = pipeline_module().run_line_pipeline(args.line, args.profile, args.workdir, overrides=args.set,
                                data_revision=args.revision, data_repo=args.data_repo, data_path=args.data_path,
                                gate_overrides=_gate_overrides(args), lines_dir=args.lines_dir,
                                bentoml_home=args.bentoml_home or "", config_file=args.config,
                                verbose=args.verbose)
    return 0 if summary["promoted"] or not args.fail_if_refused else 3


def _run_all(args: argparse.Namespace) -> int:
    results = pipeline_module().run_all_lines(args.profile, args.workdir, lines_dir=args.lines_dir, overrides=args.set,
                            gate_overrides=_gate_overrides(args), bentoml_home=args.bentoml_home or "",
                            config_file=args.config)
    table = {line: ("FAILED: " + r["error"].splitlines()[0]) if "error" in r else
             ("promoted " if r["promoted"] else "refused ") + str(r["version"]) for line, r in results.items()}
    print(json.dumps(table, indent=2))
    return 1 if any("error" in r for r in results.values()) else 0


def _submit(args: argparse.Namespace) -> int:
    pipeline_module().submit(args.host or "", args.line, args.profile, args.workdir, overrides=args.set,
                             data_revision=args.revision, data_repo=args.data_repo, data_path=args.data_path,
                             gate_overrides=_gate_overrides(args), experiment=args.experiment,
                             namespace=args.namespace, package_path=args.package, lines_dir=args.lines_dir,
                             config_file=args.config)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    settings = [*args.set, *(f"gate.{k}={v}" for k, v in _gate_overrides(args).items()),
                *([f"line.data_revision={args.revision}"] if args.revision else [])]
    pipeline_module().schedule(args.host or "", args.line, args.cron, args.profile, args.workdir, overrides=settings,
                               data_repo=args.data_repo, data_path=args.data_path, experiment=args.experiment,
                               namespace=args.namespace, package_path=args.package, lines_dir=args.lines_dir,
                               config_file=args.config)
    return 0


_HANDLERS: dict[str, Handler] = {"compile": _compile, "run": _run, "run-all": _run_all, "submit": _submit,
                                 "schedule": _schedule}


def _dispatch(args: argparse.Namespace) -> int:
    return _HANDLERS[args.pipeline_command](args)


def add_pipeline_commands(subparsers: Any) -> dict[str, Handler]:
    """Register ``redi pipeline ...`` on the CLI's sub-parsers; return ``{"pipeline": handler}``.

    The handler takes the parsed arguments and returns the exit status (0 ok; ``run`` returns 3
    with ``--fail-if-refused`` when the gate refused the model); errors are ``RediError``.
    """
    pipeline = subparsers.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit",
                                     description="Kubeflow pipeline of a product line (see docs/pipeline.md).")
    sub = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    p = sub.add_parser("compile", help="write a line's pipeline as KFP YAML (for a cluster)")
    p.add_argument("--out", default="pipelines/line_pipeline.yaml", help="YAML file to write")
    p.add_argument("--line", default="bottle_caps", help="the line whose config (resources, secret, ...) it carries")
    p.add_argument("--profile", choices=sorted(PROFILES), help="config profile (default: the line file's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="config setting")
    p.add_argument("--config", help="redi config file; its settings go over the line file's")
    p.add_argument("--lines-dir", help="folder of line config files (default pipelines/lines)")

    p = sub.add_parser("run", help="run one line locally (KFP SubprocessRunner) and say where the results are")
    _add_run_options(p)
    p.add_argument("--workdir", default="runs/pipeline", help="persistent folder (checkpoints, outputs, store)")
    p.add_argument("--bentoml-home", help="BentoML store (default: BENTOML_HOME or <workdir>/bentoml)")
    p.add_argument("--fail-if-refused", action="store_true", help="exit with status 3 when the gate refuses")
    p.add_argument("--verbose", action="store_true", help="show KFP's full step output (always in the run's log)")

    p = sub.add_parser("run-all", help="run every line of pipelines/lines/ locally, one after the other")
    _add_run_options(p, with_line=False)
    p.add_argument("--workdir", default="runs/pipeline")
    p.add_argument("--bentoml-home")

    p = sub.add_parser("submit", help="start a run of one line on a Kubeflow Pipelines endpoint "
                                      "(e.g. from CI on a data commit: --revision REV)")
    _add_cluster_options(p)
    _add_run_options(p)

    p = sub.add_parser("schedule", help="create the line's recurring run on a KFP endpoint (its pipeline.schedule)")
    _add_cluster_options(p)
    _add_run_options(p)
    p.add_argument("--cron", help="6-field KFP cron (seconds first) instead of the line's pipeline.schedule")
    return {"pipeline": _dispatch}


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    """Options of the commands that talk to a KFP endpoint."""
    p.add_argument("--host", help="KFP API endpoint, e.g. http://localhost:8080 (default: the line's pipeline.kfp_host)")
    p.add_argument("--workdir", help="persistent folder in the step pods (default: the line's pipeline.workdir_mount "
                                     "when it mounts pipeline.workdir_pvc, else none: no resume)")
    p.add_argument("--experiment", help="KFP experiment name (default: the line's pipeline.experiment)")
    p.add_argument("--namespace", help="Kubernetes namespace (default: the line's pipeline.namespace)")
    p.add_argument("--package", help="also keep the compiled YAML here")
