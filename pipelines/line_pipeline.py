"""The per-product-line training pipeline: one Kubeflow pipeline, run locally or on a cluster.

DAG (every name is a component of ``components/``)::

    version_data ─┬─ precompute_hog ─────────┐
                  └─ build_prompt_bank ─ train_recover (GPU) ─ train_discriminate (GPU) ─┬─ evaluate ───────┐
                                                                                         └─ drift_reference ┴─ gate
                                                                            if the gate promotes: package_bento

- :func:`compile_pipeline` writes the YAML for a cluster (``redi pipeline compile``);
- :func:`run_line_pipeline` runs one line on this machine with KFP's local SubprocessRunner
  (the very same component definitions) and says where the report, model and Bento are;
- :func:`run_all_lines` runs every line of ``pipelines/lines/``;
- :func:`submit` sends a run to a KFP endpoint with ``kfp.Client``.

A product line is described by ``pipelines/lines/<line>.yaml`` (:class:`LineSpec`).
"""

# no `from __future__ import annotations`: KFP reads the pipeline function's annotations as types

import contextlib
import io
import json
import os
import re
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from kfp import dsl

from components.build_prompt_bank import build_prompt_bank
from components.drift_reference import drift_reference
from components.evaluate import evaluate
from components.gate import gate
from components.package_bento import package_bento
from components.precompute_hog import precompute_hog
from components.train_discriminate import train_discriminate
from components.train_recover import train_recover
from components.version_data import version_data
from redi.config import parse_overrides, read_config_file
from redi.errors import ConfigError, RediError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LINES_DIR = Path(__file__).resolve().parent / "lines"
PIPELINE_NAME = "redi-line"
GPU = "nvidia.com/gpu"
DEFAULT_WORKDIR = "runs/pipeline"


class PipelineError(RediError):
    """A pipeline run stopped; the message names the failed stage and its cause."""


# -- the pipeline -------------------------------------------------------------------------------
@dsl.pipeline(name=PIPELINE_NAME, description="redi: data version -> train -> evaluate -> gate -> package, per line")
def line_pipeline(line: str = "bottle_caps", data_path: str = "data/demo/bottle_caps", data_repo: str = "",
                  data_revision: str = "", profile: str = "cpu", config_json: str = "{}",
                  min_image_auroc: float = 0.0, min_pixel_auroc: float = 0.0, min_aupro: float = 0.0,
                  gate_tolerance: float = 0.01, workdir: str = "", run_tag: str = "", bentoml_home: str = ""):
    """One product line's run.

    Args:
        line: the product line (names the model, its storage keys and its Bento model).
        data_path: the line's folder in MVTec-AD layout (inside ``data_repo`` when one is given).
        data_repo: a DVC repository (git URL or path) versioning the data; "" for a plain folder.
        data_revision: the git revision of the data; "" for the working copy.
        profile: the config profile (``paper``, ``cpu``, ``fast``, ``tiny``).
        config_json: the line's config settings (a JSON mapping in the one config schema).
        min_image_auroc, min_pixel_auroc, min_aupro, gate_tolerance: the gate (see ``redi.gate``).
        workdir: persistent folder (a volume on a cluster): checkpoints, so a rerun resumes.
        run_tag: names this run's status records in ``<workdir>/<line>/status/``.
        bentoml_home: BentoML's store for ``package_bento`` (default ``<workdir>/bentoml``).
    """
    common = {"line": line, "profile": profile, "config_json": config_json, "workdir": workdir, "run_tag": run_tag}
    data = version_data(data_path=data_path, data_repo=data_repo, data_revision=data_revision, **common)
    data.set_display_name("version-data").set_caching_options(False)  # the working copy can change
    dataset = data.outputs["dataset"]
    maps = precompute_hog(dataset=dataset, **common).set_display_name("precompute-hog")
    bank = build_prompt_bank(dataset=dataset, **common).set_display_name("build-prompt-bank")
    recover = train_recover(dataset=dataset, prompt_bank=bank.outputs["prompt_bank"],
                            selfmaps=maps.outputs["selfmaps"], **common)
    recover.set_display_name("train-recover").set_accelerator_type(GPU).set_accelerator_limit(1)
    disc = train_discriminate(dataset=dataset, prompt_bank=bank.outputs["prompt_bank"],
                              recover=recover.outputs["recover"], **common)
    disc.set_display_name("train-discriminate").set_accelerator_type(GPU).set_accelerator_limit(1)
    detector = disc.outputs["detector"]
    evaluation = evaluate(dataset=dataset, detector=detector, **common).set_display_name("evaluate")
    reference = drift_reference(dataset=dataset, detector=detector, **common).set_display_name("drift-reference")
    decision = gate(dataset=dataset, detector=detector, evaluation=evaluation.outputs["evaluation"],
                    manifest=data.outputs["manifest"], reference=reference.outputs["reference"],
                    min_image_auroc=min_image_auroc, min_pixel_auroc=min_pixel_auroc, min_aupro=min_aupro,
                    tolerance=gate_tolerance, **common)
    decision.set_display_name("gate").set_caching_options(False)  # production may have moved since
    with dsl.If(decision.outputs["Output"] == True, name="promoted"):  # noqa: E712 (a KFP expression)
        package_bento(line=line, workdir=workdir, run_tag=run_tag, bentoml_home=bentoml_home, detector=detector,
                      evaluation=evaluation.outputs["evaluation"]).set_display_name("package-bento") \
            .set_caching_options(False)


