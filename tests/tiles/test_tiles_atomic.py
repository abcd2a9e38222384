"""`tiles.atomic_path`: complete or nothing, for files and folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiles import atomic_path


def test_a_file_appears_only_when_complete_and_a_failure_leaves_the_old_one(tmp_path: Path):
    target = tmp_path / "out.geojson"
    with atomic_path(target) as tmp:
        assert not tmp.exists() and tmp.suffix == ".geojson" and tmp.parent == tmp_path
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out.geojson"]


def test_folders_replace_or_keep_the_first_finished_copy(tmp_path: Path):
    target = tmp_path / "model"
    for content, replace in (("first", True), ("second", True), ("third", False)):
        with atomic_path(target, folder=True, replace=replace) as tmp:
            assert tmp.is_dir()
            (tmp / "weights").write_text(content)
    assert (target / "weights").read_text() == "second"  # the third found one and kept it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
