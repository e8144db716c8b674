"""ReDi registered as the method ``redi`` (``model.method: redi``, the default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from redi.core.config import RediConfig
from redi.methods.base import Method, register_method
from redi.methods.redi.detector import Detector


@register_method("redi")
class ReDi(Method):
    """Recover-then-Discriminate: self-map and prompt -> recovered image -> feature distance."""

    detector_class = Detector

    def fit(self, data_root: str | Path, out_dir: str | Path, cfg: RediConfig, line: str = "") -> dict[str, Path]:
        from redi.methods.redi.fit import fit  # the training code loads only when fitting

        return fit(data_root, out_dir, cfg, line)

    def upgrade_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """Artifacts from before ``model.selfmap.scale`` scaled each image's self-map by itself;
        those from before ``model.image_score`` scored an image by its map's maximum."""
        selfmap = config.get("model", {}).get("selfmap")
        if isinstance(selfmap, dict) and "scale" not in selfmap:
            config = {**config, "model": {**config["model"], "selfmap": {**selfmap, "scale": "image"}}}
        if isinstance(config.get("model"), dict) and "image_score" not in config["model"]:
            config = {**config, "model": {**config["model"], "image_score": "max"}}
        return config
