"""The one table of pipeline stages: a stage is one row, with one name everywhere.

The name of a row is the stage's function, its KFP component (``components/<name>.py`` defining
``<name>``) and pipeline step, its entry in the line config's ``pipeline.steps`` (where its default
resources live: the config is the one source of defaults), its DVC stage in ``dvc.yaml``, and,
with ``_`` written ``-``, its ``redi`` sub-command. What is derived from the row:

- the pipeline's step settings (:mod:`pipelines.line_pipeline`): caching, the object store's
  secret, the work-dir volume (the accelerator is the line's ``pipeline.steps`` setting, whose
  default this row states: a line may turn it off);
- the config sections each step is handed (``reads``), which are its KFP cache key and its DVC
  ``params:``; ``dvc.yaml`` is written from this table (``redi stages dvc``, checked in CI);
- the CLI's stage sub-commands, with the old names still accepted (``aliases``) and a note that
  says the new one.

A new stage is a function, its row here, and its component (three files); a new method brings its
own fit stages in its folder (e.g. :mod:`redi.methods.redi.fit`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from redi.core.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One pipeline stage."""

    name: str
    summary: str
    function: str  # "module:attribute", imported on use (the training code is heavy)
    reads: tuple[str, ...] = ()  # config sections its function reads (profile always)
    cached: bool = True  # KFP may reuse its outputs: they depend only on its inputs
    store: bool = False  # reads and writes the object store: its step gets the store's secret
    workdir: bool = False  # keeps resumable checkpoints in the line's work dir (the PVC on a cluster)
    accelerator: bool = False  # by default on the line's GPU node (pipeline.steps.<name>.accelerator decides)
    dvc: bool = True  # a DVC stage of dvc.yaml (dvc.yaml says why the others are not)
    # parts of `reads` its function never reads: left out of its DVC `params:`, so changing them
    # does not rerun it (its KFP step is still handed the whole section: KFP caches per section)
    dvc_skips: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # old names (CLI, DVC, pipeline.steps), accepted with a note

    @property
    def command(self) -> str:
        """The ``redi`` sub-command."""
        return self.name.replace("_", "-")

    def resolve(self) -> Callable[..., Any]:
        """The stage's function (a KFP-only step has none here: it is its component)."""
        import importlib

        if not self.function:
            raise ConfigError(f"stage {self.name!r} runs only as a KFP step (components/{self.name}.py)")
        module, attribute = self.function.split(":")
        return getattr(importlib.import_module(module), attribute)


STAGES: tuple[Stage, ...] = (
    Stage("validate_data", "check every image and mask of a line; write manifest.json",
          "redi.workflow.stages:validate_data", reads=("data",), cached=False, aliases=("validate", "version_data")),
    Stage("snapshot_data", "turn (source, commit, content hash) into the dataset artifact (a KFP step only)",
          "", dvc=False),
    Stage("precompute_selfmaps", "cache the training images' self-generated maps",
          "redi.methods.redi.fit:precompute_selfmaps", reads=("data", "model", "train"),
          dvc_skips=("train.recover", "train.discriminate"), aliases=("selfmaps", "precompute_hog")),
    Stage("build_prompt_bank", "embed the normal training images into a prompt bank",
          "redi.methods.redi.fit:build_prompt_bank", reads=("data", "model", "train", "eval"),
          dvc_skips=("train.recover", "train.discriminate"), aliases=("prompt-bank",)),
    # not eval: a new threshold policy must not retrain the recover net (it reads only eval.batch_size,
    # a speed setting, which then comes from the profile)
    Stage("train_recover", "train the recover net (HIP)", "redi.methods.redi.fit:train_recover",
          reads=("data", "model", "train"), dvc_skips=("train.discriminate",), workdir=True, accelerator=True),
    Stage("train_discriminate", "train the discriminate net, calibrate the threshold, write detector.pt",
          "redi.methods.redi.fit:train_discriminate", reads=("data", "model", "train", "eval"),
          dvc_skips=("train.recover",), workdir=True, accelerator=True),
    Stage("train_patchcore", "fit the memory-bank candidate (PatchCore), calibrate, write detector.pt",
          "redi.methods.patchcore.method:train_patchcore", reads=("data", "model", "train", "eval"),
          dvc_skips=("train.recover", "train.discriminate")),
    Stage("select_champion", "build the combined candidates, measure every candidate on validation, keep the best",
          "redi.workflow.champion:champion_stage", reads=("data", "model", "train", "eval"),
          dvc_skips=("train.recover", "train.discriminate")),
    Stage("evaluate", "score the test split at the served threshold: metrics.json and an HTML report",
          "redi.workflow.stages:evaluate", reads=("data", "model", "train", "eval"),
          dvc_skips=("train.recover", "train.discriminate")),
    Stage("drift_reference", "the monitoring rows of a line's normal training images",
          "redi.ops.monitoring:build_reference", reads=("data", "model", "train", "eval"), dvc=False),
    Stage("gate", "compare the candidate with production at the served thresholds; promote or refuse",
          "redi.ops.gate:gate_model", reads=("data", "model", "train", "eval", "gate"), cached=False, store=True,
          dvc=False),
    Stage("package_bento", "build a Bento of the lines' production models and keep it in the object store",
          "redi.ops.packaging:build_production_bento", cached=False, store=True, dvc=False),
)