def compile_pipeline(out_path: str | Path = "pipelines/line_pipeline.yaml") -> Path:
    """Compile :func:`line_pipeline` to a KFP YAML package (works offline)."""
    from kfp import compiler

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(line_pipeline, str(out_path))
    return out_path


# -- product lines ------------------------------------------------------------------------------
@dataclass
class LineSpec:
    """A product line's config file (``pipelines/lines/<line>.yaml``)."""

    line: str
    description: str = ""
    data_path: str = ""  # "" for a demo line: <workdir>/data/<line>
    data_repo: str = ""
    data_revision: str = ""
    profile: str = "cpu"
    demo: dict[str, Any] = field(default_factory=dict)  # make_demo_line arguments; {} for real data
    gate: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def is_demo(self) -> bool:
        """Whether the data is the synthetic demo line (made when missing)."""
        return bool(self.demo)


_GATE_KEYS = ("min_image_auroc", "min_pixel_auroc", "min_aupro", "tolerance")
_TOP_KEYS = {"line", "description", "data", "profile", "demo", "gate", "config"}


def load_line(name_or_path: str | Path, lines_dir: str | Path | None = None) -> LineSpec:
    """Read a line's config file, given its name (looked up in ``lines_dir``) or its path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(lines_dir or LINES_DIR) / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(Path(lines_dir or LINES_DIR).glob("*.yaml")))
        raise ConfigError(f"no line config {path}; known lines: {known or 'none'}; add pipelines/lines/<line>.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"line config {path} is not valid YAML: {exc}") from exc
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"line config {path}: unknown keys {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    data = raw.get("data") or {}
    gate_cfg = raw.get("gate") or {}
    bad = set(gate_cfg) - set(_GATE_KEYS)
    if bad:
        raise ConfigError(f"line config {path}: unknown gate keys {sorted(bad)}; known: {list(_GATE_KEYS)}")
    return LineSpec(line=str(raw.get("line") or path.stem), description=str(raw.get("description", "")),
                    data_path=str(data.get("path", "")), data_repo=str(data.get("repo", "")),
                    data_revision=str(data.get("revision", "")), profile=str(raw.get("profile", "cpu")),
                    demo=dict(raw.get("demo") or {}), gate={k: float(v) for k, v in gate_cfg.items()},
                    config=dict(raw.get("config") or {}), source=str(path))


def list_lines(lines_dir: str | Path | None = None) -> list[str]:
    """Names of every line with a config file."""
    return sorted(p.stem for p in Path(lines_dir or LINES_DIR).glob("*.yaml"))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def pipeline_arguments(spec: LineSpec, workdir: str | Path, profile: str | None = None,
                       overrides: list[str] | None = None, data_revision: str | None = None,
                       data_repo: str | None = None, data_path: str | None = None,
                       gate_overrides: dict[str, float] | None = None, run_tag: str = "",
                       bentoml_home: str = "", config_file: str | Path | None = None) -> dict[str, Any]:
    """The pipeline's parameters for a line: its file, then the caller's choices; validated.

    Settings: the line file's ``config`` < ``config_file`` (a redi config file) < ``overrides``;
    profile: ``profile`` when given, else the config file's, else the line file's.
    """
    from components.common import make_config

    workdir = Path(workdir).resolve()
    from_file = read_config_file(config_file) if config_file else {}
    file_profile = from_file.pop("profile", None)
    settings = _merge(_merge(spec.config, from_file), parse_overrides(overrides or []))
    profile = profile or file_profile or spec.profile
    make_config(profile, json.dumps(settings))  # fail now, not inside a step, on a bad setting
    gate_values = {"min_image_auroc": 0.0, "min_pixel_auroc": 0.0, "min_aupro": 0.0, "tolerance": 0.01,
                   **spec.gate, **(gate_overrides or {})}
    path = data_path if data_path is not None else spec.data_path
    repo = data_repo if data_repo is not None else spec.data_repo
    if repo and "://" not in repo and Path(repo).is_dir():
        repo = str(Path(repo).resolve())  # a local repository: the steps may run in another folder
    if not path:
        path = str(workdir / "data" / spec.line)
    elif not repo and not Path(path).is_absolute():
        path = str(Path(path).resolve())  # the steps may run in another folder
    return {"line": spec.line, "data_path": path, "data_repo": repo,
            "data_revision": data_revision if data_revision is not None else spec.data_revision,
            "profile": profile, "config_json": json.dumps(settings),
            "min_image_auroc": gate_values["min_image_auroc"], "min_pixel_auroc": gate_values["min_pixel_auroc"],
            "min_aupro": gate_values["min_aupro"], "gate_tolerance": gate_values["tolerance"],
            "workdir": str(workdir), "run_tag": run_tag, "bentoml_home": bentoml_home}


def ensure_demo_data(spec: LineSpec, data_path: str | Path, demo_options: dict[str, Any] | None = None) -> bool:
    """Make the line's SYNTHETIC demo data when the line is a demo line and the folder is missing."""
    from redi.data.demo import make_demo_line

    if not spec.is_demo or (Path(data_path) / "train").is_dir():
        return False
    options = {**spec.demo, **(demo_options or {})}
    options.pop("line", None)
    print(f"[pipeline] making the synthetic demo line {spec.line!r} in {data_path}", file=sys.stderr, flush=True)
    make_demo_line(data_path, spec.line, **options)
    return True


