"""What the run directory held before this command, so a start that fails on bad input removes
only what the command itself wrote (``hydra.run.dir=.`` must never delete the user's files), and a
refused rerun of an existing run puts back Hydra's records of the command that made it.

Hydra creates the directory before the task runs; this callback looks at it just before that.
Hydra's ``${now:}`` resolver is cached on the config, so the path seen here is the one Hydra uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from sala_train.atomic import write_bytes_atomic
from sala_train.backends import DEEPSPEED_FILE
from sala_train.base_weights import BASE_WEIGHTS_FILE
from sala_train.checkpoints import STARTED_FROM
from sala_train.config.io import CONFIG_FILE
from sala_train.launch.plan import PREEMPT_REQUEST, PREEMPTED_MARKER, SLURM_DIR, USER_ERROR_MARKER
from sala_train.liveness import process_ended, this_process
from sala_train.metrics import METRICS_FILE
from sala_train.plots import PLOT_FILE
from sala_train.provenance import PROVENANCE_FILE
from sala_train.report import STATUS_FILE
from sala_train.runner import FINAL_DIR
from sala_train.trackers import TENSORBOARD_DIR

# Held by the command setting up a run directory, from before it reads the directory until it
# ends: two commands started in the same second get the same clock-named directory, and the
# second trained the first's config there (or its refusal removed the first's run).
CLAIM_FILE = ".sala_claim"

# What sala-train (and Hydra for it) writes into a run directory; in a directory that already
# existed, only new entries with these names are removed (never a file someone else put there).
# wandb/ is spelt out: wandb names its own directory.
OWN_NAMES = frozenset(
    {".hydra", CONFIG_FILE, PROVENANCE_FILE, STATUS_FILE, DEEPSPEED_FILE, SLURM_DIR, METRICS_FILE, PLOT_FILE,
     TENSORBOARD_DIR, "wandb", FINAL_DIR, PREEMPTED_MARKER, PREEMPT_REQUEST, USER_ERROR_MARKER, CLAIM_FILE,
     STARTED_FROM, BASE_WEIGHTS_FILE}
)  # fmt: skip


class _Snapshot:
    def __init__(
        self,
        entries: frozenset[str] | None,
        created_parents: frozenset[Path],
        job_log: str,
        records_dir: Path | None,
        hydra_records: dict[Path, tuple[bytes, int]] | None,
    ):
        self.entries = entries  # None: the directory did not exist
        self.created_parents = created_parents  # its parents that did not exist (Hydra creates them too)
        self.job_log = job_log  # Hydra's log file for this job
        self.records_dir = records_dir  # where Hydra writes its records (.hydra/), None: nowhere
        # The files there, which Hydra overwrites (content, mtime); None: the folder did not exist.
        self.hydra_records = hydra_records


_snapshots: dict[Path, _Snapshot] = {}
# Run directories named by the clock (``${now:...}``), which differ between machines.
_timed: set[Path] = set()


class RunDirSnapshot(Callback):
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        """A sweep has no hook before Hydra writes a job's records, so the job directories an
        earlier sweep left in ``hydra.sweep.dir`` are looked at now: a job refused there (it
        holds another config) gets its own ``.hydra/`` back, which ``sala-report`` reads."""
        try:
            HydraConfig.instance().set_config(config)  # for ``${hydra:...}`` in the path
            sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
            raw = str(OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"])
            job_log = f"{config.hydra.job.name}.log"
            subdir = config.hydra.output_subdir
        except Exception:  # unreadable: the jobs are treated as new ones (nothing put back)
            return
        if "${now:" in raw:
            _timed.add(sweep_dir)
        for path in sweep_dir.iterdir() if sweep_dir.is_dir() and subdir is not None else []:
            records = path / subdir
            if path.is_dir() and records.is_dir():
                saved = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in records.iterdir() if f.is_file()}
                entries = frozenset(p.name for p in path.iterdir())
                _snapshots[path] = _Snapshot(entries, frozenset(), job_log, records, saved)

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        try:
            # ``${hydra:...}`` in the path needs the Hydra config, which Hydra sets only later.
            HydraConfig.instance().set_config(config)
            path = Path(str(config.hydra.run.dir)).resolve()
            raw = str(OmegaConf.to_container(config.hydra.run, resolve=False)["dir"])
            job_log = f"{config.hydra.job.name}.log"
            subdir = config.hydra.output_subdir
        except Exception as exc:  # Hydra would only warn that the callback failed; say what is lost
            warnings.warn(f"sala-train: cannot see the run directory before the run ({exc}); bad input will "
                          "leave it in place", stacklevel=1)  # fmt: skip
            return
        entries = frozenset(p.name for p in path.iterdir()) if path.is_dir() else None
        parents = frozenset(parent for parent in path.parents if not parent.exists())
        records = path / subdir if subdir is not None else None
        saved = None
        if records is not None and records.is_dir():
            saved = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in records.iterdir() if f.is_file()}
        _snapshots[path] = _Snapshot(entries, parents, job_log, records, saved)
        if "${now:" in raw:
            _timed.add(path)


def named_by_the_clock(run_dir: Path) -> bool:
    """A run directory, or a sweep job's under a sweep directory, named by the time it began."""
    return run_dir in _timed or any(parent in _timed for parent in run_dir.parents)


def held_before(run_dir: Path, name: str) -> bool:
    """Whether ``run_dir/name`` was there before this command (unknown counts as there)."""
    snapshot = _snapshots.get(run_dir)
    if snapshot is None:
        return True
    return snapshot.entries is not None and name in snapshot.entries