_BY_NAME = {stage.name: stage for stage in STAGES}
_OLD_NAMES = {alias: stage.name for stage in STAGES for alias in stage.aliases}


def stage_names() -> list[str]:
    """Every stage, in pipeline order."""
    return [stage.name for stage in STAGES]


def get_stage(name: str, warn: bool = True) -> Stage:
    """The stage ``name``; an old name works and says the new one; an unknown one is a ConfigError."""
    key = name.replace("-", "_")
    if key in _BY_NAME:
        return _BY_NAME[key]
    new = _OLD_NAMES.get(name) or _OLD_NAMES.get(key)
    if new:
        if warn:
            print(f"note: stage {name!r} is now called {new!r}; the old name still works for now", file=sys.stderr)
        return _BY_NAME[new]
    raise ConfigError(f"unknown stage {name!r}; the stages are {stage_names()}")


def dvc_params(stage: Stage) -> list[str]:
    """A DVC stage's ``params:``: ``profile`` and the sections its function reads; a section with a
    skipped part (:attr:`Stage.dvc_skips`) is listed key by key, every key of the schema but those."""
    import dataclasses

    from redi.core.config import RediConfig

    stray = [skip for skip in stage.dvc_skips if skip.split(".", 1)[0] not in stage.reads]
    if stray:
        raise ConfigError(f"stage {stage.name!r} skips {stray}, outside the sections it reads {list(stage.reads)}")
    params = ["profile"]
    for section in stage.reads:
        skipped = {skip.split(".", 1)[1] for skip in stage.dvc_skips if skip.startswith(section + ".")}
        if not skipped:
            params.append(section)
            continue
        keys = [f.name for f in dataclasses.fields(getattr(RediConfig(), section))]
        unknown = skipped - set(keys)
        if unknown:
            raise ConfigError(f"stage {stage.name!r} skips {sorted(unknown)}, which {section!r} does not have")
        params += [f"{section}.{key}" for key in keys if key not in skipped]
    return params


# The demo line's data, made by a DVC stage before the table's stages (in the Kubeflow pipeline
# validate_data makes it when the line's `line.demo.enabled` is on, so it is no row of the table).
DEMO_DATA_KEYS = ("n_train", "n_test_good", "n_test_defect", "size", "seed")
DEMO_LINE = "bottle_caps"


def _demo_data_stage(data_root: str) -> dict[str, Any]:
    sizes = " ".join(f"--{key.replace('_', '-')} ${{line.demo.{key}}}" for key in DEMO_DATA_KEYS)
    return {"cmd": f"redi demo-data {data_root} --line {DEMO_LINE} {sizes}",
            "params": [f"line.demo.{key}" for key in DEMO_DATA_KEYS], "outs": [data_root]}


def dvc_plots(runs: str = "runs/dvc") -> list[dict[str, Any]]:
    """``dvc.yaml``'s top-level ``plots:``: the curves ``evaluate`` writes to ``eval/plots/``
    (:func:`redi.workflow.report.write_curve_data`), for ``dvc plots show`` and ``dvc plots diff``."""
    data = f"{runs}/eval/plots"
    return [
        {"image ROC (test)": {"x": "fpr", "y": {f"{data}/roc.csv": "tpr"}, "x_label": "false-alarm rate",
                              "y_label": "recall", "template": "simple"}},
        {"image precision-recall (test)": {"x": "recall", "y": {f"{data}/pr.csv": "precision"},
                                           "x_label": "recall", "y_label": "precision", "template": "simple"}},
        {"pixel PRO up to eval.max_fpr (test)": {"x": "fpr", "y": {f"{data}/pro.csv": "pro"},
                                                 "x_label": "pixel false-positive rate",
                                                 "y_label": "per-region overlap", "template": "simple"}},
        {"operating point: false calls vs escapes (validation and test)": {
            "x": "false_call_rate", "y": {f"{data}/tradeoff_validation.csv": "escape_rate",
                                          f"{data}/tradeoff_test.csv": "escape_rate"},
            "x_label": "false-call rate (good parts flagged)", "y_label": "escape rate (defects passed)",
            "template": "simple"}},
    ]


