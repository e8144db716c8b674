"""The shared atomic writers and the torch loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from redi.core.errors import WeightsError
from redi.core.utils import atomic_torch_save, atomic_write, atomic_write_bytes, atomic_write_text, load_torch_file


def test_atomic_write_text_and_bytes_create_folders_and_replace(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.json"
    assert atomic_write_text(target, "one") == target
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temporary left


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_torch_save_and_load_round_trip(tmp_path: Path) -> None:
    path = atomic_torch_save({"x": torch.arange(3)}, tmp_path / "f.pt")
    assert torch.equal(load_torch_file(path, "test file", "rerun")["x"], torch.arange(3))
    (tmp_path / "bad.pt").write_bytes(b"not torch")
    with pytest.raises(WeightsError, match="corrupt.*rerun"):
        load_torch_file(tmp_path / "bad.pt", "test file", "rerun")
    with pytest.raises(WeightsError, match="does not exist; rerun"):
        load_torch_file(tmp_path / "missing.pt", "test file", "rerun")


def test_bf16_choice_is_measured_once_per_machine_and_shared(tmp_path):
    """The first process measures bf16 against fp32 and records it; later processes reuse it, so
    a resumed run or a service never flips precision because the cores were busy once."""
    import json
    import subprocess
    import sys

    env = {**__import__("os").environ, "REDI_CACHE_DIR": str(tmp_path)}
    code = "from redi.core.utils import bf16_speedup; print(bf16_speedup('cpu'))"
    first = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 check=True).stdout)
    recorded = json.loads((tmp_path / "bf16_speedup.json").read_text())
    assert list(recorded.values()) == [first] and first > 0
    key = next(iter(recorded))
    (tmp_path / "bf16_speedup.json").write_text(json.dumps({key: 0.5}))  # what another process measured
    again = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 check=True).stdout)
    assert again == 0.5
