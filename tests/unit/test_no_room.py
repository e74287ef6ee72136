"""Which write failures the runner reports as no room to write, or as a read-only run directory."""

from __future__ import annotations

import errno
import resource

import pytest


@pytest.fixture
def file_size_limit():
    """A finite ``ulimit -f`` (1 TiB, as clusters set), restored after."""
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 40, before[1]))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, before)


def test_under_a_file_size_limit_only_errno_less_write_errors_are_taken_for_no_room(tmp_path, file_size_limit):
    """Any OSError was "no room to write ... make room" under a finite ulimit -f (a connection
    reset, a permission refused): its errno says what it was."""
    from sala_train.runner import _full_disk

    assert not _full_disk(tmp_path, ConnectionResetError(errno.ECONNRESET, "reset"))
    assert not _full_disk(tmp_path, PermissionError(errno.EACCES, "denied"))
    assert _full_disk(tmp_path, OSError(errno.EFBIG, "File too large"))
    assert _full_disk(tmp_path, OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert _full_disk(tmp_path, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2"))
    assert not _full_disk(tmp_path, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_a_read_only_cache_elsewhere_is_not_the_run_directory(tmp_path):
    from sala_train.runner import _read_only

    assert not _read_only(tmp_path)  # (EROFS from a read-only HF cache is then the error it is)
