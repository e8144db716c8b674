"""The config schema: profiles, YAML round trip, overrides, and clear errors."""

from pathlib import Path

import pytest

from redi.core.config import PROFILES, load_config, profile_config, save_config, to_dict
from redi.core.errors import ConfigError


def test_paper_profile_has_the_papers_schedule():
    cfg = profile_config("paper")
    assert (cfg.train.recover.epochs, cfg.train.recover.lr, cfg.train.recover.milestones) == (500, 5e-4, [200, 400])
    assert (cfg.train.discriminate.epochs, cfg.train.discriminate.lr) == (300, 5e-3)
    assert cfg.train.discriminate.milestones == [100, 200]
    assert cfg.train.recover.batch_size == cfg.train.discriminate.batch_size == 32
    assert cfg.data.image_size == 256 and cfg.model.selfmap.hog_orientations == 9 and cfg.model.selfmap.hog_cell == 8
    assert cfg.train.lambda_m == cfg.train.lambda_s == 1.0


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_validates_and_round_trips(name, tmp_path: Path):
    cfg = profile_config(name).validate()
    save_config(cfg, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(cfg)


def test_file_then_overrides_then_profile_precedence(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("profile: tiny\ntrain:\n  seed: 5\nmodel:\n  prompt: none\n")
    cfg = load_config(tmp_path / "c.yaml", overrides=["train.seed=7", "model.recover.enabled=false",
                                                       "train.recover.milestones=[1,2]"])
    assert cfg.profile == "tiny" and cfg.train.seed == 7 and cfg.model.prompt == "none"
    assert cfg.model.recover.enabled is False and cfg.train.recover.milestones == [1, 2]
    assert load_config(tmp_path / "c.yaml", profile="cpu").profile == "cpu"


@pytest.mark.parametrize("override, words", [
    (["model.backbon=x"], "unknown config key 'model.backbon'"),
    (["model.prompt=maybe"], "model.prompt must be one of"),
    (["train.seed=abc"], "cannot read 'abc'"),
    (["data.image_size=100"], "multiple of 32"),
    (["data.val_fraction=0"], "held-out normal images set the decision threshold"),
    (["noequals"], "section.key=value"),
])
def test_bad_settings_get_clear_errors(override, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_config(profile="tiny", overrides=override)


def test_missing_and_invalid_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "bad.yaml")


def test_operations_sections_have_defaults_and_take_overrides():
    from redi.core.config import GateConfig, to_dict

    cfg = load_config(profile="tiny", overrides=["gate.min_aupro=0.3", "line.data_repo=https://git/x.git",
                                                 "pipeline.node_selector={pool: gpu}",
                                                 "pipeline.steps.train_recover.memory_request=32Gi",
                                                 "pipeline.tolerations=[]"])
    assert cfg.gate == GateConfig(min_aupro=0.3) and cfg.gate.tolerance == 0.01
    assert cfg.line.data_repo == "https://git/x.git" and not cfg.line.demo.enabled
    assert cfg.pipeline.node_selector == {"pool": "gpu"} and cfg.pipeline.tolerations == []
    assert cfg.pipeline.steps.train_recover.memory_request == "32Gi" and cfg.pipeline.steps.train_recover.accelerator
    assert cfg.pipeline.steps.gate.retries > 0 and not cfg.pipeline.steps.evaluate.accelerator
    assert {"line", "gate", "pipeline"} <= set(to_dict(cfg))  # `redi config` prints them


def test_operations_sections_round_trip(tmp_path: Path):
    cfg = load_config(profile="cpu", overrides=["pipeline.node_selector={a: b}", "pipeline.workdir_pvc=work"])
    save_config(cfg, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(cfg)


@pytest.mark.parametrize("override, words", [
    (["gate.min_image_auroc=1.5"], "gate minimums"),
    (["gate.tolerance=1"], "gate.tolerance"),
    (["pipeline.schedule=0 3 * * *"], "6-field cron"),
    (["pipeline.node_selector=gpu"], "cannot read 'gpu' as dict"),
    (["pipeline.tolerations=[{keyy: x}]"], "tolerations entries may only hold"),
    (["pipeline.steps.gate.retries=-1"], "retries must be >= 0"),
    (["pipeline.steps.nope.retries=1"], "unknown config key 'pipeline.steps.nope'"),
])
def test_bad_operations_settings_get_clear_errors(override, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_config(profile="tiny", overrides=override)


def test_params_yaml_is_a_complete_redi_config_file():
    root = Path(__file__).resolve().parents[1]
    raw = __import__("yaml").safe_load((root / "params.yaml").read_text())
    cfg = load_config(root / "params.yaml")
    assert cfg.profile == "tiny" and raw["data"]["root"] == "data/demo/bottle_caps"
    assert raw == to_dict(cfg)  # every setting listed, so dvc.yaml's params track each one
