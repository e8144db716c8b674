"""BentoML serving of redi detectors: ``bentoml serve serving.service:RediService`` (see docs/serving.md)."""
