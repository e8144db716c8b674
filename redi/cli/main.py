"""The ``redi`` command line. Every command is a thin shell over a function in ``redi.workflow.stages`` (or
the pipeline / serving modules), so the CLI, Kubeflow, DVC and the tests run the same code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from redi import __version__
from redi.core.config import PROFILES, load_config, save_config, to_dict
from redi.core.errors import ConfigError, RediError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    """Register a handler for a sub-command."""
    def register(func: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = func
        return func
    return register


def _config(args: argparse.Namespace, data_root: str | None = None):
    overrides = list(getattr(args, "set", None) or [])
    if data_root:
        overrides.append(f"data.root={data_root}")
    return load_config(getattr(args, "config", None), getattr(args, "profile", None), overrides)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (any subset of the schema; see `redi config`)")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="named budget (default: cpu, or the file's)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override one setting, e.g. --set train.seed=3 --set model.prompt=none")


# -- data ---------------------------------------------------------------------------------------
@command("demo-data")
def _demo_data(args: argparse.Namespace) -> int:
    from redi.data.demo import make_demo_line

    summary = make_demo_line(args.out, args.line, n_train=args.n_train, n_test_good=args.n_test_good,
                             n_test_defect=args.n_test_defect, size=args.size, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    return 0


@command("validate-data")
def _validate(args: argparse.Namespace) -> int:
    from redi.workflow.stages import validate_data

    cfg = _config(args, args.data)
    path = validate_data(args.data, args.out, cfg)
    manifest = json.loads(Path(path).read_text())
    print(json.dumps({"manifest": str(path), "counts": manifest["counts"]}, indent=2))
    return 0


@command("import-folder")
def _import_folder(args: argparse.Namespace) -> int:
    from redi.data.importers import import_plain_folder

    print(json.dumps(import_plain_folder(args.src, args.dst), indent=2, default=str))
    return 0


@command("import-kolektor")
def _import_kolektor(args: argparse.Namespace) -> int:
    from redi.data.importers import import_kolektorsdd2

    print(json.dumps(import_kolektorsdd2(args.src, args.dst), indent=2, default=str))
    return 0


@command("config")
def _show_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.out:
        save_config(cfg, args.out)
    else:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


# -- stages -------------------------------------------------------------------------------------
@command("precompute-selfmaps")
def _selfmaps(args: argparse.Namespace) -> int:
    from redi.methods.redi.fit import precompute_selfmaps

    print(precompute_selfmaps(args.data, args.out, _config(args, args.data)))
    return 0


@command("build-prompt-bank")
def _prompt_bank(args: argparse.Namespace) -> int:
    from redi.methods.redi.fit import build_prompt_bank

    print(build_prompt_bank(args.data, args.out, _config(args, args.data)))
    return 0


@command("train-recover")
def _train_recover(args: argparse.Namespace) -> int:
    from redi.methods.redi.fit import train_recover

    print(train_recover(args.data, args.bank, args.out, _config(args, args.data), args.selfmaps))
    return 0


@command("train-discriminate")
def _train_discriminate(args: argparse.Namespace) -> int:
    from redi.methods.redi.fit import train_discriminate

    print(train_discriminate(args.data, args.bank, args.recover, args.out, _config(args, args.data), args.line))
    return 0


@command("train-patchcore")
def _train_patchcore(args: argparse.Namespace) -> int:
    from redi.methods.patchcore.method import train_patchcore

    print(train_patchcore(args.data, args.out, _config(args, args.data), args.line))
    return 0


def _named_paths(pairs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` arguments as a dict; a malformed one is a clear error."""
    named = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--candidate takes NAME=PATH (e.g. redi=runs/caps/detector.pt), got {pair!r}")
        named[name] = _detector_file(path)
    return named


@command("select-champion")
def _select_champion(args: argparse.Namespace) -> int:
    from redi.workflow.champion import champion_stage

    path = champion_stage(args.data, args.out, _config(args, args.data), _named_paths(args.candidate), args.line)
    print(Path(path).with_name("selection.json").read_text())
    return 0


@command("train")
def _train(args: argparse.Namespace) -> int:
    from redi.workflow.stages import train_all

    cfg = _config(args, args.data)
    paths = train_all(args.data, args.out, cfg, args.line)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _detector_file(model: str) -> Path:
    """A run folder's ``detector.pt``, or the detector file given."""
    path = Path(model)
    return path / "detector.pt" if path.is_dir() else path


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    from redi.workflow.stages import evaluate

    detector = _detector_file(args.model)
    cfg = _config(args, args.data)
    path = evaluate(detector, args.data, args.out, cfg, write_report=not args.no_report)
    metrics = json.loads(Path(path).read_text())
    keys = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro", "threshold", "threshold_policy", "false_call_target",
            "profile")
    point = metrics["operating_point"]
    at_threshold = {k: point.get(k) for k in ("recall", "escape_rate", "false_call_rate", "tp", "fn", "fp", "tn")}
    print(json.dumps({**{k: metrics.get(k) for k in keys}, "at_threshold": at_threshold}, indent=2))
    print(f"at the served threshold {metrics['threshold']:.4g}: caught {point['tp']} of {point['tp'] + point['fn']} "
          f"defects, flagged {point['fp']} of {point['fp'] + point['tn']} good parts", file=sys.stderr)
    if not args.no_report:
        print(f"report: {Path(args.out) / 'report' / 'index.html'}")
    return 0


