"""The shared atomic writers and the torch loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from redi.errors import WeightsError
from redi.utils import atomic_torch_save, atomic_write, atomic_write_bytes, atomic_write_text, load_torch_file


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
