"""KFP component ``gate``: promote only a model that meets the line's minimums and beats production."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def gate(line: str, profile: str, config_json: str, workdir: str, cluster_mode: bool, dataset: Input[Dataset],
         detector: Input[Model], evaluation: Input[Artifact], manifest: Input[Artifact],
         reference: Input[Dataset], decision: Output[Artifact]) -> bool:
    """``redi.ops.gate.gate_model``: evaluates the production model on the same test data, decides, uploads
    the version (detector, metrics, report, manifest, drift reference, decision) to object storage
    and, when promoting, moves the line's production pointer last. Returns whether it promoted.

    ``config_json`` is the whole resolved config (its ``gate`` section is the policy). In
    ``cluster_mode`` the object store must be configured (``REDI_S3_*``, from the line's
    ``pipeline.store_secret``): a missing or unreachable store fails here, naming the setting.
    """
    import dataclasses
    import os
    from pathlib import Path

    from components.common import RUN_TAG_ENV, make_config, open_store, out_dir, stage_guard
    from redi.core.config import save_config
    from redi.ops.gate import GatePolicy, gate_model

    with stage_guard("gate", line) as record:
        store = open_store(workdir, cluster_mode)  # first: fail before any work when production is unreachable
        cfg = make_config(profile, config_json, data_root=dataset.path)
        folder = out_dir(decision.path)
        save_config(cfg, folder / "config.yaml")
        evaluation_dir = Path(evaluation.path)
        artifacts = {"report": evaluation_dir / "report", "scores.json": evaluation_dir / "scores.json",
                     "manifest.json": Path(manifest.path) / "manifest.json", "config.yaml": folder / "config.yaml",
                     "drift_reference.csv": Path(reference.path) / "reference.csv"}
        policy = GatePolicy(**dataclasses.asdict(cfg.gate))
        result = gate_model(line, Path(detector.path) / "detector.pt", evaluation_dir / "metrics.json",
                            dataset.path, cfg, policy, store, folder / "decision.json",
                            artifacts={k: v for k, v in artifacts.items() if v.exists()},
                            info={"run_tag": os.environ.get(RUN_TAG_ENV, ""), "profile": cfg.profile,
                                  "data_revision": dataset.metadata.get("revision", ""),
                                  "data_hash": dataset.metadata.get("data_hash", ""), "cluster_mode": cluster_mode})
        decision.metadata.update({"promote": result["promote"], "version": result["version"],
                                  "reasons": result["reasons"]})
        record.update({k: result.get(k) for k in ("promote", "reasons", "version", "version_prefix",
                                                  "production_version", "candidate_metrics", "production_metrics")})
        record["decision"] = str(folder / "decision.json")
        record["store"] = repr(store)
        if result["promote"]:
            record["production_detector"] = store.uri(result["pointer"]["detector"])
        return bool(result["promote"])
