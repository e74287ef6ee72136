"""The progress display: a bar with ETA, loss and tokens/s on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import re

from transformers import TrainerControl, TrainerState, TrainingArguments

from sala_train.progress import ProgressCallback


def drive(interactive: bool) -> str:
    """Feed the callback what the Trainer feeds it over 4 of 8 steps: 100 real tokens per step."""
    out = io.StringIO()
    callback = ProgressCallback(interactive=interactive, stream=out)
    args, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerControl()
    state = TrainerState(max_steps=8, num_input_tokens_seen=0)
    callback.on_train_begin(args, state, control)
    callback._start_time -= 8.0  # as if 8 s passed over the 4 steps below
    callback._last = (callback._last[0] - 8.0, 0, 0.0)
    for step in range(1, 5):
        state.global_step, state.num_input_tokens_seen = step, 100 * step
        callback.on_step_end(args, state, control)
    callback.on_log(args, state, control, logs={"loss": 2.5, "learning_rate": 1e-4})
    callback.on_log(args, state, control, logs={"eval_loss": 2.25})
    if interactive:  # the Trainer's summary comes before on_train_end
        state.global_step = 8
        callback.on_log(args, state, control, logs={"train_loss": 2.4, "train_runtime": 8.0})
    callback.on_train_end(args, state, control)
    return out.getvalue()


def summary_line(step: int, started_at: int = 0) -> str:
    """The line for the summary the Trainer logs when train() returns at ``step`` of 8."""
    out = io.StringIO()
    callback = ProgressCallback(interactive=False, stream=out)
    args, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerControl()
    state = TrainerState(max_steps=8, global_step=started_at)
    callback.on_train_begin(args, state, control)
    state.global_step = step
    callback.on_log(args, state, control, logs={"train_loss": 2.5, "train_runtime": 8.0})
    return out.getvalue()


def test_plain_lines_off_a_terminal():
    train_line, eval_line = drive(interactive=False).splitlines()
    assert train_line.startswith("sala-train: step 4/8 (50.0%) | loss 2.5000 | lr 1.00e-04 | ")
    tokens_per_s = float(re.search(r"\| ([\d,.]+) tok/s", train_line).group(1).replace(",", ""))
    assert 45 < tokens_per_s <= 50  # 400 tokens in a little over 8 s
    assert re.search(r"elapsed 0:00:0[89] \| eta 0:00:0[89]$", train_line)  # 4 of 8 steps done: ETA = elapsed
    assert eval_line.startswith("sala-train: step 4/8 (50.0%) | eval_loss 2.2500 | elapsed")
    assert "\r" not in train_line + eval_line


def test_bar_on_a_terminal():
    output = drive(interactive=True)
    assert "\r" in output and "4/8" in output  # a redrawn bar, not lines
    # After an evaluation the bar shows eval_loss beside the train loss, not instead of it.
    after_eval = [frame for frame in output.split("\r") if "eval_loss=" in frame]
    assert after_eval and all(re.search(r"[ ,]loss=2\.5000, tok/s=[\d,.]+, eval_loss=2\.2500", f) for f in after_eval)
    assert re.search(r"<00:0\d", output)  # tqdm's ETA
    # The summary closes the bar and stays as its own line after it.
    assert (
        output.rstrip("\n").splitlines()[-1].startswith("sala-train: step 8/8 (100.0%) | done: mean train loss 2.4000")
    )
    assert output.count("sala-train: step") == 1


def test_the_summary_says_done_only_when_all_steps_ran():
    assert "| done: mean train loss 2.5000 |" in summary_line(8)
    stopped = summary_line(4)  # a preemption or a stop request ended train() at step 4
    assert "| stopped: mean train loss 2.5000 |" in stopped and "done" not in stopped
    # Resumed at step 3: the Trainer's mean is of steps 4 to 8 only.
    assert "| done: mean train loss of steps 4-8 2.5000 |" in summary_line(8, started_at=3)


def test_tokens_per_second_leave_out_evaluation_and_saving(monkeypatch):
    """Evaluating and saving come between a step's end and the next step's begin: counted as
    training time they showed half the speed on the log after each evaluation."""
    from sala_train import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    callback = ProgressCallback(interactive=False, stream=out)
    args, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerControl()
    state = TrainerState(max_steps=8, num_input_tokens_seen=0)
    callback.on_train_begin(args, state, control)
    clock[0] += 10.0
    callback.on_evaluate(args, state, control)  # train.eval_on_start
    speeds = []
    for step in range(1, 5):
        callback.on_step_begin(args, state, control)
        clock[0] += 1.0  # one second per step, 100 tokens
        state.global_step, state.num_input_tokens_seen = step, 100 * step
        callback.on_step_end(args, state, control)
        if step % 2 == 0:
            callback.on_log(args, state, control, logs={"loss": 2.0})
            speeds.append(callback.tokens_per_second)
            clock[0] += 10.0
            callback.on_evaluate(args, state, control)
            clock[0] += 5.0
            callback.on_save(args, state, control)
    assert speeds == [100.0, 100.0]  # (with the 15 s of evaluation and saving: 200 tokens in 17 s)


def test_a_pause_on_a_gpu_starts_once_the_step_has_finished(monkeypatch):
    """CUDA runs a step's kernels after the Python code returns: the wait for them came in the
    evaluation's first read, and tokens/s left it out as pause (up to a step's time per logging
    interval, on one GPU). Before an evaluation or a save the step is waited for."""
    import torch

    from sala_train import progress

    clock, synced = [100.0], []

    def synchronize() -> None:
        synced.append(clock[0])
        clock[0] += 0.8  # the step's kernels still running

    callback = ProgressCallback(interactive=False, stream=io.StringIO())
    args, state = TrainingArguments(output_dir="unused", report_to=[]), TrainerState(max_steps=8)
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    callback.on_step_end(args, state, TrainerControl())
    assert synced == [] and callback._step_end == 100.0  # (no pause follows: nothing to wait for)
    for flag in ("should_evaluate", "should_save"):
        callback.on_step_end(args, state, TrainerControl(**{flag: True}))
        assert callback._step_end == clock[0] == synced[-1] + 0.8
    assert len(synced) == 2


def test_the_test_set_line_follows_a_bar_left_open():
    """A resume with nothing left to train raises out of train() before the summary that closes
    the bar: the test set's figure, logged after, went into the open bar's postfix and was lost."""
    out = io.StringIO()
    callback = ProgressCallback(interactive=True, stream=out)
    args, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerControl()
    state = TrainerState(max_steps=8, global_step=8)
    callback.on_train_begin(args, state, control)
    callback.on_log(args, state, control, logs={"test_loss": 1.25, "test_runtime": 0.5})
    assert out.getvalue().rstrip("\n").splitlines()[-1].startswith("sala-train: step 8/8 (100.0%) | test_loss 1.2500 |")


def test_a_duration_past_what_timedelta_holds_is_capped():
    """train.max_steps=10**15: the ETA overflowed timedelta (an OverflowError at the first log)."""
    from sala_train.progress import _duration

    assert _duration(1e30) == "999999999 days, 23:59:59"


def test_a_bar_is_drawn_only_on_a_terminal_with_a_width_and_a_height():
    """A terminal that reports 0 columns (``script`` run without one, some CI consoles) got a tqdm
    bar of width 0: nothing at all was shown until the run ended. Plain lines go there instead."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    from sala_train.console import draws_on_a_terminal

    leader, follower = pty.openpty()
    try:
        with open(follower, "w", closefd=False) as terminal:
            fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
            assert terminal.isatty() and not draws_on_a_terminal(terminal)
            # A width and no height (`stty cols 120` under `script`): tqdm drew nothing there either.
            fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 120, 0, 0))
            assert not draws_on_a_terminal(terminal)
            fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
            assert draws_on_a_terminal(terminal)
    finally:
        os.close(leader)
        os.close(follower)
    assert not draws_on_a_terminal(io.StringIO())
