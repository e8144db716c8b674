"""KFP component ``package_bento``: the promoted detector into the BentoML store, then ``bentoml build``."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def package_bento(line: str, workdir: str, run_tag: str, bentoml_home: str, detector: Input[Model],
                  evaluation: Input[Artifact], bento: Output[Artifact]) -> str:
    """``redi.packaging.save_to_bentoml`` + ``build_bento``; returns the Bento tag.

    ``bentoml_home`` (else ``BENTOML_HOME``, else ``<workdir>/bentoml``) is BentoML's store."""
    import json
    import os
    from pathlib import Path

    from components.common import out_dir, stage_guard

    with stage_guard("package_bento", workdir, line, run_tag) as record:
        home = bentoml_home or os.environ.get("BENTOML_HOME") or (str(Path(workdir) / "bentoml") if workdir else "")
        if home:
            os.environ["BENTOML_HOME"] = str(Path(home).resolve())  # before bentoml is imported
        os.environ["BENTOML_DO_NOT_TRACK"] = "true"
        from redi.packaging import build_bento, save_to_bentoml

        metrics = json.loads((Path(evaluation.path) / "metrics.json").read_text())
        model_tag = save_to_bentoml(Path(detector.path) / "detector.pt", line, metrics)
        bento_tag = build_bento(bentoml_home=home or None)
        info = {"line": line, "model_tag": model_tag, "bento_tag": bento_tag,
                "bentoml_home": os.environ.get("BENTOML_HOME", str(Path.home() / "bentoml"))}
        (out_dir(bento.path) / "bento.json").write_text(json.dumps(info, indent=2))
        bento.metadata.update(info)
        record.update(info)
        return bento_tag
