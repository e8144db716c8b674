"""KFP component ``precompute_selfmaps``: cache the training images' self-maps (HOG by default)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def precompute_selfmaps(line: str, profile: str, data_config: str, model_config: str, train_config: str,
                        dataset: Input[Dataset], selfmaps: Output[Artifact]):
    """``redi.methods.redi.fit.precompute_selfmaps``: writes ``selfmaps.pt`` into the ``selfmaps`` artifact."""
    from components.common import make_config, out_dir, stage_guard
    from redi.methods.redi.fit import precompute_selfmaps as compute

    with stage_guard("precompute_selfmaps", line) as record:
        cfg = make_config(profile, data_config, model_config, train_config, data_root=dataset.path)
        record["selfmaps"] = str(compute(dataset.path, out_dir(selfmaps.path), cfg))
        selfmaps.metadata["kind"] = cfg.model.selfmap.kind
