"""The per-product-line training pipeline: one Kubeflow pipeline, run locally or on a cluster.

DAG (every name is a component of ``components/``)::

    validate_data ─ snapshot_data ─┬─ precompute_selfmaps ────┐
    (never cached)  (cached)      ├─ build_prompt_bank ─ train_recover (GPU) ─ train_discriminate (GPU) ─┐
                                  └─ train_patchcore ─────────────────────────────────────── select_champion ─┬─ evaluate ──────┐
                                                                                                              └─ drift_reference ┴─ gate
                                                                                              if the gate promotes: package_bento

``train_patchcore`` and ``select_champion`` are there when the line has candidates
(``model.candidates``, :mod:`redi.workflow.champion`; the cpu and paper profiles' default is ReDi,
PatchCore and their fusion): the champion chosen on validation is what is evaluated, gated and
served. Without candidates ReDi's detector goes straight to ``evaluate``.

- :func:`build_pipeline` makes the pipeline of one line: its Kubernetes settings (object-store
  secret, data-source secret, resources, retries, accelerator, node selector, tolerations, work-dir
  volume, the image's digest) come from the line's config (``pipeline`` section) and are fixed at
  compile time;
- :func:`compile_pipeline` writes its YAML (``redi pipeline compile --line L``);
- :func:`run_line_pipeline` runs one line on this machine with KFP's local SubprocessRunner
  (the very same component definitions, with ``cluster_mode=False``) and says where things are;
- :func:`run_all_lines` runs every line of ``pipelines/lines/``;
- :func:`submit` starts a run on a KFP endpoint, :func:`schedule` a recurring run (the line's cron).

A product line is a redi config file ``pipelines/lines/<line>.yaml`` (the one schema of
``redi/core/config.py``: its ``line``, ``gate`` and ``pipeline`` sections, and any model settings).

Credentials: the object store's secret goes to the steps that use the store, the line's data secret
(``pipeline.data_secret``: git token, DVC remote keys) to the steps that fetch data, and to no other;
a ``data_repo`` with credentials written into it is refused (it would be recorded in the run's
parameters and the data manifest).

Caching: KFP keys a step on its component, its input parameter values and its input artifacts'
identities. No step takes a per-run value; each training step takes only the config sections its
stage reads. ``validate_data`` (never cached: a working copy or branch can change) measures the data's
content hash, and the cached ``snapshot_data`` turns (source, commit, hash) into the ``dataset``
artifact, so a rerun on the same data and settings reuses every finished step on a cluster.
Submitted and scheduled runs keep each step's compiled setting (kfp's ``enable_caching`` is left
None: a True there would make every scheduled run replay its first run's data and gate decision).
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
from pathlib import Path
from typing import Any, Callable, Iterator

from kfp import dsl, kubernetes

from components.build_prompt_bank import build_prompt_bank
from components.common import (DATA_SECRET_KEYS, REDI_IMAGE, RUN_TAG_ENV, S3_OPTIONAL, S3_SETTINGS, STATUS_ENV,
                               check_repo_url, pinned_image)
from components.drift_reference import drift_reference
from components.evaluate import evaluate
from components.gate import gate
from components.package_bento import package_bento
from components.precompute_selfmaps import precompute_selfmaps
from components.snapshot_data import snapshot_data
from components.select_champion import select_champion
from components.train_discriminate import train_discriminate
from components.train_patchcore import train_patchcore
from components.train_recover import train_recover
from components.validate_data import validate_data
from redi.core.config import RediConfig, StepConfig, from_dict, parse_overrides, read_config_file, to_dict
from redi.core.errors import ConfigError, RediError
from redi.stages import STAGES, get_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LINES_DIR = Path(__file__).resolve().parent / "lines"
PIPELINE_NAME = "redi-line"
DEFAULT_WORKDIR = "runs/pipeline"
MODEL_SECTIONS = ("data", "model", "train", "eval")  # the sections a step may be handed (as in dvc.yaml)
# from the stage table (redi.stages): steps whose outputs depend on more than their inputs, steps that
# read and write the object store (they get the store's secret), steps that keep checkpoints in the work dir
UNCACHED = tuple(s.name for s in STAGES if not s.cached)
STORE_STEPS = tuple(s.name for s in STAGES if s.store)
WORKDIR_STEPS = tuple(s.name for s in STAGES if s.workdir)
# the steps that fetch the line's data (components.common.fetch_dataset): the only ones given the data secret
DATA_STEPS = ("validate_data", "snapshot_data")


class PipelineError(RediError):
    """A pipeline run stopped; the message names the failed stage and its cause."""


# -- the line's settings ------------------------------------------------------------------------
def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def line_file(name_or_path: str | Path, lines_dir: str | Path | None = None) -> Path:
    """A line's config file, given its name (looked up in ``lines_dir``) or its path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(lines_dir or LINES_DIR) / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(list_lines(lines_dir))
        raise ConfigError(f"no line config {path}; known lines: {known or 'none'}; add pipelines/lines/<line>.yaml "
                          f"(a redi config file with a `line:` section)")
    return path


