"""``sala-report PATH``: summarise a run, or every job of a multirun sweep, from files alone.

Reads only what runs write (``config.yaml``, ``metrics.jsonl``, ``status.json``, Hydra's
``.hydra/overrides.yaml``): a report never imports a model or re-runs anything.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import socket
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from sala_train.atomic import write_text_atomic
from sala_train.config.io import CONFIG_FILE
from sala_train.config.typed import ConfigError
from sala_train.errors import USER_ERROR_EXIT, resolved
from sala_train.liveness import process_ended, this_process
from sala_train.metrics import METRICS_FILE, MetricsError, eval_curve, read_metrics, trained_evals
from sala_train.provenance import PROVENANCE_FILE, override_key, without_dry_run

STATUS_FILE = "status.json"


class RunStatus(str, Enum):
    """The words ``status.json`` holds: written by the launcher, or by a SLURM job's batch script
    (which formats them into its text, hence ``__format__``: a str-mixin Enum formats as its name
    on some Python versions)."""

    COMPLETED = "completed"
    FAILED = "failed"
    PREEMPTED = "preempted"
    SUBMITTED = "submitted"  # also a requeued SLURM job, until it runs again
    RUNNING = "running"  # written by the runner's rank 0 as it starts (with its host and pid)
    INCOMPLETE = "incomplete"  # no status.json, or a running one whose process is gone (killed)
    NOT_STARTED = "not started"  # config.yaml only: a dry run's, or a launch stopped before training
    REFUSED = "refused"  # a sweep job refused before it started, in a directory of its own (``write_refused``)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


REPORT_MD, REPORT_CSV, SWEEP_PNG = "report.md", "report.csv", "sweep.png"
COLUMNS = ("job", "overrides", "status", "best_eval_loss", "best_step", "final_eval_loss", "test_loss", "steps",
           "tokens", "tokens_per_s", "runtime_s")  # fmt: skip


def write_status(run_dir: Path, status: RunStatus, exit_code: int) -> None:
    """Written by the runner's rank 0 as it ends, then by the launching process (which also sees
    a rank that crashed or was killed) when the runner ends or is submitted."""
    write_text_atomic(run_dir / STATUS_FILE, json.dumps({"status": str(status), "exit_code": exit_code}) + "\n")


def write_refused(run_dir: Path, reason: str) -> None:
    """A sweep job refused before it started, in a new directory: the sweep's report lists it with
    its overrides (Hydra's record there) and why, as it lists a failed one. (A single run refused
    leaves nothing: the command said why, and exited 2.)"""
    record = {"status": str(RunStatus.REFUSED), "exit_code": USER_ERROR_EXIT, "reason": reason}
    write_text_atomic(run_dir / STATUS_FILE, json.dumps(record) + "\n")


def write_running(run_dir: Path) -> None:
    """Written by the runner's rank 0 as training starts. The host and pid let a reader on the
    same host tell a run still going from one whose processes were killed (``read_status``)."""
    record = {"status": str(RunStatus.RUNNING), **this_process()}
    write_text_atomic(run_dir / STATUS_FILE, json.dumps(record) + "\n")


def running_here(run_dir: Path) -> int | None:
    """The pid of a runner on this host that is training in ``run_dir`` now, or None."""
    record = _status_record(run_dir)
    if record is None or record.get("status") != RunStatus.RUNNING or record.get("host") != socket.gethostname():
        return None
    return None if process_ended(record) else int(record["pid"])


def _status_record(run_dir: Path) -> dict[str, Any] | None:
    """``status.json``'s record, or None when there is none or it cannot be read."""
    try:
        record = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class RunSummary:
    job: str
    overrides: str
    status: str
    best_eval_loss: float | None
    best_step: int | None
    final_eval_loss: float | None
    test_loss: float | None  # dataset.test on the final weights; shown, never ranked by
    steps: int
    tokens: int | None
    tokens_per_s: float | None
    runtime_s: float | None
    # False: its metrics.jsonl could not be read (the figures are unknown, not absent)
    readable: bool = True

    def row(self) -> list[str]:
        def fmt(value: Any, digits: int = 4) -> str:
            if value is None:
                return "-"
            return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

        return [self.job, self.overrides, self.status, fmt(self.best_eval_loss), fmt(self.best_step),
                fmt(self.final_eval_loss), fmt(self.test_loss), fmt(self.steps), fmt(self.tokens),
                fmt(self.tokens_per_s, 1), fmt(self.runtime_s, 1)]  # fmt: skip

    def values(self) -> list[Any]:
        """The row for report.csv, for programs: figures as logged (not rounded for the eye), an
        empty cell where there is none (a "-" made the column text to pandas and spreadsheets)."""
        figures = [self.best_eval_loss, self.best_step, self.final_eval_loss, self.test_loss, self.steps,
                   self.tokens, self.tokens_per_s, self.runtime_s]  # fmt: skip
        return [self.job, self.overrides, self.status, *("" if v is None else v for v in figures)]


