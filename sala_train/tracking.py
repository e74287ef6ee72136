"""Training-side bookkeeping: the callback that writes ``metrics.jsonl``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sala_train.metrics import METRICS_FILE, end_at_a_whole_line, metrics_line


class MetricsFileCallback(TrainerCallback):
    """Append each Trainer log event to ``metrics.jsonl``, tagged train / eval / test / summary.

    Train events carry the Trainer's own throughput (``train_tokens_per_second``, non-padding
    tokens) and ``num_input_tokens_seen``.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_FILE
        # Which session (this process: a resume starts another) wrote a record; the Trainer's
        # train_runtime restarts with each, and clocks are no guide across nodes.
        self.session = round(time.time(), 3)
        self.appended = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Where this session starts: the tokens already seen (a resume from another run's checkpoint
        counts that run's), so a report can count only what this run trained."""
        if state.is_world_process_zero:
            self._append(state, "start", {"num_input_tokens_seen": state.num_input_tokens_seen})

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        event = ("eval" if "eval_loss" in logs else "test" if "test_loss" in logs
                 else "summary" if "train_loss" in logs else "train")  # fmt: skip
        self._append(state, event, {k: v for k, v in logs.items() if isinstance(v, (int, float, str))})

    def _append(self, state: Any, event: str, fields: dict[str, Any]) -> None:
        record = {"step": state.global_step, "time": round(time.time(), 3), "session": self.session, "event": event}
        if not self.appended:
            end_at_a_whole_line(self.path)  # after a killed session's cut-off line
            self.appended = True
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(metrics_line(record | fields))
