"""The one stage table (redi/stages.py): every place that names a stage agrees with it."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from redi.cli.main import build_parser, main
from redi.core.config import PipelineStepsConfig, from_dict
from redi.core.errors import ConfigError
from redi.stages import STAGES, dvc_yaml_text, get_stage, stage_names

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_has_its_component_and_its_step_settings():
    assert [f.name for f in dataclasses.fields(PipelineStepsConfig)] == stage_names()
    defaults = PipelineStepsConfig()
    for stage in STAGES:  # the config holds the default resources; the row says the same of the accelerator
        assert getattr(defaults, stage.name).accelerator == stage.accelerator, stage.name
    for stage in STAGES:
        module = importlib.import_module(f"components.{stage.name}")
        assert hasattr(module, stage.name), f"components/{stage.name}.py defines no component {stage.name}"
        if stage.function:
            assert callable(stage.resolve())


def test_dvc_yaml_is_written_from_the_table():
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml_text(), "run `redi stages dvc --out dvc.yaml`"


def test_dvc_params_leave_out_only_the_parts_a_stage_never_reads():
    from redi.core.config import TrainConfig
    from redi.stages import Stage, dvc_params

    train_keys = {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}
    recover = dvc_params(get_stage("train_recover"))
    assert recover[:3] == ["profile", "data", "model"]
    assert set(recover[3:]) == train_keys - {"train.discriminate"}
    assert dvc_params(get_stage("validate_data")) == ["profile", "data"]
    for skips in (("train.no_such_part",), ("eval.batch_size",)):  # unknown, or outside what it reads
        with pytest.raises(ConfigError, match="skips"):
            dvc_params(Stage("x", "", "", reads=("data", "train"), dvc_skips=skips))


def test_every_dvc_stage_is_a_cli_command():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse keeps them here)
    for stage in STAGES:
        if stage.dvc:
            assert stage.command in commands


def test_the_compiled_pipeline_takes_caching_and_sections_from_the_table(tmp_path):
    import yaml

    from pipelines.line_pipeline import compile_pipeline

    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", "bottle_caps").read_text()))  # then k8s settings
    tasks = spec["root"]["dag"]["tasks"]
    for stage in STAGES:
        task = tasks.get(stage.command)
        if task is None:  # package_bento sits inside the "promoted" condition's own DAG
            assert stage.name == "package_bento"
            continue
        assert task.get("cachingOptions", {}).get("enableCache", False) == stage.cached, stage.name
        given = {name[:-len("_config")] for name in task["inputs"]["parameters"] if name.endswith("_config")}
        assert given == set(stage.reads) or stage.name == "gate", (stage.name, given)


def test_an_old_stage_name_works_and_names_the_new_one(tmp_path, capsys):
    from redi.data.demo import make_demo_line

    assert get_stage("precompute_hog", warn=False).name == "precompute_selfmaps"
    with pytest.raises(ConfigError, match="unknown stage"):
        get_stage("no_such_stage")
    data = tmp_path / "line"
    make_demo_line(data, "bottle_caps", n_train=4, n_test_good=1, n_test_defect=1, size=64, seed=0)
    assert main(["validate", str(data), "--out", str(tmp_path / "out"), "--profile", "tiny"]) == 0
    assert "now called 'validate_data'" in capsys.readouterr().err
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_old_step_names_in_a_line_file_still_configure_the_step(capsys):
    cfg = from_dict({"profile": "tiny", "pipeline": {"steps": {"precompute_hog": {"cpu_request": "3"}}}})
    assert cfg.pipeline.steps.precompute_selfmaps.cpu_request == "3"
    assert "pipeline.steps.precompute_hog is now pipeline.steps.precompute_selfmaps" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="both"):
        from_dict({"pipeline": {"steps": {"version_data": {}, "validate_data": {}}}})


def test_redi_stages_lists_the_table():
    out = subprocess.run([sys.executable, "-m", "redi.cli", "stages"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert [line.split()[0] for line in out.splitlines()] == stage_names()