@command("validate-detector")
def _validate_detector(args: argparse.Namespace) -> int:
    from redi.workflow.validation import validate

    detector = _detector_file(args.model)
    cfg = _config(args, args.data)
    path = validate(detector, args.data, args.out, cfg)
    result = json.loads(Path(path).read_text())
    summary = {**result["metrics"], "threshold": result["threshold"], "threshold_policy": result["threshold_policy"],
               "recall_at_threshold": result["recall_at_threshold"],
               "false_alarm_rate_at_threshold": result["false_alarm_rate_at_threshold"],
               "recall_per_kind": {k: v["recall_at_threshold"] for k, v in result["per_kind"].items()},
               "recommended_margin": result["recommended_margin"], "counts": result["counts"]}
    print(json.dumps(summary, indent=2))
    print(f"metrics: {path}\nexamples: {Path(args.out) / 'val_examples.png'}")
    return 0


@command("predict")
def _predict(args: argparse.Namespace) -> int:
    from redi.workflow.predict import predict_paths

    results = predict_paths(args.model, args.inputs, args.out, device=args.device, batch_size=args.batch_size)
    for row in results:
        verdict = "ERROR" if row["error"] else "ANOMALOUS" if row["anomalous"] else "ok"
        print(f"{row['score']:.4f}  {verdict:9s}  {row['path']}")
    failed = sum(1 for row in results if row["error"])
    print(f"{len(results) - failed} scored, {failed} unreadable; scores and maps in {args.out}", file=sys.stderr)
    return 1 if failed else 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from redi.core.config import read_config_file
    from redi.cli.pipeline import run_line_pipeline

    # the demo's default budget is tiny, unless the command line or the config file names one
    profile = args.profile or (read_config_file(args.config).get("profile") if args.config else None) or "tiny"
    run_line_pipeline(args.line, profile, Path(args.workdir), overrides=args.set, config_file=args.config)
    return 0


@command("stages")
def _stages(args: argparse.Namespace) -> int:
    from redi.stages import STAGES, dvc_yaml_text

    if args.action == "dvc":
        text = dvc_yaml_text()
        if args.out:
            from redi.core.utils import atomic_write_text

            atomic_write_text(args.out, text)
            print(args.out)
        else:
            print(text, end="")
        return 0
    for stage in STAGES:
        flags = [flag for flag, on in (("uncached", not stage.cached), ("store", stage.store),
                                       ("workdir", stage.workdir), ("accelerator", stage.accelerator),
                                       ("dvc", stage.dvc)) if on]
        print(f"{stage.name:20s} reads {','.join(stage.reads) or '-':26s} {' '.join(flags):28s} {stage.summary}")
    return 0


def _stage_parser(sub: Any, name: str) -> argparse.ArgumentParser:
    """The sub-command of a stage of the table (:mod:`redi.stages`): its name and help from its row,
    its old command names still accepted (:func:`main` says the new one)."""
    from redi.stages import get_stage

    stage = get_stage(name)
    old = [alias for alias in stage.aliases if "_" not in alias]  # the names users typed on the command line
    return sub.add_parser(stage.command, aliases=old, help=f"stage: {stage.summary}")