def load_line(name_or_path: str | Path, lines_dir: str | Path | None = None, profile: str | None = None,
              overrides: list[str] | None = None, config_file: str | Path | None = None) -> RediConfig:
    """A line's full config: the profile's defaults < the line file < ``config_file`` < ``overrides``.

    The profile is ``profile`` when given, else ``config_file``'s, else the line file's. The line's
    name (``line.name``) defaults to the file's name.
    """
    path = line_file(name_or_path, lines_dir)
    data = read_config_file(path)
    if config_file:
        data = _deep_merge(data, read_config_file(config_file))
    data = _deep_merge(data, parse_overrides(overrides or []))
    if profile:
        data["profile"] = profile
    try:
        cfg = from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"line config {path}: {exc}") from exc
    cfg.line.name = cfg.line.name or path.stem
    return cfg


def list_lines(lines_dir: str | Path | None = None) -> list[str]:
    """Names of every line with a config file."""
    return sorted(p.stem for p in Path(lines_dir or LINES_DIR).glob("*.yaml"))


def section_json(cfg: RediConfig, *names: str) -> str:
    """The named config sections, resolved, as canonical JSON (a step's cache-relevant settings).

    ``data.root`` is left out: each step sets it to its own copy of the dataset.
    """
    full = to_dict(cfg)
    picked = {name: full[name] for name in names}
    if "data" in picked:
        picked["data"] = {k: v for k, v in picked["data"].items() if k != "root"}
    return json.dumps(picked, sort_keys=True, separators=(",", ":"))


def pipeline_arguments(cfg: RediConfig, workdir: str | Path, data_revision: str | None = None,
                       data_repo: str | None = None, data_path: str | None = None, bentoml_home: str = "",
                       cluster_mode: bool = False, require_data: bool = True) -> dict[str, Any]:
    """The pipeline's parameters for a line's config (see :func:`build_pipeline`).

    Local runs (``cluster_mode=False``) resolve paths on this machine; cluster runs keep them as
    paths in the step pods.
    """
    source = cfg.line
    path = data_path if data_path is not None else source.data_path
    repo = check_repo_url(data_repo if data_repo is not None else source.data_repo)  # run parameters are recorded
    if not cluster_mode:
        workdir = str(Path(workdir).resolve()) if workdir else ""
        if repo and "://" not in repo and Path(repo).is_dir():
            repo = str(Path(repo).resolve())  # a local repository: the steps may run in another folder
        if not path and source.demo.enabled:
            path = str(Path(workdir or DEFAULT_WORKDIR) / "data" / source.name)
        elif path and not repo and not Path(path).is_absolute():
            path = str(Path(path).resolve())
    if not path and require_data:
        raise ConfigError(f"line {source.name!r} has no data path (line.data_path){' on a cluster' if cluster_mode else ''}"
                          f"; give --data-path (a folder on a mounted volume) or --data-repo and --data-path "
                          f"(a DVC repository){'; demo data is made only by local runs' if source.demo.enabled else ''}")
    return {"line": source.name, "data_path": path, "data_repo": repo,
            "data_revision": data_revision if data_revision is not None else source.data_revision,
            "profile": cfg.profile, **{f"{name}_config": section_json(cfg, name) for name in MODEL_SECTIONS},
            "config_json": section_json(cfg, *MODEL_SECTIONS, "gate"), "workdir": str(workdir or ""),
            "bentoml_home": bentoml_home, "cluster_mode": cluster_mode}


