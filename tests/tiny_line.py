"""A small demo line and a 1-epoch ``tiny`` detector trained on it: what the server tests serve."""

from __future__ import annotations

from pathlib import Path

from redi.core.config import profile_config
from redi.data.demo import make_demo_line


def make_line(root: Path, line: str, n_test_good: int = 2, n_test_defect: int = 4) -> Path:
    """A 128 px demo line with 10 training images under ``root/data/<line>``."""
    data = root / "data" / line
    make_demo_line(data, line, n_train=10, n_test_good=n_test_good, n_test_defect=n_test_defect, size=128, seed=0)
    return data


def train_tiny(data: Path, out: Path, line: str, seed: int = 0) -> Path:
    """Train every stage with the ``tiny`` profile and 1 epoch each, on the CPU; return ``detector.pt``."""
    from redi.workflow.stages import train_all

    cfg = profile_config("tiny")
    cfg.train.recover.epochs = cfg.train.discriminate.epochs = 1
    cfg.train.device, cfg.train.seed = "cpu", seed
    return train_all(data, out, cfg, line=line)["detector"]


def make_wide_line(root: Path, line: str, repeats: int = 3) -> Path:
    """A demo line whose every image and mask is its 128 px original repeated ``repeats`` times
    side by side (128 x 384 for 3): a strip-shaped line for ``data.aspect=native``."""
    import numpy as np
    from PIL import Image

    data = make_line(root, line)
    for path in sorted(data.rglob("*.png")):
        with Image.open(path) as image:
            pixels = np.asarray(image)
        Image.fromarray(np.concatenate([pixels] * repeats, axis=1)).save(path)
    return data
