"""KFP component ``select_champion``: the line's candidates measured on validation, the best kept."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def select_champion(line: str, profile: str, data_config: str, model_config: str, train_config: str,
                    eval_config: str, dataset: Input[Dataset], redi_detector: Input[Model],
                    patchcore_detector: Input[Model], champion: Output[Model]):
    """``redi.workflow.champion.champion_stage`` on the ReDi and PatchCore steps' detectors (the
    combinations in ``model.candidates`` are built here): ``champion`` holds the chosen
    ``detector.pt``, ``selection.json`` and every candidate under ``candidates/``."""
    import json
    from pathlib import Path

    from components.common import make_config, out_dir, stage_guard
    from redi.methods.base import read_artifact
    from redi.workflow.champion import champion_stage

    with stage_guard("select_champion", line) as record:
        cfg = make_config(profile, data_config, model_config, train_config, eval_config, data_root=dataset.path)
        given = {"redi": Path(redi_detector.path) / "detector.pt",
                 "patchcore": Path(patchcore_detector.path) / "detector.pt"}
        path = champion_stage(dataset.path, out_dir(champion.path), cfg, given, line)
        selection = json.loads(path.with_name("selection.json").read_text())
        meta = read_artifact(path)["metadata"]
        champion.metadata.update({k: meta.get(k) for k in ("line", "version", "profile", "backbone", "method")})
        champion.metadata["champion"] = selection["champion"]
        record.update({"champion": selection["champion"], "detector": str(path),
                       "scores": {r["name"]: r["selection_score"] for r in selection["candidates"]}})
