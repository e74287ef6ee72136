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
