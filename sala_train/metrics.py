"""Read and trim ``metrics.jsonl`` (one JSON object per log event). No heavy imports: the launcher
reads it after every run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sala_train.atomic import write_text_atomic

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every event; a last line cut short by a killed writer is skipped (it is logged again on resume)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise
    return records


def truncate_metrics_after(run_dir: Path, step: int) -> None:
    """Drop events past ``step`` (a resumed run logs them again)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step and r.get("event") != "summary"]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def eval_curve(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, eval_loss) of every eval event, in order."""
    return [(r["step"], r["eval_loss"]) for r in records if r.get("event") == "eval"]


def best_eval_loss(run_dir: Path) -> float | None:
    finite = [loss for _, loss in eval_curve(read_metrics(run_dir)) if math.isfinite(loss)]
    return min(finite) if finite else None
