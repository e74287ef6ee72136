"""Run bookkeeping: ``metrics.jsonl`` (one JSON object per log event) and ``loss.png``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsFileCallback(TrainerCallback):
    """Append each Trainer log event to ``metrics.jsonl`` with its step and throughput."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_FILE
        self._last: tuple[float, int] | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step, "time": round(time.time(), 3)}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        record["event"] = "eval" if "eval_loss" in logs else "summary" if "train_runtime" in logs else "train"
        tokens = logs.get("num_input_tokens_seen")
        if record["event"] == "train" and isinstance(tokens, (int, float)):
            now = time.monotonic()
            if self._last is not None and now > self._last[0]:
                record["tokens_per_second"] = round((tokens - self._last[1]) / (now - self._last[0]), 1)
            self._last = (now, int(tokens))
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics_after(run_dir: Path, step: int) -> None:
    """Drop events past ``step`` (a resumed run logs them again)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step and r.get("event") != "summary"]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)


def best_eval_loss(run_dir: Path) -> float | None:
    losses = [r["eval_loss"] for r in read_metrics(run_dir) if isinstance(r.get("eval_loss"), (int, float))]
    finite = [v for v in losses if math.isfinite(v)]
    return min(finite) if finite else None


def plot_losses(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train" and "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / PLOT_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
