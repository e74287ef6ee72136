"""Lines from several ranks sharing one pipe arrive whole (the DDP digest check reads them)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

LINES = 5000
WRITER = """
import sys
import time
from sala_train.console import say
rank, start, lines = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # both writers start together
for i in range(lines):
    say(f"sala-train: rank {rank} line {i:05d} " + "ab" * 60)
"""
PRINTER = WRITER.replace("say(", "print(").replace("from sala_train.console import say", "")


def _run_two_writers(script: str) -> list[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # as under torchrun: text and newline written apart
    start = str(time.time() + 1.0)
    read, write = os.pipe()
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(rank), start, str(LINES)], stdout=write, env=env)
        for rank in (0, 1)
    ]
    os.close(write)
    with os.fdopen(read) as pipe:
        lines = pipe.read().splitlines()
    assert all(proc.wait() == 0 for proc in procs)
    return lines


def _whole(lines: list[str]) -> int:
    pattern = re.compile(r"sala-train: rank [01] line \d{5} (ab){60}")
    return sum(1 for line in lines if pattern.fullmatch(line))


def test_two_processes_lines_never_interleave():
    lines = _run_two_writers(WRITER)
    assert len(lines) == 2 * LINES and _whole(lines) == 2 * LINES


def test_say_without_a_file_descriptor_writes_to_the_stream():
    from sala_train.console import say

    buffer = io.StringIO()
    say("one line", buffer)
    assert buffer.getvalue() == "one line\n"


def test_a_hung_up_terminal_is_left_for_dev_null_though_isatty_no_longer_says_it_is_one(tmp_path):
    """By the time a SIGHUP handler runs, the kernel has marked the terminal dead and ``isatty``
    says False: the launcher kept writing to it, and a sweep stopped by the hang-up ended in EIO
    tracebacks, exit 1. Its stdout and stderr go to /dev/null; a file is kept."""
    import pty

    log = tmp_path / "log"
    pid, master = pty.fork()
    if pid == 0:  # (on the terminal, with a file for what it finds)
        import signal

        from sala_train.console import leave_the_terminal

        hung_up: list[bool] = []
        signal.signal(signal.SIGHUP, lambda signum, frame: (leave_the_terminal(), hung_up.append(os.isatty(1))))
        kept = os.open(str(log), os.O_WRONLY | os.O_CREAT)
        os.write(1, b"ready\n")
        while not hung_up:
            time.sleep(0.01)
        try:
            os.write(1, b"after\n")
            os.write(2, b"after\n")
            os.write(kept, b"written without EIO")
        except OSError as exc:
            os.write(kept, str(exc).encode())
        os._exit(0)
    os.read(master, 100)
    os.close(master)  # (hang up)
    os.waitpid(pid, 0)
    assert log.read_text() == "written without EIO"
