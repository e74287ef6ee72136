"""Read and trim ``metrics.jsonl`` (one JSON object per log event). No heavy imports: the launcher
reads it after every run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sala_train.atomic import write_text_atomic
from sala_train.errors import DataError

METRICS_FILE = "metrics.jsonl"
# Strict JSON has no NaN or Infinity (jq and most non-Python readers refuse Python's bare tokens):
# a diverged loss is written as one of these strings, and read back as the float.
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def metrics_line(record: dict[str, Any]) -> str:
    """One strict-JSON line; non-finite floats as "NaN", "Infinity" or "-Infinity"."""
    fields = {k: _finite_or_name(v) for k, v in record.items()}
    return json.dumps(fields, allow_nan=False) + "\n"


def _finite_or_name(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    return value


def _parse_line(line: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(line)
    return {k: NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}


class MetricsError(DataError):
    """metrics.jsonl holds something sala-train never writes (edited, or another file put there)."""


# Fields the readers compute with: each must be a number when present.
_NUMERIC = ("step", "loss", "eval_loss", "test_loss", "train_runtime", "num_input_tokens_seen", "time")
# Fields an event always has, which the readers take without looking (a session is a key, too).
_REQUIRED = {"eval": ("step", "eval_loss"), "train": ("step",), "start": ("step",)}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every event; a last line cut short by a killed writer is skipped (it is logged again on resume)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MetricsError(f"{path}: not UTF-8 text (byte {exc.start}); not a file sala-train wrote") from exc
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = _parse_line(line)
        except (json.JSONDecodeError, AttributeError) as exc:  # (AttributeError: JSON, but not an object)
            # (only a last line cut short, without its newline, is a killed writer's: a whole line
            # that is not JSON was written by someone else, and is said as any other line is)
            if i == len(lines) - 1 and isinstance(exc, json.JSONDecodeError) and not text.endswith("\n"):
                continue
            raise MetricsError(f"{path}:{number}: not a JSON object; not a line sala-train wrote") from exc
        for key in _NUMERIC:
            if key in record and (isinstance(record[key], bool) or not isinstance(record[key], int | float)):
                raise MetricsError(f"{path}:{number}: {key} is {record[key]!r}, expected a number")
        for key in _REQUIRED.get(str(record.get("event")), ()):
            if key not in record:
                raise MetricsError(f"{path}:{number}: a record of event {record['event']!r} without {key}; not a "
                                   "line sala-train wrote")  # fmt: skip
        if not isinstance(record.get("session"), str | int | float | None):
            raise MetricsError(f"{path}:{number}: session is {record['session']!r}, expected a string or a number")
        records.append(record)
    return records


def end_at_a_whole_line(path: Path) -> None:
    """Before a session appends: a last line a killed writer cut short is removed (or, whole but for
    its newline, ended). Readers skip a cut-off last line, but after another line it is no longer
    the last, and every reader would refuse the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        whole = isinstance(json.loads(data[start:]), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        whole = False
    if whole:
        with path.open("ab") as fh:
            fh.write(b"\n")
    else:
        with path.open("rb+") as fh:
            fh.truncate(start)


def truncate_metrics_after(run_dir: Path, step: int) -> None:
    """Drop events past ``step`` (a resumed run logs them again). A session's summary at ``step``
    stays: it describes that session up to the checkpoint (a rerun with nothing left to train
    writes none, and the report's runtime lost the finished session's)."""
    _keep_only(run_dir, lambda r: r.get("step", 0) <= step)


def drop_events(run_dir: Path, event: str, step: int) -> None:
    """Drop the ``event`` records of ``step`` (a figure about to be logged again)."""
    _keep_only(run_dir, lambda r: not (r.get("event") == event and r.get("step") == step))


def _keep_only(run_dir: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite metrics.jsonl (atomically) with the records ``keep`` accepts; untouched when it
    accepts them all, or when there is no file."""
    records = read_metrics(run_dir)
    kept = [r for r in records if keep(r)]
    if len(kept) < len(records):
        write_text_atomic(run_dir / METRICS_FILE, "".join(metrics_line(r) for r in kept))


def eval_curve(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, eval_loss) of every eval event, in order."""
    return [(r["step"], r["eval_loss"]) for r in records if r.get("event") == "eval"]


def trained_evals(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """The finite eval losses of the trained model: the step-0 evaluation (``eval_on_start``) is
    the untouched starting point, the same for every job of a LoRA sweep, so it must not be a
    job's best (a job whose training made things worse would tie with the best of the others)."""
    return [(step, loss) for step, loss in eval_curve(records) if step > 0 and math.isfinite(loss)]


def best_eval_loss(run_dir: Path) -> float | None:
    """What a sweep ranks a job by and an Optuna search minimises."""
    evals = trained_evals(read_metrics(run_dir))
    return min(loss for _, loss in evals) if evals else None