# -- local runs ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _project_on_path() -> Iterator[None]:
    """Let the step subprocesses import ``components`` and ``redi`` from this checkout."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


_KFP_STATUS = re.compile(r"^[\d:.]+ - \w+ - (Task|Pipeline) .*(finished|status)")  # KFP's "Task 'x' finished ..."


class _StepOutput(io.TextIOBase):
    """Where the steps' output goes during a local run: all of it to a log file, and to the console
    only the stages' own lines (``[recover] epoch ...``), not KFP's executor JSON dumps."""

    def __init__(self, console: Any, log: Any) -> None:
        self.console, self.log, self.pending = console, log, ""

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            shown = line.strip()
            if (shown.startswith("[") and not shown.startswith("[KFP Executor")) or _KFP_STATUS.match(shown):
                self.console.write(shown + "\n")
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()


def new_run_tag() -> str:
    """A unique, sortable run id."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def read_status(workdir: str | Path, line: str, run_tag: str) -> dict[str, dict[str, Any]]:
    """The stage records of a run (stage -> record), as the components wrote them."""
    folder = Path(workdir) / line / "status" / run_tag
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def log_path(workdir: str | Path, line: str, run_tag: str) -> Path:
    """The full output (KFP's included) of a local run."""
    return Path(workdir) / line / "logs" / f"{run_tag}.log"


