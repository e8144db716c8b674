"""KFP component ``build_prompt_bank``: embed the normal training images (the prompt bank)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def build_prompt_bank(line: str, profile: str, data_config: str, model_config: str,
                      train_config: str, eval_config: str, dataset: Input[Dataset],
                      prompt_bank: Output[Artifact]):
    """``redi.methods.redi.fit.build_prompt_bank``: writes ``prompt_bank.pt`` into the ``prompt_bank`` artifact."""
    from components.common import make_config, out_dir, stage_guard
    from redi.methods.redi.fit import build_prompt_bank as build_bank

    with stage_guard("build_prompt_bank", line) as record:
        cfg = make_config(profile, data_config, model_config, train_config, eval_config,
                          data_root=dataset.path)
        record["prompt_bank"] = str(build_bank(dataset.path, out_dir(prompt_bank.path) / "prompt_bank.pt", cfg))
        prompt_bank.metadata["backbone"] = cfg.model.backbone
