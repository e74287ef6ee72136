"""Run a launch plan on this machine and return its exit status."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sala_train.atomic import write_text_atomic
from sala_train.launch.plan import LaunchPlan


def write_files(plan: LaunchPlan) -> None:
    for name, text in plan.files.items():
        write_text_atomic(Path(name), text)


def run_local(plan: LaunchPlan) -> int:
    """Run the command in a child process so memory is freed between sweep jobs."""
    write_files(plan)
    env = {**os.environ, **plan.env}
    return subprocess.run(list(plan.argv), env=env, check=False).returncode
