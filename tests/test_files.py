"""cnnclf.files.atomic_write: a reader sees the old file or the whole new one, and a failed write leaves nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cnnclf.files import TEMP_RE, atomic_write, temp_path


def test_atomic_write_replaces_the_file_at_once(tmp_path: Path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and TEMP_RE.search(tmp.name)[1] == str(os.getpid())
        tmp.write_text("new")
        assert target.read_text() == "old"  # not before the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path: Path):
    target = tmp_path / "cache.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(target) as tmp:
        tmp.write_bytes(b"\x00" * 10)
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt"]


def test_a_leftover_temp_link_is_not_written_through(tmp_path: Path):
    target, elsewhere = tmp_path / "m.json", tmp_path / "elsewhere"
    elsewhere.write_text("keep")
    temp_path(target).symlink_to(elsewhere)
    with atomic_write(target) as tmp:
        tmp.write_text("{}")
    assert elsewhere.read_text() == "keep" and target.read_text() == "{}" and not target.is_symlink()


def test_a_write_that_need_not_survive_a_power_loss_is_not_fsynced(tmp_path: Path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    with atomic_write(tmp_path / "mark.json", durable=False) as tmp:
        tmp.write_text("{}")
    assert synced == [] and (tmp_path / "mark.json").read_text() == "{}"
    with atomic_write(tmp_path / "ckpt.pt") as tmp:
        tmp.write_bytes(b"x")
    assert len(synced) == 2  # the file, then its folder