def _command_name(typed: str) -> str:
    """The command a typed name stands for: itself, or the new name of an old stage command."""
    if typed in COMMANDS:
        return typed
    from redi.stages import get_stage

    return get_stage(typed).command  # prints a note naming the new command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="redi", description="ReDi visual anomaly detection for factory lines.")
    parser.add_argument("--version", action="version", version=f"redi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job: the Kubeflow pipeline (local runner) on a synthetic demo line")
    p.add_argument("--line", default="bottle_caps", help="demo product line (see `redi demo-data --help`)")
    p.add_argument("--workdir", default="runs/pipeline", help="where data, models, reports and the Bento go")
    _add_config_options(p)

    p = sub.add_parser("demo-data", help="write a deterministic SYNTHETIC product line in MVTec-AD layout")
    p.add_argument("out", help="output folder (the line's root)")
    p.add_argument("--line", default="bottle_caps", help="which synthetic line to make")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--n-train", type=int, default=30, help="normal training images")
    p.add_argument("--n-test-good", type=int, default=10, help="normal test images")
    p.add_argument("--n-test-defect", type=int, default=20, help="defective test images (the types in turn)")

    p = _stage_parser(sub, "validate_data")
    p.add_argument("data", help="line folder in MVTec-AD layout")
    p.add_argument("--out", default=".", help="folder for manifest.json and rejected.json")
    _add_config_options(p)

    p = sub.add_parser("import-folder", help="import good/ defect/ masks/ folders into MVTec-AD layout")
    p.add_argument("src")
    p.add_argument("dst")
    p = sub.add_parser("import-kolektor", help="import KolektorSDD2 (*_GT.png) into MVTec-AD layout")
    p.add_argument("src")
    p.add_argument("dst")

    p = sub.add_parser("config", help="print the full config of a profile (with overrides) as YAML")
    p.add_argument("--out", help="write it to this file instead")
    _add_config_options(p)

    p = _stage_parser(sub, "precompute_selfmaps")
    p.add_argument("data")
    p.add_argument("--out", required=True, help="folder for selfmaps.pt")
    _add_config_options(p)

    p = _stage_parser(sub, "build_prompt_bank")
    p.add_argument("data")
    p.add_argument("--out", required=True, help="prompt_bank.pt path")
    _add_config_options(p)

    p = _stage_parser(sub, "train_recover")
    p.add_argument("data")
    p.add_argument("--bank", required=True)
    p.add_argument("--selfmaps", help="selfmaps.pt cache (optional)")
    p.add_argument("--out", required=True, help="folder for recover.pt and checkpoints")
    _add_config_options(p)

    p = _stage_parser(sub, "train_discriminate")
    p.add_argument("data")
    p.add_argument("--bank", required=True)
    p.add_argument("--recover", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--line", default="", help="product line name recorded in the model")
    _add_config_options(p)

    p = _stage_parser(sub, "train_patchcore")
    p.add_argument("data")
    p.add_argument("--out", required=True, help="folder for detector.pt")
    p.add_argument("--line", default="", help="product line name recorded in the model")
    _add_config_options(p)

    p = _stage_parser(sub, "select_champion")
    p.add_argument("data")
    p.add_argument("--candidate", action="append", default=[], metavar="NAME=PATH",
                   help="a fitted candidate (repeat), e.g. redi=runs/caps/detector.pt patchcore=runs/pc")
    p.add_argument("--out", required=True, help="folder for the champion's detector.pt, selection.json, candidates/")
    p.add_argument("--line", default="", help="product line name recorded in a combined candidate")
    _add_config_options(p)

    p = sub.add_parser("train", help="train a line: data check, then every candidate (model.candidates) and the "
                                     "champion chosen on validation, or model.method alone")
    p.add_argument("data", help="line folder in MVTec-AD layout")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument("--line", default="", help="product line name recorded in the model")
    _add_config_options(p)

    p = _stage_parser(sub, "evaluate")
    p.add_argument("model", help="detector.pt or a run folder holding it")
    p.add_argument("data", help="line folder with test/ and ground_truth/")
    p.add_argument("--out", required=True)
    p.add_argument("--no-report", action="store_true", help="metrics only")
    _add_config_options(p)

    p = sub.add_parser("validate-detector",
                       help="validate a detector on held-out normal training images plus synthetic defects "
                            "(no test labels): val_metrics.json, val_examples.png")
    p.add_argument("model", help="detector.pt or a run folder holding it")
    p.add_argument("data", help="the line folder the detector was trained on (only train/good is read)")
    p.add_argument("--out", required=True, help="folder for val_metrics.json and val_examples.png")
    _add_config_options(p)

    p = sub.add_parser("stages", help="the pipeline's stage table: list it, or write dvc.yaml from it")
    p.add_argument("action", nargs="?", choices=("list", "dvc"), default="list")
    p.add_argument("--out", help="with dvc: write this file (e.g. dvc.yaml) instead of printing")

    p = sub.add_parser("predict", help="score one image or a folder; write scores.csv and map PNGs")
    p.add_argument("model", help="detector.pt or a run folder holding it")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", default="predictions")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)

    from redi.cli.model import add_model_commands
    from redi.cli.monitor import add_monitor_commands
    from redi.cli.pipeline import add_pipeline_commands
    from redi.cli.export import add_export_commands
    from redi.cli.review import add_review_commands
    from redi.cli.watch import add_watch_commands

    COMMANDS.update(add_model_commands(sub))
    COMMANDS.update(add_review_commands(sub))
    COMMANDS.update(add_monitor_commands(sub))
    COMMANDS.update(add_pipeline_commands(sub))
    COMMANDS.update(add_export_commands(sub))
    COMMANDS.update(add_watch_commands(sub))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``redi`` console script."""
    args = build_parser().parse_args(argv)
    args.command = _command_name(args.command)
    try:
        return COMMANDS[args.command](args)
    except RediError as exc:
        print(f"redi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"redi {args.command}: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