def dvc_yaml(data_root: str = "${data.root}", runs: str = "runs/dvc") -> dict[str, Any]:
    """``dvc.yaml`` as written from this table: the demo data stage, then every DVC row, its
    ``params:`` from :func:`dvc_params`, then the plots. Each row runs ``redi <command> ...
    --config params.yaml``, so DVC and the pipeline call the same function."""
    manifest = f"{runs}/data/manifest.json"
    bank, selfmaps, train = f"{runs}/prompt_bank.pt", f"{runs}/selfmaps/selfmaps.pt", f"{runs}/train"
    recover, detector = f"{train}/recover.pt", f"{train}/detector.pt"
    patchcore, champion = f"{runs}/patchcore/detector.pt", f"{runs}/champion"
    wiring: dict[str, dict[str, Any]] = {  # the arguments, inputs and outputs of each DVC stage
        "validate_data": {"args": f"{data_root} --out {runs}/data", "deps": [data_root],
                          "outs": [manifest, f"{runs}/data/rejected.json"]},
        "precompute_selfmaps": {"args": f"{data_root} --out {runs}/selfmaps", "deps": [data_root, manifest],
                                "outs": [selfmaps]},
        "build_prompt_bank": {"args": f"{data_root} --out {bank}", "deps": [data_root, manifest], "outs": [bank]},
        "train_recover": {"args": f"{data_root} --bank {bank} --selfmaps {selfmaps} --out {train}",
                          "deps": [data_root, bank, selfmaps], "outs": [recover]},
        "train_discriminate": {"args": f"{data_root} --bank {bank} --recover {recover} --out {train}",
                               "deps": [data_root, bank, recover], "outs": [detector]},
        "train_patchcore": {"args": f"{data_root} --out {runs}/patchcore", "deps": [data_root, manifest],
                            "outs": [patchcore]},
        "select_champion": {"args": f"{data_root} --candidate redi={detector} --candidate patchcore={patchcore} "
                                    f"--out {champion}", "deps": [data_root, detector, patchcore], "outs": [champion]},
        "evaluate": {"args": f"{champion}/detector.pt {data_root} --out {runs}/eval", "deps": [data_root, champion],
                     "outs": [f"{runs}/eval/report", f"{runs}/eval/scores.json", f"{runs}/eval/plots"],
                     "metrics": [f"{runs}/eval/metrics.json"]},
    }
    stages: dict[str, Any] = {"demo_data": _demo_data_stage(data_root)}
    for stage in STAGES:
        if stage.dvc:
            wired = wiring[stage.name]
            stages[stage.name] = {"cmd": f"redi {stage.command} {wired['args']} --config params.yaml",
                                  "deps": wired["deps"], "params": dvc_params(stage), "outs": wired["outs"],
                                  **({"metrics": wired["metrics"]} if "metrics" in wired else {})}
    return {"stages": stages, "plots": dvc_plots(runs)}


DVC_HEADER = """\
# Written from the stage table (redi/stages.py) by `redi stages dvc --out dvc.yaml`; edit the table,
# not this file (CI checks they agree). Run from the repository root with the venv active:
#   dvc repro                      run what changed (a fresh clone: every stage, ~3 min of CPU on 2 cores)
#   dvc metrics show / dvc metrics diff       runs/dvc/eval/metrics.json, now against the last commit
#   dvc plots show / dvc plots diff           ROC, PR, PRO and the operating-point curve (HTML)
#   dvc exp run -S train.discriminate.epochs=30   one experiment; `dvc exp show` compares them
# demo_data makes the SYNTHETIC demo line (`line.demo` sizes); for a real line, `dvc remove
# demo_data`, `dvc add` the line's folder and set data.root.
# Then the Kubeflow pipeline's data and training stages, each calling the `redi` CLI (the same
# functions as the pipeline's steps) with params.yaml as its config file. Each stage's `params:` are
# the config sections its function reads, less the parts it never reads (a discriminate setting does
# not rerun the recover net; KFP's cache key is the whole section). The redi code is not a dependency:
# after changing it, `dvc repro --force` (or `-f STAGE`). Not here: snapshot_data (a KFP artifact of
# the data's commit; in DVC that is the git commit itself), drift_reference, gate and package_bento:
# they read and move the line's production model in the object store (a plant's shared state, not a
# file of this workspace), so they run only in the pipeline (`redi pipeline run`).
# dvc.lock is committed for the demo line (tiny profile). Measured on one machine: two fresh clones
# gave the same demo data and manifest hashes (tests/test_dvc.py checks them against this lock) and
# byte-equal self-maps and prompt bank; the trained files hold their training times and the recover
# net's precision is picked by timing the CPU (model.recover.precision: auto), so the hashes from
# train_recover on change with every run. So `dvc repro` on a fresh clone runs every stage (the
# outputs are not in git) and leaves new model hashes in dvc.lock: commit them with your results.
# Checkpoints in runs/dvc/train/checkpoints are not DVC outputs, so an interrupted `dvc repro`
# resumes training where it stopped.
"""


def dvc_yaml_text() -> str:
    """The text of ``dvc.yaml``: :data:`DVC_HEADER` and :func:`dvc_yaml`."""
    import yaml

    return DVC_HEADER + yaml.safe_dump(dvc_yaml(), sort_keys=False, width=200)
