"""KFP component ``validate_data``: fetch a line's dataset at a DVC revision, validate it, fingerprint it.

Never cached (the working copy or a branch can change under the same parameters). Its outputs
that later steps take are plain values: the content hash and the resolved commit. The cached
``snapshot_data`` step turns them into the ``dataset`` artifact, so an unchanged dataset reuses the
cached artifact and with it every cached step downstream (KFP keys a step's cache on its input
artifacts' identities: an artifact made anew by an uncached step would miss every time).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def validate_data(line: str, data_path: str, data_repo: str, data_revision: str, profile: str, data_config: str,
                  manifest: Output[Artifact], rejected: Output[Artifact]) -> NamedTuple("DataVersion", data_hash=str,
                                                                                        revision=str):
    """Fetch the dataset (``redi.workflow.stages.validate_data`` on it): every image and mask is decoded.

    Outputs: ``manifest`` (``manifest.json``: files, sha256, counts per split and defect type, the
    source and its content hash), ``rejected`` (``rejected.json``), and the values ``data_hash`` (sha256
    over every file) and ``revision`` (the commit of ``data_revision``; "" for a working copy). A
    corrupt file stops the run naming the file, unless the line sets ``data.skip_bad_files``.

    A private repository or DVC remote: credentials from the line's data secret in the environment
    (``components.common.DATA_SECRET_KEYS``); a ``data_repo`` with credentials in it is refused.
    """
    import json
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from components.common import fetch_dataset, make_config, out_dir, resolve_revision, stage_guard, tree_hash
    from redi.core.errors import RediError
    from redi.workflow.stages import validate_data as check_data
    from redi.core.utils import atomic_write_text

    with stage_guard("validate_data", line) as record:
        revision = resolve_revision(data_repo, data_revision) if data_repo and (
            data_revision or not Path(data_repo).is_dir()) else ""
        scratch = Path(tempfile.mkdtemp(prefix="redi-data-")) / line
        try:
            source = fetch_dataset(data_path, data_repo, revision, scratch)
            data_hash = tree_hash(scratch)
            cfg = make_config(profile, data_config, data_root=scratch)
            folder = out_dir(manifest.path)
            try:
                check_data(scratch, folder, cfg)
            except RediError as exc:  # name the user's file, not this step's copy of it
                raise type(exc)(str(exc).replace(str(scratch), source["source"])) from exc
        finally:
            shutil.rmtree(scratch.parent, ignore_errors=True)
        # validate_data writes both files into one folder; the rejected list is its own artifact
        shutil.move(str(folder / "rejected.json"), str(out_dir(rejected.path) / "rejected.json"))
        content = json.loads((folder / "manifest.json").read_text())
        content.update({"source": source, "data_hash": data_hash})
        atomic_write_text(folder / "manifest.json", json.dumps(content, indent=2))
        n_rejected = len(json.loads((Path(rejected.path) / "rejected.json").read_text()))
        manifest.metadata.update({"line": line, "revision": source["revision"], "n_files": content["n_files"],
                                  "data_hash": data_hash})
        rejected.metadata["n_rejected"] = n_rejected
        record.update({"manifest": str(folder / "manifest.json"), "n_files": content["n_files"],
                       "n_rejected": n_rejected, "data_hash": data_hash, **source})
    return namedtuple("DataVersion", ["data_hash", "revision"])(data_hash, revision)
