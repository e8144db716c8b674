"""KFP component ``package_bento``: a Bento of the lines' PRODUCTION models, kept in the object store."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def package_bento(line: str, workdir: str, bentoml_home: str, cluster_mode: bool, decision: Input[Artifact],
                  bento: Output[Artifact]) -> str:
    """``redi.ops.packaging.build_production_bento`` from the store's production pointers (the gate just moved
    this line's), then ``bentoml export`` of the Bento into the store (``bentos/<name>/<version>.bento``),
    so it outlives the step's pod. Returns the Bento tag.

    ``bentoml_home`` (else ``BENTOML_HOME``, else ``<workdir>/bentoml``) is BentoML's store. In
    ``cluster_mode`` the object store must be configured (``REDI_S3_*``).
    """
    import json
    import os
    import tempfile
    from pathlib import Path

    from components.common import open_store, out_dir, stage_guard
    from redi.core.utils import atomic_write_text

    with stage_guard("package_bento", line) as record:
        store = open_store(workdir, cluster_mode)
        home = bentoml_home or os.environ.get("BENTOML_HOME") or (str(Path(workdir) / "bentoml") if workdir else "")
        if home:
            os.environ["BENTOML_HOME"] = str(Path(home).resolve())  # before bentoml is imported
        os.environ["BENTOML_DO_NOT_TRACK"] = "true"
        import bentoml

        from redi.ops.packaging import build_production_bento

        version = json.loads((Path(decision.path) / "decision.json").read_text()).get("version", "")
        built = build_production_bento(store, bentoml_home=home or None)
        name, bento_version = built["bento_tag"].split(":")
        key = f"bentos/{name}/{bento_version}.bento"
        with tempfile.TemporaryDirectory() as tmp:
            exported = bentoml.export_bento(built["bento_tag"], str(Path(tmp) / "bento.bento"))
            store.put_file(key, exported)
        info = {"line": line, "version": version, "bento_tag": built["bento_tag"], "models": built["models"],
                "model_tag": built["models"].get(line), "bento_uri": store.uri(key),
                "bentoml_home": os.environ.get("BENTOML_HOME", str(Path.home() / "bentoml"))}
        atomic_write_text(out_dir(bento.path) / "bento.json", json.dumps(info, indent=2))
        bento.metadata.update({k: v for k, v in info.items() if k != "models"})
        record.update(info)
        return built["bento_tag"]
