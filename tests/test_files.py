"""Atomic writes (segmote_core.files): the one function every file SegMoTE writes goes through."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from segmote_core.errors import SegMoTEError
from segmote_core.files import atomic_write, atomic_write_text


@pytest.fixture()
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_gets_the_umask_mode_and_an_overwritten_one_keeps_its_own(tmp_path, umask_027):
    new = atomic_write_text(tmp_path / "sub" / "report.json", "{}")
    assert new.read_text() == "{}" and mode(new) == 0o640  # 0666 minus umask 027, not mkstemp's 0600
    os.chmod(new, 0o604)
    atomic_write_text(new, '{"a": 1}')
    assert new.read_text() == '{"a": 1}' and mode(new) == 0o604
    assert atomic_write_text(tmp_path / "shared.txt", "x", mode=0o644).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["report.json", "shared.txt", "sub"]


def test_the_temporary_file_keeps_the_suffixes_writers_choose_formats_by(tmp_path):
    seen = []
    atomic_write(tmp_path / "labels.nii.gz", lambda temporary: (seen.append(temporary.name), temporary.write_bytes(b"x")))
    assert seen[0].endswith(".nii.gz") and seen[0].startswith(".labels-")


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "manifest.json", "old")

    def disk_full(temporary):
        temporary.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SegMoTEError) as error:
        atomic_write(path, disk_full)
    assert str(error.value) == "cannot write manifest.json: No space left on device; any previous file is unchanged"
    with pytest.raises(ZeroDivisionError):  # other errors pass through, also cleaned up
        atomic_write(path, lambda temporary: 1 / 0)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["manifest.json"]
