"""Images that are not parts (a black frame, a strip, a 1x1 image) are recognised against the line's
part profile; real parts, defective ones included, are not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from redi.core.errors import InputError
from redi.core.images import load_rgb
from redi.core.part_check import PartProfile, image_statistics, unlike_line
from redi.methods.base import load_detector

DEV_SETS = ("metal_plate", "hazelnut", "grid")


def _textured(seed: int, height: int = 200, width: int = 240) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.indices((height, width)).sum(axis=0) % 32 * 4 + 60
    return np.clip(base[..., None] + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def _glitches(part: np.ndarray) -> dict[str, np.ndarray]:
    return {"black frame": np.zeros_like(part), "white frame": np.full_like(part, 255),
            "8-row strip": part[:8], "1x1 image": part[:1, :1],
            "uniform grey": np.full_like(part, int(part.mean()))}


def test_parts_pass_and_glitches_are_named() -> None:
    parts = [_textured(seed) for seed in range(6)]
    profile = PartProfile.from_images(parts)
    assert profile.n_images == 6 and profile.aspect == (1.2, 1.2)
    assert profile.unlike_reasons(image_statistics(_textured(99))) == []
    reasons = {name: profile.unlike_reasons(image_statistics(img)) for name, img in _glitches(parts[0]).items()}
    assert all(reasons.values()), reasons
    assert any("brightness" in r for r in reasons["black frame"])
    assert any("uniform" in r for r in reasons["uniform grey"])
    assert any("aspect" in r for r in reasons["8-row strip"]) and any("size" in r for r in reasons["1x1 image"])


def test_a_part_rotated_or_rescaled_within_reason_is_still_a_part() -> None:
    part = _textured(0, 300, 300)
    profile = PartProfile.from_images([part])
    half = part[::2, ::2]  # a camera sending half the resolution
    assert profile.unlike_reasons(image_statistics(half)) == []
    assert profile.unlike_reasons(image_statistics(part[:, :260])) == []  # a slightly tighter crop


def test_profile_round_trips_through_plain_values_and_rejects_garbage() -> None:
    profile = PartProfile.from_images([_textured(1), _textured(2, 180, 260)])
    again = PartProfile.from_dict(profile.to_dict())
    assert again == profile
    assert unlike_line(None, image_statistics(np.zeros((4, 4, 3), np.uint8))) == []  # an older model: no hint
    with pytest.raises(InputError, match="retrain"):
        PartProfile.from_dict({"n_images": 3, "aspect": [1.0]})
    with pytest.raises(InputError, match="at least one"):
        PartProfile.from_statistics([])


@pytest.mark.parametrize("name", DEV_SETS)
def test_no_real_test_image_is_called_unlike_its_line(shared_data_dir: Path, name: str) -> None:
    root = shared_data_dir / name
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    train = [load_rgb(p) for p in sorted((root / "train" / "good").iterdir())]
    profile = PartProfile.from_images(train)
    tests = sorted(p for p in (root / "test").glob("*/*") if p.is_file())
    unlike = {str(p.relative_to(root)): r for p in tests if (r := profile.unlike_reasons(image_statistics(load_rgb(p))))}
    assert unlike == {}  # defective parts are still parts
    missed = [k for k, img in _glitches(train[0]).items() if not profile.unlike_reasons(image_statistics(img))]
    assert missed == []


def test_training_stores_the_profile_with_the_calibration(trained_line: dict[str, Path]) -> None:
    detector = load_detector(trained_line["detector"])
    stored = detector.metadata["calibration"]["part_profile"]
    profile = PartProfile.from_dict(stored)
    assert profile.n_images == 30  # every normal training image, not only the held-out ones
    part = load_rgb(next((trained_line["data"] / "test" / "scratch").iterdir()))
    assert unlike_line(stored, image_statistics(part)) == []
    assert unlike_line(stored, image_statistics(np.zeros_like(part)))
