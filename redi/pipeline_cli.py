"""``redi pipeline compile|run|run-all|submit``: the Kubeflow pipeline from the command line.

Self-contained: ``redi/cli.py`` only calls :func:`add_pipeline_commands` on its sub-parsers and
registers the handler it returns (``COMMANDS.update(add_pipeline_commands(sub))``). The pipeline
modules (kfp and the components) are imported only when a pipeline command runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from redi.config import PROFILES

PROJECT_ROOT = Path(__file__).resolve().parents[1]
Handler = Callable[[argparse.Namespace], int]
_GATE_OPTIONS = (("--min-image-auroc", "min_image_auroc"), ("--min-pixel-auroc", "min_pixel_auroc"),
                 ("--min-aupro", "min_aupro"), ("--tolerance", "tolerance"))


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
    """``pipelines.line_pipeline``, importable also from a checkout whose editable install predates
    ``pipelines/`` and ``components/`` (then the checkout's root is put on ``sys.path``)."""
    try:
        return importlib.import_module("pipelines.line_pipeline")
    except ModuleNotFoundError as exc:
        if exc.name not in ("pipelines", "components") or not (PROJECT_ROOT / "pipelines").is_dir():
            raise
        sys.path.insert(0, str(PROJECT_ROOT))
        return importlib.import_module("pipelines.line_pipeline")


def run_line_pipeline(line: str, profile: str | None = "tiny", workdir: str | Path = "runs/pipeline",
                      **kwargs: Any) -> dict[str, Any]:
    """:func:`pipelines.line_pipeline.run_line_pipeline` (see there): run one line's pipeline locally."""
    return pipeline_module().run_line_pipeline(line, profile, workdir, **kwargs)


def _gate_overrides(args: argparse.Namespace) -> dict[str, float]:
    return {dest: getattr(args, dest) for _, dest in _GATE_OPTIONS if getattr(args, dest, None) is not None}


def _compile(args: argparse.Namespace) -> int:
    print(f"compiled: {pipeline_module().compile_pipeline(args.out)}")
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
    pipeline_module().submit(args.host, args.line, args.profile, args.workdir, overrides=args.set, data_revision=args.revision,
           data_repo=args.data_repo, data_path=args.data_path, gate_overrides=_gate_overrides(args),
           experiment=args.experiment, namespace=args.namespace, package_path=args.package,
           lines_dir=args.lines_dir, config_file=args.config)
    return 0


_HANDLERS: dict[str, Handler] = {"compile": _compile, "run": _run, "run-all": _run_all, "submit": _submit}


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

    p = sub.add_parser("compile", help="write the pipeline's KFP YAML (for a cluster)")
    p.add_argument("--out", default="pipelines/line_pipeline.yaml", help="YAML file to write")

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

    p = sub.add_parser("submit", help="start a run of one line on a Kubeflow Pipelines endpoint")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    _add_run_options(p)
    p.add_argument("--workdir", default="", help="persistent folder in the step pods (a mounted volume); '' none")
    p.add_argument("--experiment", default="redi", help="KFP experiment name")
    p.add_argument("--namespace", help="Kubernetes namespace (multi-user deployments)")
    p.add_argument("--package", help="also keep the compiled YAML here")
    return {"pipeline": _dispatch}
