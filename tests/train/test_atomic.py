"""meanflow.train.atomic.atomic_folder: a folder is the old complete one or the new complete one."""
from __future__ import annotations

import pytest

from meanflow.train.atomic import atomic_folder


def _write(files: dict[str, str]):
    def write(folder):
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
    return write


def _contents(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_folder_writes_then_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "student"
    assert atomic_folder(target, _write({"a.json": "1", "sub/w.bin": "old"})) == target
    assert _contents(target) == {"a.json": "1", "sub/w.bin": "old"}
    atomic_folder(target, _write({"sub/w.bin": "new"}))
    assert _contents(target) == {"sub/w.bin": "new"}  # replaced, not merged: no stale a.json
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temporary or trash left


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_atomic_folder_keeps_the_old_folder_when_the_write_fails(tmp_path, interruption):
    target = tmp_path / "student"
    atomic_folder(target, _write({"a.json": "1"}))

    def half_then_fail(folder):
        (folder / "a.json").write_text("2")
        raise interruption

    with pytest.raises(interruption):
        atomic_folder(target, half_then_fail)
    assert _contents(target) == {"a.json": "1"} and [p.name for p in tmp_path.iterdir()] == ["student"]
    with pytest.raises(interruption):
        atomic_folder(tmp_path / "fresh", half_then_fail)
    assert not (tmp_path / "fresh").exists() and [p.name for p in tmp_path.iterdir()] == ["student"]


def test_atomic_folder_replaces_a_file_of_that_name(tmp_path):
    target = tmp_path / "student"
    target.write_text("not a folder")
    atomic_folder(target, _write({"a.json": "1"}))
    assert _contents(target) == {"a.json": "1"} and [p.name for p in tmp_path.iterdir()] == ["student"]
