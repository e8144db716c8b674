"""KFP component ``drift_reference``: the per-image feature table that monitoring compares against."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def drift_reference(line: str, profile: str, data_config: str, model_config: str, train_config: str, eval_config: str,
                    dataset: Input[Dataset], detector: Input[Model], reference: Output[Dataset]):
    """``redi.ops.monitoring.build_reference``: one row per normal training image (brightness, contrast,
    sharpness, anomaly score, embedding components) in ``reference.csv``."""
    from pathlib import Path

    from components.common import make_config, out_dir, stage_guard
    from redi.ops.monitoring import build_reference

    with stage_guard("drift_reference", line) as record:
        cfg = make_config(profile, data_config, model_config, train_config, eval_config, data_root=dataset.path)
        path = build_reference(Path(detector.path) / "detector.pt", dataset.path,
                               out_dir(reference.path) / "reference.csv", cfg)
        reference.metadata["line"] = line
        record["reference"] = str(path)
