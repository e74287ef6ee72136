"""Which checkpoint is best, and when early stopping stops: from the log history alone."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from sala_train.best_checkpoint import BestCheckpoint, on_the_save_grid

STEPS = SimpleNamespace(save_strategy="steps")
EPOCHS = SimpleNamespace(save_strategy="epoch")


def state(history: list[tuple[int, float]], step: int, max_steps: int = 100, save_steps: int = 10) -> SimpleNamespace:
    log = [{"step": s, "eval_loss": v, "epoch": s / 10} for s, v in history]
    return SimpleNamespace(log_history=log, global_step=step, max_steps=max_steps, save_steps=save_steps,
                           best_global_step=None, best_metric=None, best_model_checkpoint=None,
                           is_world_process_zero=True)  # fmt: skip


def test_the_save_grid_by_steps_and_by_whole_epochs():
    run = state([], 0, max_steps=95)
    assert [on_the_save_grid(STEPS, run, s, None) for s in (10, 15, 20, 95)] == [True, False, True, True]
    # By epoch: an epoch's end only; the end the Trainer gives an epoch a stop request cut short
    # (2.5 epochs) is not one, whatever its step; the last step always is.
    assert [on_the_save_grid(EPOCHS, run, s, e) for s, e in ((12, 1.0), (30, 2.5), (36, 3.0), (95, 7.9))] == [
        True, False, True, True,
    ]  # fmt: skip


def test_patience_counts_checkpoint_evaluations_since_the_best_from_the_history_alone(tmp_path):
    """Evaluations off the grid do not count; equal scores do not better the best (the Trainer's
    strict rule); whether the best checkpoint is still kept does not change the count (it did: a
    run stopped early whose best was set aside trained on when rerun)."""
    history = [(10, 5.0), (15, 1.0), (20, 4.0), (30, 4.0), (40, 4.5)]  # (15: off the grid)
    best = BestCheckpoint(tmp_path, from_another_run=False, tracked=True, patience=3)
    run = state(history, 40)
    assert best._not_bettered(STEPS, run) == (2, 20, 4.0)  # (30 ties 20: not better)
    best.on_train_begin(STEPS, run, SimpleNamespace())  # (no checkpoint is kept in tmp_path)
    assert not best.stopped_already and run.best_global_step is None  # (the best among those kept: none)
    run = state([*history, (50, 4.1)], 50)
    best.on_train_begin(STEPS, run, SimpleNamespace())
    assert best.stopped_already  # 30, 40, 50 since 20
    # At the last step nothing is left to train anyway: that says so, not "stopped early".
    best.on_train_begin(STEPS, state([*history, (50, 4.1)], 50, max_steps=50), SimpleNamespace())
    assert not best.stopped_already
    # A figure larger is better (rewards/margins): 20 is the best, then 30 ties it, 40 falls.
    margins = BestCheckpoint(tmp_path, False, True, patience=2, metric="rewards/margins")
    run = state([], 40)
    run.log_history = [{"step": s, "eval_rewards/margins": v} for s, v in ((10, 1.0), (20, 3.0), (30, 3.0), (40, 2.0))]
    assert margins._not_bettered(STEPS, run) == (2, 20, 3.0)


def test_a_run_started_from_another_runs_checkpoint_counts_its_own_evaluations(tmp_path):
    history = [(10, 1.0), (20, 2.0), (30, 3.0), (40, 3.5)]
    mine = BestCheckpoint(tmp_path, from_another_run=False, tracked=True, patience=2, history_after=20)
    assert mine._not_bettered(STEPS, state(history, 40)) == (1, 30, 3.0)
    theirs = BestCheckpoint(tmp_path, from_another_run=False, tracked=True, patience=2)
    assert theirs._not_bettered(STEPS, state(history, 40)) == (3, 10, 1.0)


def test_a_stop_request_part_way_through_an_epoch_adds_no_evaluation_or_second_save(tmp_path):
    """The Trainer ends an epoch a stop cut short as an epoch: by epoch it evaluated there (an
    evaluation no uninterrupted run has) and saved the checkpoint just saved again."""
    from sala_train.preemption import PreemptionCallback

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)}
    try:
        stop = PreemptionCallback(tmp_path)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    for preempted, epoch, kept in ((True, 2.5, False), (True, 3.0, True), (False, 2.5, True)):
        stop.preempted = preempted
        control = SimpleNamespace(should_evaluate=True, should_save=True)
        stop.on_epoch_end(EPOCHS, SimpleNamespace(epoch=epoch), control)
        assert (control.should_evaluate, control.should_save) == (kept, kept), (preempted, epoch)


@pytest.mark.parametrize("metric", ["loss", "eval_loss"])
def test_the_metric_is_read_with_or_without_its_eval_prefix(tmp_path, metric):
    assert BestCheckpoint(tmp_path, False, True, metric=metric).metric == "eval_loss"