# -- the pipeline -------------------------------------------------------------------------------
def _apply_step_settings(task: dsl.PipelineTask, stage: str, cfg: RediConfig) -> dsl.PipelineTask:
    """The step's Kubernetes settings from the line's ``pipeline`` section (no effect in local runs)."""
    pipe = cfg.pipeline
    row = get_stage(stage)
    step: StepConfig = getattr(pipe.steps, stage)
    task.set_display_name(row.command).set_caching_options(row.cached)
    for value, setter in ((step.cpu_request, task.set_cpu_request), (step.memory_request, task.set_memory_request),
                          (step.cpu_limit, task.set_cpu_limit), (step.memory_limit, task.set_memory_limit)):
        if value:
            setter(value)
    if step.retries:
        task.set_retry(num_retries=step.retries, backoff_duration="30s", backoff_factor=2.0,
                       backoff_max_duration="600s")
    if step.accelerator and pipe.accelerator_type and pipe.accelerator_count:
        task.set_accelerator_type(pipe.accelerator_type).set_accelerator_limit(pipe.accelerator_count)
        for key, value in sorted(pipe.node_selector.items()):
            kubernetes.add_node_selector(task, key, value)
        for toleration in pipe.tolerations:
            kubernetes.add_toleration(task, **toleration)
    if row.store and pipe.store_secret:
        kubernetes.use_secret_as_env(task, pipe.store_secret, {k: k for k in S3_SETTINGS})
        kubernetes.use_secret_as_env(task, pipe.store_secret, {k: k for k in S3_OPTIONAL}, optional=True)
    if stage in DATA_STEPS and pipe.data_secret:  # every key optional: a line may need only a git token
        kubernetes.use_secret_as_env(task, pipe.data_secret, {k: k for k in DATA_SECRET_KEYS}, optional=True)
    image = step_image(cfg)
    if image != REDI_IMAGE:
        task.set_container_image(image)
    if row.workdir and pipe.workdir_pvc:
        kubernetes.mount_pvc(task, pipe.workdir_pvc, pipe.workdir_mount)
    return task


def step_image(cfg: RediConfig) -> str:
    """The image every step runs: ``REDI_IMAGE``, pinned by the line's ``pipeline.image_digest`` when set."""
    return pinned_image(REDI_IMAGE, cfg.pipeline.image_digest)


PIPELINE_METHODS = ("redi", "patchcore", "fused")  # candidates with a step here (fused: inside select_champion)


