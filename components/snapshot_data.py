"""KFP component ``snapshot_data``: the line's dataset at a content hash, as the ``dataset`` artifact.

Cached: its inputs are the data source, the resolved commit and the content hash that
``validate_data`` measured, so the same data gives the same cache key and KFP reuses the artifact
(and the cached steps that consume it). It fetches the data again and checks the hash, so data
that changed between the two steps stops the run instead of training on something else.
"""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def snapshot_data(line: str, data_path: str, data_repo: str, revision: str, data_hash: str,
                  dataset: Output[Dataset]):
    """Copy the dataset (a folder, a DVC working copy or ``dvc get`` of ``revision``) into ``dataset``
    and check that its content hash is ``data_hash``. Credentials as for ``validate_data`` (the line's
    data secret in the environment; never in ``data_repo``)."""
    from pathlib import Path

    from components.common import fetch_dataset, stage_guard, tree_hash
    from redi.core.errors import DatasetError

    with stage_guard("snapshot_data", line) as record:
        source = fetch_dataset(data_path, data_repo, revision, Path(dataset.path))
        found = tree_hash(dataset.path)
        if found != data_hash:
            raise DatasetError(f"the data at {source['source']} ({source['revision']}) changed during the run: "
                               f"content hash {found[:12]} here, {data_hash[:12]} when validate_data validated it; "
                               f"run the pipeline again (pin a revision to avoid this)")
        dataset.metadata.update({"line": line, "revision": source["revision"], "data_hash": data_hash})
        record.update({"dataset": str(dataset.path), "data_hash": data_hash, **source})
