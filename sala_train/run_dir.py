"""What the run directory held before this command, so a start that fails on bad input removes
only what the command itself wrote (``hydra.run.dir=.`` must never delete the user's files).

Hydra creates the directory before the task runs; this callback looks at it just before that.
Hydra's ``${now:}`` resolver is cached on the config, so the path seen here is the one Hydra uses.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

# Run directory -> names of the entries it held before this command (None: it did not exist).
_before: dict[Path, frozenset[str] | None] = {}
# Run directory -> its parents that did not exist yet (Hydra creates them too).
_created_parents: dict[Path, frozenset[Path]] = {}
# Run directories named by the clock (``${now:...}``), which differ between machines.
_timed: set[Path] = set()


class RunDirSnapshot(Callback):
    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        path = Path(str(config.hydra.run.dir)).resolve()
        _before[path] = frozenset(p.name for p in path.iterdir()) if path.is_dir() else None
        _created_parents[path] = frozenset(parent for parent in path.parents if not parent.exists())
        if "${now:" in str(OmegaConf.to_container(config.hydra.run, resolve=False)["dir"]):
            _timed.add(path)


def named_by_the_clock(run_dir: Path) -> bool:
    return run_dir in _timed


def held_before(run_dir: Path, name: str) -> bool:
    """Whether ``run_dir/name`` was there before this command (unknown counts as there)."""
    if run_dir not in _before:
        return True
    before = _before[run_dir]
    return before is not None and name in before


def remove_what_this_command_wrote(run_dir: Path) -> None:
    """Delete the directory if this command created it, else only the entries it added."""
    if run_dir not in _before:
        return  # not snapshotted (a sweep job, or the callback was overridden): remove nothing
    before = _before[run_dir]
    if before is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in run_dir.parents:  # outputs/<date>/ too, when this command made it and it is empty
            if parent not in _created_parents.get(run_dir, ()):
                break
            try:
                parent.rmdir()
            except OSError:
                break  # not empty: another run's directory is there
        return
    for entry in run_dir.iterdir():
        if entry.name in before:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
