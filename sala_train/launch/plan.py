"""Pure launch planning: resolved config + run directory -> argv lists and environment.

Commands are argv lists, never strings joined for a shell; ``shlex.join`` is used only to show
them (dry run) in a form a user can paste.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sala_train.config.schema import LocalLauncher, RunConfig

RUNNER_MODULE = "sala_train.runner"


@dataclass(frozen=True)
class LaunchPlan:
    """One command to run, on one node."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    def display(self) -> str:
        exports = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return " ".join([*exports, shlex.join(self.argv)])


def runner_argv(run_dir: Path) -> tuple[str, ...]:
    return (sys.executable, "-m", RUNNER_MODULE, str(run_dir))


def plan_launch(cfg: RunConfig, run_dir: Path) -> list[LaunchPlan]:
    """Commands that train ``cfg`` in ``run_dir`` (one per node)."""
    match cfg.launcher:
        case LocalLauncher():
            return [LaunchPlan(argv=runner_argv(run_dir))]