# The status shown for a sweep job whose metrics.jsonl cannot be read.
UNREADABLE = "unreadable metrics"


def read_status(run_dir: Path) -> str:
    if (run_dir / STATUS_FILE).is_file():
        record = _status_record(run_dir) or {}  # a damaged record says nothing: "unknown"
        if record.get("status") == RunStatus.RUNNING and process_ended(record):
            return RunStatus.INCOMPLETE  # killed without a chance to say how it ended
        return str(record.get("status", "unknown"))
    if (run_dir / "final").is_dir():
        return RunStatus.COMPLETED
    trained = (run_dir / METRICS_FILE).is_file() or any(run_dir.glob("checkpoint-*"))
    return RunStatus.INCOMPLETE if trained else RunStatus.NOT_STARTED


def _overrides(run_dir: Path) -> str:
    """The run's command-line overrides: the command sala-train wrote to ``provenance.json`` with
    the run's ``config.yaml``, or (older runs) Hydra's record. Hydra rewrites its record for every
    command that names the directory, a refused one too, so it could show values never trained."""
    try:
        items = json.loads((run_dir / PROVENANCE_FILE).read_text())["command"][1:]
    except (OSError, ValueError, KeyError, TypeError):
        path = run_dir / ".hydra" / "overrides.yaml"
        items = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    shown = [i for i in without_dry_run([str(i) for i in items]) if not override_key(i).startswith("hydra.")]
    return " ".join(shown)


def summarise(run_dir: Path, job: str = "") -> RunSummary:
    records = read_metrics(run_dir)
    evals = eval_curve(records)
    trained = trained_evals(records)
    best = min(trained, key=lambda e: e[1]) if trained else None
    tokens, timed = trained_tokens(records)
    runtime = training_seconds(records)
    return RunSummary(
        job=job or run_dir.name,
        overrides=_overrides(run_dir),
        status=read_status(run_dir),
        best_eval_loss=best[1] if best else None,
        best_step=best[0] if best else None,
        # (of the trained model: a run stopped before its first evaluation after step 0 has none)
        final_eval_loss=next((loss for step, loss in reversed(evals) if step > 0), None),
        test_loss=next(
            (r["test_loss"] for r in reversed(records) if r.get("event") == "test" and "test_loss" in r), None
        ),
        steps=max((r.get("step", 0) for r in records), default=0),
        tokens=tokens,
        tokens_per_s=timed / runtime if timed is not None and runtime else None,
        runtime_s=runtime,
    )


def _token_spans(records: list[dict[str, Any]], timed: bool = False) -> list[tuple[int, int]] | None:
    """(count at its start, last logged count) of each session, in order; None without counts.
    ``timed``: the last count of a record that times the session (``train_runtime``, which
    ``training_seconds`` reads; an evaluation's record has the count but not the time)."""
    seen = [r for r in records if "num_input_tokens_seen" in r
            and (not timed or "train_runtime" in r or r.get("event") == "start")]  # fmt: skip
    if not seen:
        return None
    if not any(r.get("event") == "start" for r in seen):  # (written before sessions recorded a start)
        return [(0, int(max(r["num_input_tokens_seen"] for r in seen)))]
    spans: dict[Any, list[int]] = {}
    for r in seen:
        span = spans.setdefault(r.get("session"), [0, 0])
        if r.get("event") == "start":
            span[0] = r["num_input_tokens_seen"]
        span[1] = max(span[1], r["num_input_tokens_seen"])
    return [(int(start), int(end)) for start, end in spans.values()]