def _ours(name: str, snapshot: _Snapshot) -> bool:
    return name in OWN_NAMES or name == snapshot.job_log or name.startswith("checkpoint-")


def remove_what_this_command_wrote(run_dir: Path) -> None:
    """Delete the directory if this command created it, else only the entries it added."""
    snapshot = _snapshots.get(run_dir)
    if snapshot is None:
        return  # not snapshotted (a new sweep job, or the callback was overridden): remove nothing
    if snapshot.entries is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in run_dir.parents:  # outputs/<date>/ too, when this command made it and it is empty
            if parent not in snapshot.created_parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break  # not empty: another run's directory is there
        return
    for entry in run_dir.iterdir():
        if entry.name in snapshot.entries or not _ours(entry.name, snapshot):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def restore_hydra_records(run_dir: Path, another_command_runs_there: bool = False) -> None:
    """Hydra rewrites ``.hydra/`` (config, overrides) for every command before sala-train can look
    at it; a command refused on an existing run must not leave its own overrides there, where
    ``sala-report`` reads them as the run's. (``another_command_runs_there``: a folder that was not
    there when this command started may be that command's by now, and is left.)"""
    snapshot = _snapshots.get(run_dir)
    if snapshot is None or snapshot.records_dir is None:
        return  # a new sweep job, or records off (hydra.output_subdir=null)
    if snapshot.hydra_records is None:  # this command made the folder
        if not another_command_runs_there:
            shutil.rmtree(snapshot.records_dir, ignore_errors=True)
        return
    for path in snapshot.records_dir.iterdir() if snapshot.records_dir.is_dir() else []:
        if path.is_file() and path not in snapshot.hydra_records:
            path.unlink()
    for path, (data, mtime_ns) in snapshot.hydra_records.items():
        write_bytes_atomic(path, data)
        os.utime(path, ns=(mtime_ns, mtime_ns))


def undo_this_command(run_dir: Path, fresh: bool) -> None:
    """After bad input: what this command wrote is removed (all of it, for a run it started), and
    Hydra's records are put back as they were."""
    if fresh:
        remove_what_this_command_wrote(run_dir)
    restore_hydra_records(run_dir)


# The records a command writes (or, for the marker, removes) in an existing directory before it
# learns whether its input is good: put back as they were when it was refused.
RECORDS = (CONFIG_FILE, PROVENANCE_FILE, STATUS_FILE, DEEPSPEED_FILE, PREEMPTED_MARKER)


class Records:
    """An existing run directory's records before this command, and what training leaves there
    (metrics.jsonl, checkpoints), to tell a refusal before training from a stop after it."""

    def __init__(self, run_dir: Path):
        self.files = {name: (run_dir / name).read_bytes() if (run_dir / name).is_file() else None for name in RECORDS}
        self.trained = _training_trace(run_dir)


def _training_trace(run_dir: Path) -> tuple[Any, ...]:
    metrics = run_dir / METRICS_FILE
    stat = metrics.stat() if metrics.is_file() else None
    return (stat and (stat.st_size, stat.st_mtime_ns), sorted(p.name for p in run_dir.glob("*checkpoint-*")))


def records_before(run_dir: Path) -> Records | None:
    """This directory's records, when it existed before this command (None: a new one, or one not
    looked at, such as a sweep job's: nothing to put back)."""
    snapshot = _snapshots.get(run_dir)
    if snapshot is None or snapshot.entries is None:
        return None
    return Records(run_dir)


def put_back(run_dir: Path, records: Records | None) -> None:
    """After bad input in an existing directory, found before training: what the command added is
    removed and its records are as they were (a preempted run stays preempted; a user's own
    ``config.yaml`` in ``hydra.run.dir=.`` stays theirs), Hydra's too. Not once training left a
    trace (a full disk after checkpoints, a damaged checkpoint found while resuming): the
    records then say what happened."""
    if records is None or _training_trace(run_dir) != records.trained:
        return
    remove_what_this_command_wrote(run_dir)
    for name, data in records.files.items():
        if data is None:
            (run_dir / name).unlink(missing_ok=True)
        else:
            write_bytes_atomic(run_dir / name, data)
    restore_hydra_records(run_dir)


class DirectoryTaken(Exception):
    """Another live command on this machine is setting up or training in the run directory."""

    def __init__(self, pid: int):
        super().__init__(pid)
        self.pid = pid


@contextlib.contextmanager
def claimed(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this command (DirectoryTaken when another live one here holds it; a
    claim left by a process that ended, or by another machine's, is taken over)."""
    path = run_dir / CLAIM_FILE
    me = this_process()
    run_dir.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text(encoding="utf-8") or "null")
            except (OSError, ValueError):
                holder = None
            if holder is None:  # created this instant, not yet written: held
                raise DirectoryTaken(0) from None
            if holder.get("host") == me["host"] and holder.get("pid") != me["pid"] and not process_ended(holder):
                raise DirectoryTaken(int(holder["pid"])) from None
            path.unlink(missing_ok=True)  # its command ended, or another node's (nodes share it)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        break
    try:
        snapshot = _snapshots.get(run_dir)
        if snapshot is not None and snapshot.entries is None:
            # New to this command, yet another one's run is there now (it ended as this one started).
            records = snapshot.records_dir.name if snapshot.records_dir is not None else None
            if {p.name for p in run_dir.iterdir()} - {CLAIM_FILE, snapshot.job_log, records}:
                raise DirectoryTaken(0)
        yield
    finally:
        with contextlib.suppress(OSError):  # (a read-only file system now: the next command takes a stale claim over)
            path.unlink(missing_ok=True)
