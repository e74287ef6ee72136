"""Write a file so that readers see the old content or the new, never half of it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside the target, then rename over it (several processes may write the same file)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:  # (a full disk, a directory in the way: no temporary file left behind)
        tmp.unlink(missing_ok=True)
        raise


def cannot_make_directory_in(parent: Path) -> str | None:
    """Why no directory can be made in ``parent`` (permissions, a read-only or virtual file system),
    found by making one and removing it: os.access answers yes to root, even on /proc. None: it can."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sala-probe-", dir=parent))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def readable_weights(directory: Path) -> None:
    """safetensors (0.8) writes its files readable by their owner alone (0600) whatever the umask,
    so a model written for a serving process under another account could not be read by it; they
    get the mode any other file gets (0666 less the umask), as their config and tokenizer have
    (in the folders below too: a DPO/KTO checkpoint's reference adapter)."""
    mode = 0o666 & ~_umask()
    for path in directory.rglob("*.safetensors"):
        path.chmod(mode)


def _umask() -> int:
    """The process's umask, read where Linux shows it (setting it to read it, as os.umask must,
    would change it for every thread for that moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o22)
    os.umask(umask)
    return umask