def build_pipeline(cfg: RediConfig) -> Callable[..., Any]:
    """The KFP pipeline of one line; its parameters default to the line's settings in cluster mode.

    Parameters (all overridable per run): ``line``, ``data_path``, ``data_repo``, ``data_revision``
    (the data's source), ``profile`` and ``<section>_config`` (the resolved config sections ``data``,
    ``model``, ``train``, ``eval``, JSON), ``config_json`` (those and ``gate``, for the gate), ``workdir``
    (checkpoints: the mounted volume's path, or "" for no resume), ``bentoml_home``, ``cluster_mode``
    (True: the object store must be configured; the local runner sets it False).
    """
    workdir = cfg.pipeline.workdir_mount if cfg.pipeline.workdir_pvc else ""
    d = pipeline_arguments(cfg, workdir, cluster_mode=True, require_data=False)
    unsupported = [name for name in cfg.model.candidates if name not in PIPELINE_METHODS]
    if unsupported:
        raise ConfigError(f"model.candidates {unsupported} have no pipeline step; the pipeline fits {PIPELINE_METHODS} "
                          f"(train other methods with `redi train`)")

    @dsl.pipeline(name=PIPELINE_NAME, description=f"redi line {cfg.line.name}: data version -> train -> "
                                                  f"evaluate -> gate -> package")
    def line_pipeline(line: str = d["line"], data_path: str = d["data_path"], data_repo: str = d["data_repo"],
                      data_revision: str = d["data_revision"], profile: str = d["profile"],
                      data_config: str = d["data_config"], model_config: str = d["model_config"],
                      train_config: str = d["train_config"], eval_config: str = d["eval_config"],
                      config_json: str = d["config_json"], workdir: str = d["workdir"],
                      bentoml_home: str = d["bentoml_home"], cluster_mode: bool = True):
        given = {"data": data_config, "model": model_config, "train": train_config, "eval": eval_config}

        def sections(stage: str) -> dict[str, str]:  # the profile and the config sections the stage reads
            return {"profile": profile, **{f"{name}_config": given[name] for name in get_stage(stage).reads}}

        data = validate_data(line=line, data_path=data_path, data_repo=data_repo, data_revision=data_revision,
                             **sections("validate_data"))
        _apply_step_settings(data, "validate_data", cfg)
        snap = snapshot_data(line=line, data_path=data_path, data_repo=data_repo,
                             revision=data.outputs["revision"], data_hash=data.outputs["data_hash"])
        _apply_step_settings(snap, "snapshot_data", cfg)
        dataset = snap.outputs["dataset"]
        maps = _apply_step_settings(precompute_selfmaps(line=line, dataset=dataset, **sections("precompute_selfmaps")),
                                    "precompute_selfmaps", cfg)
        bank = _apply_step_settings(build_prompt_bank(line=line, dataset=dataset, **sections("build_prompt_bank")),
                                    "build_prompt_bank", cfg)
        recover = train_recover(line=line, workdir=workdir, dataset=dataset, prompt_bank=bank.outputs["prompt_bank"],
                                selfmaps=maps.outputs["selfmaps"], **sections("train_recover"))
        _apply_step_settings(recover, "train_recover", cfg)
        disc = train_discriminate(line=line, workdir=workdir, dataset=dataset, prompt_bank=bank.outputs["prompt_bank"],
                                  recover=recover.outputs["recover"], **sections("train_discriminate"))
        _apply_step_settings(disc, "train_discriminate", cfg)
        detector = disc.outputs["detector"]
        if len(cfg.model.candidates) > 1:  # a memory-bank candidate beside ReDi; the champion serves
            patchcore = _apply_step_settings(train_patchcore(line=line, dataset=dataset,
                                                             **sections("train_patchcore")), "train_patchcore", cfg)
            chosen = _apply_step_settings(select_champion(line=line, dataset=dataset, redi_detector=detector,
                                                          patchcore_detector=patchcore.outputs["detector"],
                                                          **sections("select_champion")), "select_champion", cfg)
            detector = chosen.outputs["champion"]
        evaluation = _apply_step_settings(evaluate(line=line, dataset=dataset, detector=detector,
                                                   **sections("evaluate")), "evaluate", cfg)
        reference = _apply_step_settings(drift_reference(line=line, dataset=dataset, detector=detector,
                                                         **sections("drift_reference")), "drift_reference", cfg)
        decision = gate(line=line, profile=profile, config_json=config_json, workdir=workdir,
                        cluster_mode=cluster_mode, dataset=dataset, detector=detector,
                        evaluation=evaluation.outputs["evaluation"], manifest=data.outputs["manifest"],
                        reference=reference.outputs["reference"])
        _apply_step_settings(decision, "gate", cfg)
        with dsl.If(decision.outputs["Output"] == True, name="promoted"):  # noqa: E712 (a KFP expression)
            packaged = package_bento(line=line, workdir=workdir, bentoml_home=bentoml_home, cluster_mode=cluster_mode,
                                     decision=decision.outputs["decision"])
            _apply_step_settings(packaged, "package_bento", cfg)

    return line_pipeline


def compile_pipeline(out_path: str | Path = "pipelines/line_pipeline.yaml", line: str | Path = "bottle_caps",
                     lines_dir: str | Path | None = None, profile: str | None = None,
                     overrides: list[str] | None = None, config_file: str | Path | None = None,
                     cfg: RediConfig | None = None) -> Path:
    """Compile a line's pipeline to a KFP YAML package (works offline; the same line compiles to the same bytes)."""
    from kfp import compiler

    cfg = cfg or load_line(line, lines_dir, profile, overrides, config_file)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cfg), str(out_path))
    return out_path


def ensure_demo_data(cfg: RediConfig, data_path: str | Path, demo_options: dict[str, Any] | None = None) -> bool:
    """Make the line's SYNTHETIC demo data when the line is a demo line and the folder is missing."""
    from dataclasses import asdict

    from redi.data.demo import make_demo_line

    if not cfg.line.demo.enabled or (Path(data_path) / "train").is_dir():
        return False
    options = {**asdict(cfg.line.demo), **(demo_options or {})}
    options.pop("enabled", None)
    options.pop("line", None)
    print(f"[pipeline] making the synthetic demo line {cfg.line.name!r} in {data_path}", file=sys.stderr, flush=True)
    make_demo_line(data_path, cfg.line.name, **options)
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


