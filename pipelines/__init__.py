"""The redi Kubeflow pipeline (``pipelines.line_pipeline``) and the product lines it runs (``lines/``)."""
