"""Checkpoint and stop at the next step boundary when asked to (SLURM preemption or time limit).

A request arrives as SIGUSR1/SIGTERM (SIGUSR2: submitit's warning to a sweep job on SLURM) to this
process, or as a file the SLURM batch script
creates in the run directory (its signal reaches only the batch shell). All ranks agree on the
request with one all-reduce per step, so they stop at the same step and never deadlock; a second
signal exits at once.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from transformers import TrainerCallback

from sala_train.launch.plan import PREEMPT_REQUEST, PREEMPTED_MARKER, RUNNER_STOP_SIGNALS, stop_at_once


class StoppedWhileStarting(Exception):
    """A stop request honoured before the first step: nothing trained, so nothing to save (a
    checkpoint would hold only the starting point, which the next run starts from anyway, and for a
    large model take minutes to write)."""


def record_honoured(run_dir: Path) -> None:
    """Leave the marker the batch script requeues on, and drop the request file (honoured)."""
    (run_dir / PREEMPTED_MARKER).touch()
    (run_dir / PREEMPT_REQUEST).unlink(missing_ok=True)


class PreemptionCallback(TrainerCallback):
    def __init__(self, run_dir: Path):
        self.request = run_dir / PREEMPT_REQUEST
        self.marker = run_dir / PREEMPTED_MARKER
        self.signalled = False
        self.preempted = False
        if threading.current_thread() is threading.main_thread():
            for sig in RUNNER_STOP_SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled:
            stop_at_once(signum)  # second signal: stop now
        self.signalled = True

    def _agreed(self, device: Any, looks: bool) -> bool:
        """Whether any rank was asked to stop. ``looks``: this rank looks for the request file (one
        per node does: the all-reduce tells the others, and a shared file system is spared a stat
        per step from every GPU)."""
        wanted = self.signalled or (looks and self.request.exists())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(wanted)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            wanted = bool(flag.item())
        return wanted

    def asked_before_training(self, args: Any) -> bool:
        """Whether any rank was asked to stop while the runner started up: one agreement, once
        every rank has its model and Trainer, before the first step (see StoppedWhileStarting)."""
        return self._agreed(args.device, looks=args.local_process_index == 0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._agreed(args.device, looks=args.local_process_index == 0):
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
            # The loss of the steps since the last log: unlogged, the resumed run never has them.
            control.should_log = args.logging_strategy != "no"

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Stopped part-way through an epoch, the Trainer still ends it as an epoch: by epoch it
        # would evaluate there and save the checkpoint just saved again, in the stop's grace time,
        # an evaluation no uninterrupted run has (which could then become the best checkpoint).
        if self.preempted and state.epoch is not None and abs(state.epoch - round(state.epoch)) > 1e-6:
            control.should_evaluate = control.should_save = False

    def withdraw(self) -> None:
        """Drop the stop request, once honoured or when the run will not honour it (it failed): a
        rerun would otherwise stop at once."""
        self.request.unlink(missing_ok=True)

    def mark(self, is_main: bool) -> None:
        """Leave the marker the batch script requeues on (after the checkpoint is written)."""
        if is_main:
            record_honoured(self.marker.parent)