def trained_tokens(records: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """(tokens this run trained, those of its timed spans). Each session counts from where it
    started (its ``start`` record), so a run resumed from another run's checkpoint does not count
    that run's, to where it got: its last log, or the checkpoint the next session resumed from when
    that is further (a preempted session saves one past its last log). The timed spans end at each
    session's last timed log, as ``training_seconds`` does (a killed session's last kept record may
    be an evaluation past it). Records from before ``start`` records: the
    last count."""
    spans = _token_spans(records)
    if spans is None:
        return None, None
    ends = [max(end, following[0]) for (_, end), following in itertools.pairwise(spans)] + [spans[-1][1]]
    trained = sum(end - start for (start, _), end in zip(spans, ends, strict=True))
    return trained, sum(end - start for start, end in _token_spans(records, timed=True) or [])


# In records without a session (older runs): a session's first log can come this long after its
# start and still be read as the same session.
_SESSION_GAP_S = 0.5


def training_seconds(records: list[dict[str, Any]]) -> float | None:
    """Seconds of training summed over the run's sessions. Each resume restarts the Trainer's
    ``train_runtime``, so the last session's alone would leave out the time before; a session
    that was stopped counts up to its last kept log."""
    sessions: dict[Any, float] = {}
    guessed, last_time = 0, None
    for record in records:
        if "train_runtime" not in record:
            continue
        if "session" in record:
            key: Any = ("session", record["session"])
        else:  # written before records named their session: a new one began after the last log
            now = record.get("time")
            if now is not None and last_time is not None and now - record["train_runtime"] > last_time + _SESSION_GAP_S:
                guessed += 1
            key = ("guessed", guessed)
            last_time = now if now is not None else last_time
        sessions[key] = max(sessions.get(key, 0.0), record["train_runtime"])
    return sum(sessions.values()) if sessions else None


def job_order(name: str) -> tuple[bool, int, str]:
    """Sweep jobs in number order (0, 1, ..., 10), then any other directory by name."""
    return (not name.isdigit(), int(name) if name.isdigit() else 0, name)


# How deep below a sweep directory its jobs are looked for: a hydra.sweep.subdir of several parts
# (``${hydra.job.override_dirname}`` with a path among the values, ``lr/${train.learning_rate}``).
_JOB_DEPTH = 4


def sweep_jobs(path: Path) -> list[Path]:
    """The run directories of the sweep in ``path``, in job order: at any depth up to
    ``_JOB_DEPTH``, not inside another run (its checkpoints) nor in hidden ones (``.hydra/``
    holds Hydra's own config.yaml; ``.submitit/`` submitit's)."""
    from sala_train.checkpoints import SWEEP_MARKS

    jobs: list[Path] = []
    level = [path]
    # (deeper only in a sweep's own directory: `sala-report outputs/` is no sweep of every run under it)
    depth = _JOB_DEPTH if any((path / mark).is_file() for mark in SWEEP_MARKS) else 1
    for _ in range(depth):
        below = []
        for folder in level:
            for p in folder.iterdir():
                if not p.is_dir() or p.name.startswith("."):
                    continue
                if (p / CONFIG_FILE).is_file() or read_status(p) == RunStatus.REFUSED:
                    jobs.append(p)
                else:
                    below.append(p)
        level = below
    return sorted(jobs, key=lambda p: job_order(job_name(path, p)))


def job_name(sweep: Path, job: Path) -> str:
    """A job as the sweep's table names it: its directory below the sweep's (``3``, or
    ``lr=0.001/seed=1`` for a subdir of several parts)."""
    return str(job.relative_to(sweep))


def sort_by_best(rows: list[RunSummary]) -> list[RunSummary]:
    """Best validation loss first; failed runs (a diverged one's best came before it diverged, and
    Optuna counts it failed) after the others, runs without a loss after them, and those whose
    metrics could not be read last."""
    return sorted(rows, key=lambda r: (not r.readable, r.status == RunStatus.FAILED, r.best_eval_loss is None,
                                       r.best_eval_loss or 0.0))  # fmt: skip


def table(rows: list[RunSummary]) -> str:
    cells = [list(COLUMNS), *(r.row() for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def markdown(rows: list[RunSummary]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r.row()) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[RunSummary]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    writer.writerows(r.values() for r in rows)
    return out.getvalue()


def legend_labels(rows: list[RunSummary]) -> dict[str, str]:
    """Each job's overrides but those every job has: what the sweep varied (cut to fit a legend,
    the shared ones came first and hid it)."""
    items = {r.job: r.overrides.split() for r in rows}
    shared = set.intersection(*map(set, items.values())) if len(items) > 1 else set()
    return {job: " ".join(o for o in overrides if o not in shared) or job for job, overrides in items.items()}


def plot_sweep(path: Path, jobs: list[Path], rows: list[RunSummary]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    labels = legend_labels(rows)
    for job in jobs:
        evals = eval_curve(read_metrics(job))
        if evals:
            name = job_name(path, job)
            label = f"{name}: {labels.get(name, '')}"
            ax.plot(*zip(*evals, strict=True), marker="o", label=label if len(label) <= 80 else label[:79] + "…")
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_title(f"sweep {path.name}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = path / SWEEP_PNG
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def report(path: Path) -> str:
    """Print-ready text; writes report.md/report.csv/sweep.png for a sweep, loss.png for a run."""
    from sala_train.plots import plot_losses

    if (path / CONFIG_FILE).is_file():
        s = summarise(path)
        plotted = plot_losses(path)
        return table([s]) + (f"\n\nloss curves: {plotted}" if plotted is not None else "")
    if read_status(path) == RunStatus.REFUSED:  # (a sweep's job, refused before it started)
        reason = (_status_record(path) or {}).get("reason") or "(no reason recorded)"
        return table([summarise(path)]) + f"\n\nrefused before it started:\n{reason}"
    jobs = sweep_jobs(path)
    if not jobs:
        raise FileNotFoundError(f"{path}: neither a run directory (config.yaml) nor a sweep of them")
    problems: list[str] = []
    rows = sort_by_best([_summarise_or_flag(job, job_name(path, job), problems) for job in jobs])
    (path / REPORT_MD).write_text(markdown(rows), encoding="utf-8")
    (path / REPORT_CSV).write_text(csv_text(rows), encoding="utf-8")
    unreadable = {r.job for r in rows if not r.readable}
    png = plot_sweep(path, [job for job in jobs if job_name(path, job) not in unreadable], rows)
    for problem in problems:
        print(f"sala-report: warning: {problem}; its job is shown as {UNREADABLE}", file=sys.stderr)
    return table(rows) + f"\n\n{len(rows)} jobs; written: {path / REPORT_MD}, {path / REPORT_CSV}, {png}"


def _summarise_or_flag(job: Path, name: str, problems: list[str]) -> RunSummary:
    """One job's summary; a job whose metrics.jsonl cannot be read (a disk that filled, a file
    edited by hand) is a row saying so, not the end of the whole sweep's report."""
    try:
        return summarise(job, name)
    except MetricsError as exc:
        problems.append(str(exc))
        return RunSummary(job=name, overrides=_overrides(job), status=f"{read_status(job)}, {UNREADABLE}",
                          best_eval_loss=None, best_step=None, final_eval_loss=None, test_loss=None, steps=0,
                          tokens=None, tokens_per_s=None, runtime_s=None, readable=False)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sala-report", description=__doc__)
    parser.add_argument("path", type=Path, help="a run directory or a multirun sweep directory")
    args = parser.parse_args(argv)
    try:
        path = resolved(args.path, "PATH")
    except ConfigError as exc:
        print(f"sala-report: {exc.problems[0]}", file=sys.stderr)
        sys.exit(2)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        print(f"sala-report: {path}: {what}; give a run directory or a sweep directory", file=sys.stderr)
        sys.exit(2)
    try:
        print(report(path))
    except (FileNotFoundError, MetricsError) as exc:
        print(f"sala-report: {exc}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `sala-report SWEEP | head`: the reader left; the files are written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    except OSError as exc:  # (a metrics.jsonl or report.md that is a directory, a read-only sweep, ...)
        print(f"sala-report: {exc.filename}: {exc.strerror}" if exc.filename else f"sala-report: {exc}",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
