"""Run a launch plan on this machine and return the runner's exit status."""

from __future__ import annotations

import os
import subprocess

from sala_train.launch.plan import LaunchPlan


def run_local(plan: LaunchPlan) -> int:
    """Run the command in a child process so memory is freed between sweep jobs."""
    env = {**os.environ, **plan.env}
    return subprocess.run(list(plan.argv), env=env, check=False).returncode
