"""When a run stops on a loss that is no longer a number."""

from __future__ import annotations

from transformers import TrainerControl

from sala_train.divergence import StopWhenDiverged


def test_training_stops_at_the_second_non_finite_loss_in_a_row():
    """One inf loss can be an fp16 overflow whose step the scaler skips: training goes on. Two in
    a row (NaN weights) stop it; eval logs do not count either way."""
    callback, control = StopWhenDiverged(), TrainerControl()
    for logs in (
        {"loss": 2.0},
        {"loss": float("inf")},
        {"eval_loss": float("nan")},
        {"loss": 1.9},
        {"loss": float("nan")},
    ):
        callback.on_log(None, None, control, logs=logs)
        assert not control.should_training_stop, logs
    callback.on_log(None, None, control, logs={"loss": float("nan")})
    assert control.should_training_stop
