"""KFP component ``train_patchcore``: fit the memory-bank candidate, calibrate, write its detector."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def train_patchcore(line: str, profile: str, data_config: str, model_config: str, train_config: str,
                    eval_config: str, dataset: Input[Dataset], detector: Output[Model]):
    """``redi.methods.patchcore.method.train_patchcore``: ``detector.pt`` into the ``detector`` artifact."""
    from pathlib import Path

    from components.common import make_config, out_dir, stage_guard
    from redi.methods.base import read_artifact
    from redi.methods.patchcore.method import train_patchcore as fit

    with stage_guard("train_patchcore", line) as record:
        cfg = make_config(profile, data_config, model_config, train_config, eval_config, data_root=dataset.path)
        path = fit(dataset.path, out_dir(detector.path), cfg, line)
        meta = read_artifact(path)["metadata"]
        detector.metadata.update({k: meta.get(k) for k in ("line", "version", "profile", "backbone", "method")})
        record.update({"detector": str(Path(detector.path) / "detector.pt"), "version": meta.get("version")})
