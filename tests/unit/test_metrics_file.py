"""metrics.jsonl after a killed writer: the next session's lines keep the file readable."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from sala_train.metrics import METRICS_FILE, read_metrics
from sala_train.tracking import MetricsFileCallback

WHOLE = '{"step": 1, "time": 1.0, "session": 1.0, "event": "train", "loss": 2.5}\n'


@pytest.mark.parametrize(
    ("tail", "kept_steps"),
    [
        ('{"step": 2, "time": 2.0, "session": 1.0, "event": "train", "lo', [1, 3, 3]),  # cut mid-line: dropped
        ('{"step": 2, "time": 2.0, "session": 1.0, "event": "train", "loss": 2.4}', [1, 2, 3, 3]),  # all but "\n"
        ("", [1, 3, 3]),
    ],
)
def test_a_new_session_appends_after_a_cut_off_last_line(tmp_path, tail, kept_steps):
    """A cut-off last line is skipped by readers; a resumed session appended after it, so it was no
    longer last and the run's whole record was refused ("not a JSON object"), by the run's own end
    and by every rerun and report."""
    (tmp_path / METRICS_FILE).write_text(WHOLE + tail, encoding="utf-8")
    callback = MetricsFileCallback(tmp_path)
    state = SimpleNamespace(is_world_process_zero=True, global_step=3, num_input_tokens_seen=10)
    callback.on_train_begin(None, state, None)
    callback.on_log(None, state, None, logs={"loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == kept_steps
    assert [r["event"] for r in read_metrics(tmp_path)][-2:] == ["start", "train"]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"step": 25, "time": 2.0, "session": 1.0, "event": "eval"}', "a record of event 'eval' without eval_loss"),
        ('{"time": 2.0, "session": 1.0, "event": "train", "loss": 2.4}', "a record of event 'train' without step"),
        (
            '{"step": 2, "time": 2.0, "session": [1], "event": "train", "loss": 2.4}',
            "session is [1], expected a string or a number",
        ),
    ],
)
def test_records_the_readers_would_crash_on_are_refused_by_line(tmp_path, line, why):
    """A hand-edited record (an eval without its loss, a session that is a list) crashed sala-report
    with a KeyError or TypeError traceback instead of showing the job as unreadable."""
    from sala_train.metrics import MetricsError

    (tmp_path / METRICS_FILE).write_text(WHOLE + line + "\n" + WHOLE, encoding="utf-8")
    with pytest.raises(MetricsError, match=rf"{METRICS_FILE}:2: {re.escape(why)}"):
        read_metrics(tmp_path)
