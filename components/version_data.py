"""KFP component ``version_data``: bring a line's dataset at a DVC revision, validate it, manifest it."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def version_data(line: str, data_path: str, data_repo: str, data_revision: str, profile: str, config_json: str,
                 workdir: str, run_tag: str, dataset: Output[Dataset], manifest: Output[Artifact],
                 rejected: Output[Artifact]):
    """Fetch the dataset (``redi.stages.validate_data`` on it): every image and mask is decoded.

    Outputs: ``dataset`` (the line's folder at that revision), ``manifest`` (``manifest.json``:
    files, sha256, counts per split and defect type) and ``rejected`` (``rejected.json``).
    A corrupt file stops the run naming the file, unless the line sets ``data.skip_bad_files``.
    """
    import json
    import shutil
    from pathlib import Path

    from components.common import fetch_dataset, make_config, out_dir, stage_guard
    from redi.errors import RediError
    from redi.stages import validate_data

    with stage_guard("version_data", workdir, line, run_tag) as record:
        source = fetch_dataset(data_path, data_repo, data_revision, Path(dataset.path))
        cfg = make_config(profile, config_json, dataset.path)
        scratch = out_dir(manifest.path)
        try:
            validate_data(dataset.path, scratch, cfg)
        except RediError as exc:  # name the user's file, not this step's copy of it
            raise type(exc)(str(exc).replace(str(Path(dataset.path)), source["source"])) from exc
        # validate_data writes both files into one folder; the rejected list is its own artifact
        shutil.move(str(scratch / "rejected.json"), str(out_dir(rejected.path) / "rejected.json"))
        content = json.loads((scratch / "manifest.json").read_text())
        content["source"] = source
        (scratch / "manifest.json").write_text(json.dumps(content, indent=2))
        n_rejected = len(json.loads((Path(rejected.path) / "rejected.json").read_text()))
        for artifact in (dataset, manifest):
            artifact.metadata.update({"line": line, "revision": source["revision"], "n_files": content["n_files"]})
        rejected.metadata["n_rejected"] = n_rejected
        record.update({"manifest": str(scratch / "manifest.json"), "n_files": content["n_files"],
                       "n_rejected": n_rejected, **source})
