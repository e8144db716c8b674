"""KFP component ``train_discriminate``: train the discriminate net, calibrate, write the detector."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def train_discriminate(line: str, profile: str, data_config: str, model_config: str, train_config: str,
                       eval_config: str, workdir: str, dataset: Input[Dataset], prompt_bank: Input[Artifact],
                       recover: Input[Model], detector: Output[Model]):
    """``redi.methods.redi.fit.train_discriminate`` in ``<workdir>/<line>/train`` (resumable); the complete
    ``detector.pt`` goes into the ``detector`` artifact. GPU when there is one."""
    from pathlib import Path

    from components.common import copy_files, line_dir, make_config, out_dir, stage_guard
    from redi.methods.base import read_artifact
    from redi.methods.redi.fit import train_discriminate as train

    with stage_guard("train_discriminate", line) as record:
        cfg = make_config(profile, data_config, model_config, train_config, eval_config, data_root=dataset.path)
        train_dir = line_dir(workdir, line) / "train"
        path = train(dataset.path, Path(prompt_bank.path) / "prompt_bank.pt", Path(recover.path) / "recover.pt",
                     train_dir, cfg, line)
        copy_files(path.parent, out_dir(detector.path), ["detector.pt", "discriminate_history.json"])
        meta = read_artifact(path)["metadata"]
        detector.metadata.update({k: meta.get(k) for k in ("line", "version", "profile", "backbone")})
        record.update({"detector": str(Path(detector.path) / "detector.pt"), "version": meta.get("version")})
