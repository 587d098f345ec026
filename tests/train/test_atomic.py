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


def test_atomic_folder_clears_what_a_killed_write_left(tmp_path):
    """A kill mid-write leaves a hidden temporary; a kill between the two renames leaves the old
    folder in the trash and none under the name. The next write removes the first and puts the
    second back first (a reader in between finds the old folder), then writes."""
    target = tmp_path / "student"
    (tmp_path / ".student.tmp-1-aa").mkdir()
    (tmp_path / ".student.tmp-1-aa" / "w.bin").write_text("half")
    (tmp_path / ".student.trash-1-bb").mkdir()
    (tmp_path / ".student.trash-1-bb" / "a.json").write_text("old")
    (tmp_path / ".other.tmp-1-cc").write_text("not ours")

    def write(folder):
        assert _contents(target) == {"a.json": "old"}  # restored before the new write
        (folder / "a.json").write_text("new")

    atomic_folder(target, write)
    assert _contents(target) == {"a.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1-cc", "student"]


def test_atomic_folder_writes_through_a_symlink(tmp_path):
    (tmp_path / "disk" / "student").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "student").symlink_to(tmp_path / "disk" / "student")
    atomic_folder(tmp_path / "run" / "student", _write({"a.json": "1"}))
    assert (tmp_path / "run" / "student").is_symlink()
    assert _contents(tmp_path / "disk" / "student") == {"a.json": "1"}
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["student"]
