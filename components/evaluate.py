"""KFP component ``evaluate``: metrics (KFP Metrics) and the HTML report of a detector on the test split."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.common import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def evaluate(line: str, profile: str, data_config: str, model_config: str, train_config: str, eval_config: str,
             dataset: Input[Dataset], detector: Input[Model], metrics: Output[Metrics], report: Output[HTML],
             evaluation: Output[Artifact]):
    """``redi.workflow.stages.evaluate``: ``evaluation`` holds ``metrics.json``, ``scores.json`` and ``report/``;
    ``metrics`` shows the numbers in the KFP UI; ``report`` is the report as one HTML file."""
    import json
    from pathlib import Path

    from components.common import inline_html, make_config, numeric_metrics, out_dir, stage_guard
    from redi.workflow.stages import evaluate as run_evaluation

    with stage_guard("evaluate", line) as record:
        cfg = make_config(profile, data_config, model_config, train_config, eval_config, data_root=dataset.path)
        folder = out_dir(evaluation.path)
        path = run_evaluation(Path(detector.path) / "detector.pt", dataset.path, folder, cfg)
        values = json.loads(Path(path).read_text())
        for key, value in numeric_metrics(values).items():
            metrics.log_metric(key, value)
        inline_html(folder / "report" / "index.html", Path(report.path))
        evaluation.metadata.update({k: values.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")})
        record.update({"metrics": str(path), "report": str(folder / "report" / "index.html"),
                       **{k: values.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")}})
