"""What a person watching a run sees: a progress bar on a terminal, plain lines elsewhere.

Replaces the Trainer's own tqdm bar and its printed log dicts: the bar shows ETA, loss and real
(non-padding) tokens/s; off a terminal (CI, SLURM logs, ``| tee``) a bar's carriage returns make
unreadable logs, so every logging step prints one line instead.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, TextIO

from transformers import TrainerCallback

from sala_train.console import QuietWhenGone, say


def _duration(seconds: float) -> str:
    # (capped below timedelta's limit: train.max_steps=10**15 gave an OverflowError at the first log)
    return str(timedelta(seconds=int(min(max(seconds, 0), 10**9 * 86400 - 1))))


def warmup_warning(args: Any, max_steps: int) -> str | None:
    """A warm-up as long as the run never trains at ``train.learning_rate``: the step-``s`` update
    uses ``s / warmup`` of it, so the last one (``s = max_steps - 1``) reaches it only when
    ``warmup < max_steps``. Known once the Trainer has counted the steps (epochs x batches)."""
    warmup = args.warmup_steps
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < max_steps:
        return None  # (a float below 1 is train.warmup_ratio: a share of the steps)
    return (f"sala-train: WARNING: train.warmup_steps={warmup} is not below the run's {max_steps} optimizer "
            f"steps: the learning rate never reaches train.learning_rate={args.learning_rate:g}; set fewer "
            "train.warmup_steps, or train.warmup_steps=0 train.warmup_ratio=0.1")  # fmt: skip


class ProgressCallback(TrainerCallback):
    """Progress on the main process only; ``interactive`` picks the bar or the lines."""

    def __init__(self, interactive: bool, stream: TextIO | None = None):
        self.interactive = interactive
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self._start_time = 0.0
        self._start_step = 0
        self._last: tuple[float, int, float] | None = None  # (time, tokens seen, paused) at the previous train log
        # Seconds spent evaluating and saving, which tokens/s leaves out: they come after a step's
        # end (and its log), before the next step begins.
        self._paused = 0.0
        self._step_end = 0.0
        self._pausing = False
        self.tokens_per_second: float | None = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if state.global_step == 0 and (warning := warmup_warning(args, state.max_steps)):
            say(warning, self.stream)
        self._start_time = time.monotonic()
        self._step_end = self._start_time  # (an evaluation at the start pauses from here)
        self._start_step = state.global_step
        self._last = (self._start_time, state.num_input_tokens_seen, self._paused)
        if self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True,
                            file=QuietWhenGone(self.stream), desc="train")  # fmt: skip

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_evaluate or control.should_save:
            # A pause follows: it must start once the GPU has finished the step. Else the wait came
            # in the evaluation's first read and was left out of tokens/s as pause (one process on
            # a GPU: several synchronise at the preemption check before this).
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        self._step_end = time.monotonic()
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._pausing = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._pausing = True

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._pausing:
            self._paused += time.monotonic() - self._step_end
            self._pausing = False

    def eta_seconds(self, state: Any, now: float) -> float | None:
        done = state.global_step - self._start_step
        if done <= 0:
            return None
        return (now - self._start_time) / done * (state.max_steps - state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        now = time.monotonic()
        if "loss" in logs and self._last is not None:
            then, tokens, paused = self._last
            training = now - then - (self._paused - paused)
            if training > 0 and state.num_input_tokens_seen > tokens:
                self.tokens_per_second = (state.num_input_tokens_seen - tokens) / training
            self._last = (now, state.num_input_tokens_seen, self._paused)
        if self.bar is not None and ("train_loss" in logs or "test_loss" in logs):
            # The summary, or the test set after training (a resume with nothing left to train
            # has no summary): the bar is done, the line stays.
            self._close_bar()
        if self.bar is not None:
            # Keys are kept across logs: an evaluation adds eval_loss beside the last train loss.
            if "loss" in logs:
                self.postfix["loss"] = f"{logs['loss']:.4f}"
            if "eval_loss" in logs:
                self.postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
            if self.tokens_per_second is not None:
                self.postfix["tok/s"] = f"{self.tokens_per_second:,.0f}"
            if self.postfix:
                self.bar.set_postfix(self.postfix, refresh=True)
            return
        say(self.line(state, logs, now), self.stream)

    def line(self, state: Any, logs: dict[str, Any], now: float) -> str:
        """One log line: ``step 20/300 (6.7%) | loss 2.3140 | lr 2.90e-03 | 1,234 tok/s | elapsed … | eta …``."""
        percent = 100 * state.global_step / max(state.max_steps, 1)
        parts = [f"step {state.global_step}/{state.max_steps} ({percent:.1f}%)"]
        if "eval_loss" in logs:
            parts.append(f"eval_loss {logs['eval_loss']:.4f}")
        elif "test_loss" in logs:  # the test set, once, on the final weights
            parts.append(f"test_loss {logs['test_loss']:.4f}")
        elif "train_loss" in logs:  # the Trainer's summary at the end of train(), also when stopped early
            ended = "done" if state.global_step >= state.max_steps else "stopped"
            # (the Trainer's mean is of this session's steps: a resumed run's first ones are not in it)
            since = f" of steps {self._start_step + 1}-{state.global_step}" if self._start_step else ""
            parts.append(f"{ended}: mean train loss{since} {logs['train_loss']:.4f}")
        else:
            if "loss" in logs:
                parts.append(f"loss {logs['loss']:.4f}")
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            if self.tokens_per_second is not None:
                parts.append(f"{self.tokens_per_second:,.0f} tok/s")
        parts.append(f"elapsed {_duration(now - self._start_time)}")
        eta = self.eta_seconds(state, now)
        if eta is not None and state.global_step < state.max_steps and "train_loss" not in logs:
            parts.append(f"eta {_duration(eta)}")
        return "sala-train: " + " | ".join(parts)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