def status_folder(workdir: str | Path, line: str, run_tag: str) -> Path:
    """Where a local run's steps record their results (``REDI_STATUS_DIR`` of its step subprocesses)."""
    return Path(workdir) / line / "status" / run_tag


def read_status(workdir: str | Path, line: str, run_tag: str) -> dict[str, dict[str, Any]]:
    """The stage records of a local run (stage -> record), as the components wrote them."""
    folder = status_folder(workdir, line, run_tag)
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def log_path(workdir: str | Path, line: str, run_tag: str) -> Path:
    """The full output (KFP's included) of a local run."""
    return Path(workdir) / line / "logs" / f"{run_tag}.log"


@contextlib.contextmanager
def _run_environment(workdir: Path, line: str, run_tag: str) -> Iterator[None]:
    """The run tag and status folder for the step subprocesses (they inherit this environment); not step
    inputs, so they never enter a step's cache key."""
    values = {RUN_TAG_ENV: run_tag, STATUS_ENV: str(status_folder(workdir, line, run_tag))}
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_local(cfg: RediConfig, arguments: dict[str, Any], run_tag: str = "", verbose: bool = False) -> dict[str, Any]:
    """Run the line's pipeline with KFP's SubprocessRunner; return the stage records (raise :class:`PipelineError`).

    The steps' full output goes to :func:`log_path`; the console shows the stages' own lines
    (everything with ``verbose``). KFP's local runner has no caching, retries or resource settings:
    those take effect on a cluster.
    """
    from kfp import local

    workdir = Path(arguments["workdir"])
    line, run_tag = arguments["line"], run_tag or new_run_tag()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"),
               workspace_root=str(workdir / "kfp-workspace"))
    log = log_path(workdir, line, run_tag)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as log_file, _project_on_path(), _run_environment(workdir, line, run_tag), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*base image.*")
        output = sys.stdout if verbose else _StepOutput(sys.stdout, log_file)
        try:
            with contextlib.redirect_stdout(output):
                build_pipeline(cfg)(**{**arguments, "cluster_mode": False})
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
            "data_hash": records.get("validate_data", {}).get("data_hash"),
            "bento": bento.get("bento_tag"), "bento_model": bento.get("model_tag"),
            "bento_uri": bento.get("bento_uri"), "bentoml_home": bento.get("bentoml_home"),
            "champion": records.get("select_champion", {}).get("champion"),
            "candidate_scores": records.get("select_champion", {}).get("scores"), "stages": records}


def print_summary(summary: dict[str, Any]) -> None:
    """The lines a user reads at the end of a run."""
    verdict = "PROMOTED" if summary["promoted"] else "NOT PROMOTED"
    print(f"line {summary['line']}: model {summary['version']} {verdict}: {'; '.join(summary['reasons'])}")
    print(f"report: {summary['report']}")
    if summary.get("champion"):
        print(f"champion: {summary['champion']} (validation selection scores {json.dumps(summary['candidate_scores'])})")
    print(f"metrics: {json.dumps(summary['scores'])}")
    print(f"decision: {summary['decision']}")
    print(f"stored versions: {summary['version_prefix']}")
    if summary["promoted"]:
        print(f"promoted model: {summary['production_detector']}")
        print(f"bento: {summary['bento']} (model {summary['bento_model']}, BENTOML_HOME={summary['bentoml_home']}; "
              f"exported to {summary['bento_uri']})")
        print(f"serve it live (follows the production pointer): {_serve_hint(summary['production_detector'])}")
        print(f"or serve the pinned Bento: BENTOML_HOME={summary['bentoml_home']} bentoml serve {summary['bento']} "
              f"--port 3000")
    else:
        current = summary["production_version"]
        print(f"promoted model: none from this run; production stays at {current or 'nothing (no model yet)'}")
        print("bento: not built (nothing promoted)")


def _serve_hint(production_detector: str) -> str:
    """The command that serves the store this run promoted into."""
    store = ("REDI_S3_* as for this run" if str(production_detector).startswith("s3://")
             else f"REDI_STORE_DIR={Path(production_detector).parents[4]}")  # <root>/lines/L/versions/V/detector.pt
    # the service refuses to start without a real API key and a review-session secret (docs/serving.md)
    secrets = ('REDI_API_KEY=$(python -c "import secrets; print(secrets.token_urlsafe(32))") '
               'REDI_SESSION_SECRET=$(python -c "import secrets; print(secrets.token_urlsafe(48))")')
    return f"{store} {secrets} bentoml serve serving.service:RediService --port 3000"