def run_local(arguments: dict[str, Any], verbose: bool = False) -> dict[str, Any]:
    """Run the pipeline with KFP's SubprocessRunner; return the stage records (raise :class:`PipelineError`).

    The steps' full output goes to :func:`log_path`; the console shows the stages' own lines
    (everything with ``verbose``).
    """
    from kfp import local

    workdir = Path(arguments["workdir"])
    line, run_tag = arguments["line"], arguments["run_tag"] or new_run_tag()
    arguments = {**arguments, "run_tag": run_tag}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"),
               workspace_root=str(workdir / "kfp-workspace"))
    log = log_path(workdir, line, run_tag)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as log_file, _project_on_path(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*base image.*")
        output = sys.stdout if verbose else _StepOutput(sys.stdout, log_file)
        try:
            with contextlib.redirect_stdout(output):
                line_pipeline(**arguments)
        except RuntimeError as exc:
            raise PipelineError(_failure_message(workdir, line, run_tag, exc)) from None
    return read_status(workdir, line, run_tag)


def _failure_message(workdir: Path, line: str, run_tag: str, exc: Exception) -> str:
    failed = [r for r in read_status(workdir, line, run_tag).values() if r.get("status") == "failed"]
    if failed:
        record = failed[0]
        where = f"stage {record['stage']!r}: {record['cause']}"
    else:  # the step died before its body ran (e.g. an import error): KFP's message names the task
        where = str(exc).replace("\x1b", "").strip()
    return (f"the pipeline for line {line!r} stopped at {where}\nFix the cause and run again: training resumes "
            f"from the checkpoints in {workdir / line / 'train'}; full log: {log_path(workdir, line, run_tag)}")


def summarize(line: str, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Where the run's results are: report, metrics, decision, promoted model, Bento."""
    gate_record = records.get("gate", {})
    bento = records.get("package_bento", {})
    evaluation = records.get("evaluate", {})
    return {"line": line, "promoted": bool(gate_record.get("promote")), "reasons": gate_record.get("reasons", []),
            "version": gate_record.get("version"), "report": evaluation.get("report"),
            "metrics": evaluation.get("metrics"),
            "scores": {k: evaluation.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")},
            "decision": gate_record.get("decision"), "store": gate_record.get("store"),
            "version_prefix": gate_record.get("version_prefix"),
            "production_detector": gate_record.get("production_detector"),
            "production_version": gate_record.get("production_version"),
            "bento": bento.get("bento_tag"), "bento_model": bento.get("model_tag"),
            "bentoml_home": bento.get("bentoml_home"), "stages": records}


def print_summary(summary: dict[str, Any]) -> None:
    """The lines a user reads at the end of a run."""
    verdict = "PROMOTED" if summary["promoted"] else "NOT PROMOTED"
    print(f"line {summary['line']}: model {summary['version']} {verdict}: {'; '.join(summary['reasons'])}")
    print(f"report: {summary['report']}")
    print(f"metrics: {json.dumps(summary['scores'])}")
    print(f"decision: {summary['decision']}")
    print(f"stored versions: {summary['version_prefix']}")
    if summary["promoted"]:
        print(f"promoted model: {summary['production_detector']}")
        print(f"bento: {summary['bento']} (model {summary['bento_model']}, BENTOML_HOME={summary['bentoml_home']})")
    else:
        current = summary["production_version"]
        print(f"promoted model: none from this run; production stays at {current or 'nothing (no model yet)'}")
        print("bento: not built (nothing promoted)")


def run_line_pipeline(line: str, profile: str = "tiny", workdir: str | Path = DEFAULT_WORKDIR,
                      overrides: list[str] | None = None, data_revision: str | None = None,
                      data_repo: str | None = None, data_path: str | None = None,
                      gate_overrides: dict[str, float] | None = None, lines_dir: str | Path | None = None,
                      demo_options: dict[str, Any] | None = None, bentoml_home: str = "",
                      config_file: str | Path | None = None, quiet: bool = False,
                      verbose: bool = False) -> dict[str, Any]:
    """Run one line's pipeline locally (KFP SubprocessRunner) and print where the results are.

    Makes the SYNTHETIC demo data first when the line is a demo line and its folder is missing.

    Args:
        line: a line name (``pipelines/lines/<line>.yaml``) or a line config file's path.
        profile: config profile; None takes the line file's.
        workdir: persistent folder: data of demo lines, checkpoints, step outputs, local store, Bento store.
        overrides: ``section.key=value`` config settings on top of the line file's.
        data_revision, data_repo, data_path: override the line file's data source.
        gate_overrides: e.g. ``{"min_image_auroc": 0.9, "tolerance": 0.0}``.
        demo_options: ``make_demo_line`` arguments (e.g. ``{"n_train": 12, "size": 128}``).
        bentoml_home: BentoML store; default ``BENTOML_HOME`` or ``<workdir>/bentoml``.
        config_file: a redi config file whose settings go over the line file's (under ``overrides``).
        quiet: print no summary; verbose: show KFP's full step output (always in the run's log file).

    Returns:
        :func:`summarize`'s dict (``promoted``, ``reasons``, ``report``, ``production_detector``,
        ``bento``, ``stages``, ...).

    Raises:
        PipelineError: a stage failed (the message names it and the cause).
    """
    spec = load_line(line, lines_dir)
    workdir = Path(workdir).resolve()
    arguments = pipeline_arguments(spec, workdir, profile, overrides, data_revision, data_repo, data_path,
                                   gate_overrides, new_run_tag(), bentoml_home, config_file)
    if not arguments["data_repo"]:
        ensure_demo_data(spec, arguments["data_path"], demo_options)
    started = time.perf_counter()
    summary = summarize(spec.line, run_local(arguments, verbose))
    summary.update({"run_tag": arguments["run_tag"], "seconds": round(time.perf_counter() - started, 1),
                    "arguments": arguments, "log": str(log_path(workdir, spec.line, arguments["run_tag"]))})
    if not quiet:
        print(f"pipeline run {arguments['run_tag']} of line {spec.line!r} ({arguments['profile']} profile"
              f"{', SYNTHETIC demo data' if spec.is_demo else ''}) took {summary['seconds']} s", file=sys.stderr)
        print_summary(summary)
        print(f"full log: {summary['log']}")
    return summary


def run_all_lines(profile: str | None = None, workdir: str | Path = DEFAULT_WORKDIR,
                  lines_dir: str | Path | None = None, keep_going: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Run every line of ``lines_dir`` in turn; a failed line is reported and (by default) the rest still run.

    Returns:
        line -> summary, or ``{"error": message}`` for a line that failed.
    """
    results: dict[str, Any] = {}
    for name in list_lines(lines_dir):
        try:
            results[name] = run_line_pipeline(name, profile, workdir, lines_dir=lines_dir, **kwargs)
        except RediError as exc:
            if not keep_going:
                raise
            print(f"line {name}: FAILED: {exc}", file=sys.stderr)
            results[name] = {"error": str(exc)}
    return results


# -- a cluster ----------------------------------------------------------------------------------
def submit(host: str, line: str, profile: str | None = None, workdir: str = "", overrides: list[str] | None = None,
           data_revision: str | None = None, data_repo: str | None = None, data_path: str | None = None,
           gate_overrides: dict[str, float] | None = None, experiment: str = "redi", namespace: str | None = None,
           package_path: str | Path | None = None, lines_dir: str | Path | None = None,
           config_file: str | Path | None = None, client: Any = None) -> dict[str, Any]:
    """Compile the pipeline and start a run of one line on a KFP endpoint (``kfp.Client(host=...)``).

    ``workdir`` is a path inside the step pods (a mounted volume) or "" for none (no resume). The
    data must be reachable from the cluster: a ``data_repo`` git URL with a DVC remote, or a path
    on a mounted volume.

    Returns:
        ``{"run_id", "host", "package", "arguments"}``.
    """
    import tempfile

    spec = load_line(line, lines_dir)
    arguments = pipeline_arguments(spec, workdir or ".", profile, overrides, data_revision, data_repo, data_path,
                                   gate_overrides, new_run_tag(), config_file=config_file)
    arguments["workdir"] = workdir  # paths in the pods, not resolved on this machine
    arguments["data_path"] = data_path or spec.data_path
    if not arguments["data_path"]:
        raise ConfigError(f"line {spec.line!r} is a demo line without a data path; on a cluster give --data-path "
                          f"(on a mounted volume) or --data-repo (a DVC repository)")
    package = Path(package_path) if package_path else Path(tempfile.mkdtemp()) / "line_pipeline.yaml"
    compile_pipeline(package)
    if client is None:
        import kfp

        client = kfp.Client(host=host, namespace=namespace)
    result = client.create_run_from_pipeline_package(str(package), arguments=arguments,
                                                     run_name=f"{spec.line}-{arguments['run_tag']}",
                                                     experiment_name=experiment, namespace=namespace)
    run_id = getattr(result, "run_id", None)
    print(f"submitted line {spec.line!r} to {host}: run {run_id}")
    return {"run_id": run_id, "host": host, "package": str(package), "arguments": arguments}
