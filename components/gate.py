"""KFP component ``gate``: promote only a model that meets the line's minimums and beats production."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def gate(line: str, profile: str, config_json: str, workdir: str, run_tag: str, min_image_auroc: float,
         min_pixel_auroc: float, min_aupro: float, tolerance: float, dataset: Input[Dataset],
         detector: Input[Model], evaluation: Input[Artifact], manifest: Input[Artifact],
         reference: Input[Dataset], decision: Output[Artifact]) -> bool:
    """``redi.gate.gate_model``: evaluates the production model on the same test data, decides, uploads
    the version (detector, metrics, report, manifest, drift reference, decision) to object storage
    and, when promoting, moves the line's production pointer last. Returns whether it promoted."""
    import os
    from pathlib import Path

    from components.common import make_config, out_dir, stage_guard
    from redi.config import save_config
    from redi.gate import GatePolicy, gate_model
    from redi.storage import store_from_env

    with stage_guard("gate", workdir, line, run_tag) as record:
        cfg = make_config(profile, config_json, dataset.path)
        folder = out_dir(decision.path)
        save_config(cfg, folder / "config.yaml")
        local_root = os.environ.get("REDI_STORE_DIR") or (str(Path(workdir) / "store") if workdir else None)
        store = store_from_env(local_root=local_root)
        evaluation_dir = Path(evaluation.path)
        artifacts = {"report": evaluation_dir / "report", "scores.json": evaluation_dir / "scores.json",
                     "manifest.json": Path(manifest.path) / "manifest.json", "config.yaml": folder / "config.yaml",
                     "drift_reference.csv": Path(reference.path) / "reference.csv"}
        policy = GatePolicy(min_image_auroc, min_pixel_auroc, min_aupro, tolerance)
        result = gate_model(line, Path(detector.path) / "detector.pt", evaluation_dir / "metrics.json",
                            dataset.path, cfg, policy, store, folder / "decision.json",
                            artifacts={k: v for k, v in artifacts.items() if v.exists()},
                            info={"run_tag": run_tag, "profile": cfg.profile,
                                  "data_revision": dataset.metadata.get("revision", "")})
        decision.metadata.update({"promote": result["promote"], "version": result["version"],
                                  "reasons": result["reasons"]})
        record.update({k: result.get(k) for k in ("promote", "reasons", "version", "version_prefix",
                                                  "production_version", "candidate_metrics", "production_metrics")})
        record["decision"] = str(folder / "decision.json")
        record["store"] = repr(store)
        if result["promote"]:
            record["production_detector"] = store.uri(result["pointer"]["detector"])
        return bool(result["promote"])