def _gate_settings(gate_overrides: dict[str, float] | None) -> list[str]:
    return [f"gate.{key}={value}" for key, value in (gate_overrides or {}).items()]


def run_line_pipeline(line: str, profile: str | None = None, workdir: str | Path = DEFAULT_WORKDIR,
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
        overrides: ``section.key=value`` settings on top of the line file's (any section, ``gate`` included).
        data_revision, data_repo, data_path: override the line's data source.
        gate_overrides: e.g. ``{"min_image_auroc": 0.9, "tolerance": 0.0}`` (same as ``gate.*`` overrides).
        demo_options: ``make_demo_line`` arguments (e.g. ``{"n_train": 12, "size": 128}``).
        bentoml_home: BentoML store; default ``BENTOML_HOME`` or ``<workdir>/bentoml``.
        config_file: a redi config file whose settings go over the line file's (under ``overrides``).
        quiet: print no summary; verbose: show KFP's full step output (always in the run's log file).

    Returns:
        :func:`summarize`'s dict (``promoted``, ``reasons``, ``report``, ``production_detector``,
        ``bento``, ``stages``, ...), with ``run_tag``, ``seconds``, ``arguments``, ``log``.

    Raises:
        PipelineError: a stage failed (the message names it and the cause).
    """
    cfg = load_line(line, lines_dir, profile, [*(overrides or []), *_gate_settings(gate_overrides)], config_file)
    workdir = Path(workdir).resolve()
    arguments = pipeline_arguments(cfg, workdir, data_revision, data_repo, data_path, bentoml_home)
    if not arguments["data_repo"]:
        ensure_demo_data(cfg, arguments["data_path"], demo_options)
    run_tag = new_run_tag()
    started = time.perf_counter()
    summary = summarize(cfg.line.name, run_local(cfg, arguments, run_tag, verbose))
    summary.update({"run_tag": run_tag, "seconds": round(time.perf_counter() - started, 1), "arguments": arguments,
                    "log": str(log_path(workdir, cfg.line.name, run_tag))})
    if not quiet:
        print(f"pipeline run {run_tag} of line {cfg.line.name!r} ({cfg.profile} profile"
              f"{', SYNTHETIC demo data' if cfg.line.demo.enabled and not arguments['data_repo'] else ''}) "
              f"took {summary['seconds']} s", file=sys.stderr)
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
def _cluster_arguments(cfg: RediConfig, workdir: str | None, data_revision: str | None, data_repo: str | None,
                       data_path: str | None) -> dict[str, Any]:
    """Parameters of a cluster run: paths in the step pods, not resolved on this machine."""
    if workdir is None:
        workdir = cfg.pipeline.workdir_mount if cfg.pipeline.workdir_pvc else ""
    return pipeline_arguments(cfg, workdir, data_revision, data_repo, data_path, cluster_mode=True)


def _client(host: str, cfg: RediConfig, namespace: str | None, client: Any) -> tuple[Any, str]:
    host = host or cfg.pipeline.kfp_host
    if not host:
        raise ConfigError(f"no KFP endpoint for line {cfg.line.name!r}: give --host or set pipeline.kfp_host "
                          f"in the line's config")
    if client is None:
        import kfp

        client = kfp.Client(host=host, namespace=namespace or cfg.pipeline.namespace or None)
    return client, host


def _package(cfg: RediConfig, package_path: str | Path | None) -> Path:
    import tempfile

    package = Path(package_path) if package_path else Path(tempfile.mkdtemp()) / f"{cfg.line.name}.yaml"
    return compile_pipeline(package, cfg=cfg)


def submit(host: str, line: str, profile: str | None = None, workdir: str | None = None,
           overrides: list[str] | None = None, data_revision: str | None = None, data_repo: str | None = None,
           data_path: str | None = None, gate_overrides: dict[str, float] | None = None,
           experiment: str | None = None, namespace: str | None = None, package_path: str | Path | None = None,
           lines_dir: str | Path | None = None, config_file: str | Path | None = None,
           client: Any = None) -> dict[str, Any]:
    """Compile the line's pipeline and start one run on a KFP endpoint (``kfp.Client(host=...)``).

    ``host`` "" takes the line's ``pipeline.kfp_host``. ``workdir`` is a path inside the step pods
    (default: the line's ``pipeline.workdir_mount`` when it mounts ``pipeline.workdir_pvc``, else ""
    for no resume). The data must be reachable from the cluster: a ``data_repo`` git URL with a DVC
    remote, or a path on a mounted volume. Typical use from CI on a data commit:
    ``redi pipeline submit --line L --revision $(git rev-parse HEAD)``.

    Returns:
        ``{"run_id", "host", "package", "arguments"}``.
    """
    cfg = load_line(line, lines_dir, profile, [*(overrides or []), *_gate_settings(gate_overrides)], config_file)
    arguments = _cluster_arguments(cfg, workdir, data_revision, data_repo, data_path)
    client, host = _client(host, cfg, namespace, client)
    package = _package(cfg, package_path)
    run_name = f"{cfg.line.name}-{(arguments['data_revision'] or 'working-copy')[:12]}-{new_run_tag()}"
    result = client.create_run_from_pipeline_package(str(package), arguments=arguments, run_name=run_name,
                                                     experiment_name=experiment or cfg.pipeline.experiment,
                                                     namespace=namespace or cfg.pipeline.namespace or None)
    run_id = getattr(result, "run_id", None)
    print(f"submitted line {cfg.line.name!r} to {host}: run {run_id} ({cfg.profile} profile, data revision "
          f"{arguments['data_revision'] or 'as configured'})")
    return {"run_id": run_id, "host": host, "package": str(package), "arguments": arguments}


def schedule(host: str, line: str, cron: str | None = None, profile: str | None = None, workdir: str | None = None,
             overrides: list[str] | None = None, data_repo: str | None = None, data_path: str | None = None,
             experiment: str | None = None, namespace: str | None = None, package_path: str | Path | None = None,
             lines_dir: str | Path | None = None, config_file: str | Path | None = None,
             client: Any = None) -> dict[str, Any]:
    """Create the line's recurring run on a KFP endpoint (``kfp.Client.create_recurring_run``).

    The schedule is ``cron`` or the line's ``pipeline.schedule`` (6 fields, seconds first, as KFP
    reads them). Each scheduled run fetches the line's configured data revision ("" = the newest
    commit of a git URL, as ``dvc get`` without ``--rev`` does); caching makes a run on unchanged data
    and settings reuse the finished steps.

    Caching stays per step, as compiled from the stage table: kfp's ``enable_caching=True`` (or False)
    would overwrite every task's setting, so the uncached ``validate_data`` and gate would replay the
    first run's data and decision in every scheduled run. It is left None, as :func:`submit` does.

    Returns:
        ``{"recurring_run_id", "host", "cron", "package", "arguments"}``.
    """
    cfg = load_line(line, lines_dir, profile, overrides, config_file)
    if cron is not None:
        cfg = from_dict({**to_dict(cfg), "pipeline": {**to_dict(cfg)["pipeline"], "schedule": cron}})
    if not cfg.pipeline.schedule:
        raise ConfigError(f"line {cfg.line.name!r} has no schedule: set pipeline.schedule (e.g. '0 0 3 * * 0') "
                          f"or give --cron")
    arguments = _cluster_arguments(cfg, workdir, None, data_repo, data_path)
    client, host = _client(host, cfg, namespace, client)
    package = _package(cfg, package_path)
    experiment_name = experiment or cfg.pipeline.experiment
    found = client.create_experiment(experiment_name, namespace=namespace or cfg.pipeline.namespace or None)
    recurring = client.create_recurring_run(
        experiment_id=getattr(found, "experiment_id", None), job_name=f"{cfg.line.name}-scheduled",
        description=f"redi line {cfg.line.name}, {cfg.profile} profile, cron {cfg.pipeline.schedule}",
        cron_expression=cfg.pipeline.schedule, max_concurrency=1, no_catchup=True, params=arguments,
        pipeline_package_path=str(package), enable_caching=None)  # None: each step keeps its own setting (docstring)
    recurring_id = getattr(recurring, "recurring_run_id", None)
    print(f"scheduled line {cfg.line.name!r} on {host}: recurring run {recurring_id}, cron {cfg.pipeline.schedule!r}")
    return {"recurring_run_id": recurring_id, "host": host, "cron": cfg.pipeline.schedule, "package": str(package),
            "arguments": arguments}
