"""KFP component ``train_recover``: train the recover net (HIP); resumable from the line's work dir."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def train_recover(line: str, profile: str, data_config: str, model_config: str, train_config: str, workdir: str,
                  dataset: Input[Dataset], prompt_bank: Input[Artifact], selfmaps: Input[Artifact],
                  recover: Output[Model]):
    """``redi.methods.redi.fit.train_recover`` in ``<workdir>/<line>/train`` (checkpoints persist across runs on a
    mounted volume, so a rerun resumes); ``recover.pt`` goes into the ``recover`` artifact. GPU when there is one."""
    from pathlib import Path

    from components.common import copy_files, line_dir, make_config, out_dir, stage_guard
    from redi.methods.redi.fit import train_recover as train

    with stage_guard("train_recover", line) as record:
        cfg = make_config(profile, data_config, model_config, train_config, data_root=dataset.path)
        train_dir = line_dir(workdir, line) / "train"
        path = train(dataset.path, Path(prompt_bank.path) / "prompt_bank.pt", train_dir, cfg,
                     Path(selfmaps.path) / "selfmaps.pt")
        copy_files(path.parent, out_dir(recover.path), ["recover.pt", "recover_history.json"])
        recover.metadata.update({"profile": cfg.profile, "epochs": cfg.train.recover.epochs})
        record.update({"recover": str(Path(recover.path) / "recover.pt"), "checkpoints": str(train_dir / "checkpoints")})
