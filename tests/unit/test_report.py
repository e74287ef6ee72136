"""What a sweep ranks jobs by (and an Optuna search minimises): the trained model's best eval loss."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sala_train.metrics import best_eval_loss, metrics_line
from sala_train.report import STATUS_FILE, RunStatus, read_status, summarise


def write_evals(run_dir: Path, evals: list[tuple[int, float]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [metrics_line({"event": "eval", "step": step, "eval_loss": loss}) for step, loss in evals]
    (run_dir / "metrics.jsonl").write_text("".join(lines))


def test_the_step_0_evaluation_is_not_a_jobs_best(tmp_path):
    """Every LoRA job starts from the same model: its step-0 loss (6.9) must not be the best of a
    job whose training made things worse (7.5, 7.2), or that job would tie with a job that reached 6.9."""
    worse, better = tmp_path / "worse", tmp_path / "better"
    write_evals(worse, [(0, 6.9), (2, 7.5), (4, 7.2), (6, float("nan"))])
    write_evals(better, [(0, 6.9), (2, 6.95), (4, 6.9)])
    assert best_eval_loss(worse) == 7.2 and best_eval_loss(better) == 6.9
    summary = summarise(worse)
    assert (summary.best_eval_loss, summary.best_step) == (7.2, 4)
    only_start = tmp_path / "only_start"
    write_evals(only_start, [(0, 6.9)])  # stopped before its first evaluation of trained weights
    assert best_eval_loss(only_start) is None and summarise(only_start).best_step is None
    assert summarise(only_start).final_eval_loss is None  # (it showed the untrained 6.9)
    assert summarise(worse).final_eval_loss != summarise(worse).final_eval_loss  # NaN: it diverged


def test_failed_runs_rank_after_the_others(tmp_path):
    """A diverged run's best came before it diverged, and Optuna counts it failed: it topped the
    table over the completed runs."""
    from sala_train.report import sort_by_best

    for name, evals, status in (("diverged", [(2, 6.0), (4, float("nan"))], "failed"),
                                ("good", [(2, 6.5)], "completed"), ("none", [], "completed"),
                                ("stopped", [(2, 6.2)], "preempted")):  # fmt: skip
        write_evals(tmp_path / name, evals)
        (tmp_path / name / "status.json").write_text(json.dumps({"status": status}))
    rows = sort_by_best([summarise(tmp_path / name) for name in ("diverged", "good", "none", "stopped")])
    assert [r.job for r in rows] == ["stopped", "good", "none", "diverged"]


def test_a_damaged_status_and_a_dry_run_override_are_reported_plainly(tmp_path):
    """A truncated status.json reads as "unknown" (it was a traceback), and a run made by pasting
    a dry run's command with ``+launcher.dry_run`` shows the overrides that run trained with."""
    run = tmp_path / "run"
    write_evals(run, [(0, 6.9), (2, 6.5)])
    (run / "status.json").write_text('{"status": "compl')
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- train.max_steps=2\n- +launcher.dry_run=true\n- hydra.run.dir=x\n")
    summary = summarise(run)
    assert (summary.status, summary.overrides) == ("unknown", "train.max_steps=2")
    # Hydra rewrites its record for a command it was refused (another config in this directory):
    # the overrides shown are those of the command that wrote config.yaml, in provenance.json.
    command = ["sala-train", "train.learning_rate=0.001", "hydra.sweep.dir=s"]
    (run / "provenance.json").write_text(json.dumps({"command": command}))
    (run / ".hydra" / "overrides.yaml").write_text("- train.learning_rate=0.003\n")
    assert summarise(run).overrides == "train.learning_rate=0.001"


def test_a_resumed_runs_runtime_and_speed_cover_every_session(tmp_path):
    """The Trainer's train_runtime restarts with each session: 30 s stopped at step 3 (its last
    log), then 50 s after a resume, is 80 s of training for 600 tokens, not the last session's 50 s."""
    records = [
        {"event": "eval", "step": 0, "time": 1000.0, "eval_loss": 7.0},
        {"event": "train", "step": 2, "time": 1020.0, "train_runtime": 20.0, "num_input_tokens_seen": 200},
        {"event": "train", "step": 3, "time": 1030.0, "train_runtime": 30.0, "num_input_tokens_seen": 300},
        # resumed from checkpoint-3 a minute later; its first log comes 40 s after it started
        {"event": "train", "step": 5, "time": 1130.0, "train_runtime": 40.0, "num_input_tokens_seen": 500},
        {"event": "summary", "step": 6, "time": 1140.0, "train_runtime": 50.0, "num_input_tokens_seen": 600},
    ]
    assert speed_of(tmp_path, records) == (80.0, 600, 7.5)


def speed_of(tmp_path: Path, records: list[dict]) -> tuple:
    """(runtime_s, tokens, tokens_per_s) of a run that logged ``records``."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(map(metrics_line, records)))
    summary = summarise(run)
    return summary.runtime_s, summary.tokens, summary.tokens_per_s


def test_sessions_are_told_apart_by_their_id_not_the_clock(tmp_path):
    """A resume on a node whose clock is 2 minutes behind: its records' times go backwards."""
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"event": "train", "step": 3, "time": 1030.0, "session": 1000.0, "train_runtime": 30.0},
        {"event": "train", "step": 5, "time": 1010.0, "session": 970.0, "train_runtime": 40.0},
        {"event": "summary", "step": 6, "time": 1020.0, "session": 970.0, "train_runtime": 50.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert summarise(run).runtime_s == 80.0


def test_metrics_are_strict_json_and_non_finite_losses_survive_a_trim(tmp_path):
    from sala_train.metrics import read_metrics, truncate_metrics_after

    def refuse(token: str) -> None:
        raise ValueError(token)

    records = [
        {"event": "train", "step": s, "loss": v} for s, v in enumerate([1.5, float("inf"), float("nan"), -1e999])
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(map(metrics_line, records)))
    truncate_metrics_after(tmp_path, 2)  # rewrites the file
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=refuse)["loss"] for line in lines] == [1.5, "Infinity", "NaN"]
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert losses[:2] == [1.5, float("inf")] and losses[2] != losses[2]


def test_a_damaged_metrics_file_or_a_run_without_its_config_is_one_message(tmp_path, capsys):
    import pytest

    from sala_train.errors import USER_ERRORS
    from sala_train.metrics import MetricsError
    from sala_train.report import main

    # The runner trims metrics.jsonl when it resumes: there too, one message and exit 2.
    assert issubclass(MetricsError, USER_ERRORS)

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("{}\n")  # Hydra's own: not a sweep job
    with pytest.raises(SystemExit) as exited:
        main([str(run)])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"sala-report: {run}: neither a run directory (config.yaml) nor a sweep of them\n"
    (run / "config.yaml").write_text("{}\n")
    damaged = {
        b"\xff\xfe\x00garbage\n": "metrics.jsonl: not UTF-8 text (byte 0); not a file sala-train wrote",
        b'{"step": 1}\n[1, 2]\n{"step": 2}\n': "metrics.jsonl:2: not a JSON object; not a line sala-train wrote",
        b'{"step": 1}\n\n{"event": "train", "step": "two"}\n': "metrics.jsonl:3: step is 'two', expected a number",
        # a whole last line (its newline written) that is not JSON: not a killed writer's, which is skipped
        b'{"step": 1}\ngarbage\n': "metrics.jsonl:2: not a JSON object; not a line sala-train wrote",
    }
    for content, message in damaged.items():
        (run / "metrics.jsonl").write_bytes(content)
        with pytest.raises(SystemExit) as exited:
            main([str(run)])
        assert exited.value.code == 2 and capsys.readouterr().err == f"sala-report: {run}/{message}\n"


def test_a_sweep_with_one_damaged_metrics_file_reports_every_other_job(tmp_path, capsys):
    """One job's metrics.jsonl damaged (a full disk, an edit by hand) stopped the whole sweep's
    report with exit 2: the other jobs' figures were lost with it."""
    from sala_train.report import main

    for job, evals, status in (("0", [(2, 6.5)], "completed"), ("1", [(2, 6.1)], "completed"),
                               ("2", [(2, 6.3)], "completed"), ("3", [], "failed")):  # fmt: skip
        write_evals(tmp_path / job, evals)
        (tmp_path / job / "config.yaml").write_text("{}\n")
        (tmp_path / job / "status.json").write_text(json.dumps({"status": status}))
    (tmp_path / "1" / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n')
    main([str(tmp_path)])  # no exit 2
    out, err = capsys.readouterr()
    assert err == (f"sala-report: warning: {tmp_path}/1/metrics.jsonl:2: not a JSON object; not a line "
                   "sala-train wrote; its job is shown as unreadable metrics\n")  # fmt: skip
    jobs = [line.split("|")[1].strip() for line in (tmp_path / "report.md").read_text().splitlines()[2:]]
    assert jobs == ["2", "0", "3", "1"]  # the readable ones as before (failed last), the unreadable one after
    assert "| 1 |  | completed, unreadable metrics | - |" in (tmp_path / "report.md").read_text()
    assert "6.3000" in out and "6.5000" in out and (tmp_path / "sweep.png").is_file()


def test_a_sweep_whose_subdir_has_several_parts_is_reported(tmp_path, capsys):
    """hydra.sweep.subdir=lr/${train.learning_rate}/s${train.seed} puts each job two levels down:
    sala-report, which the sweep's summary names, said there was no sweep there (exit 2). A run's
    own folders (its checkpoints) are not taken for jobs."""
    from sala_train.report import main

    for job, loss in (("lr/0.001/s1", 6.5), ("lr/0.001/s2", 6.1), ("lr/0.002/s1", 6.3)):
        write_evals(tmp_path / job, [(2, loss)])
        (tmp_path / job / "config.yaml").write_text("{}\n")
        (tmp_path / job / "status.json").write_text(json.dumps({"status": "completed"}))
        (tmp_path / job / "checkpoint-2").mkdir()
        (tmp_path / job / "checkpoint-2" / "config.yaml").write_text("{}\n")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}\n")
    (tmp_path / ".sweep_started").touch()  # (below a directory that is no sweep's, one level only)
    main([str(tmp_path)])
    out = capsys.readouterr().out
    jobs = [line.split("|")[1].strip() for line in (tmp_path / "report.md").read_text().splitlines()[2:]]
    assert jobs == ["lr/0.001/s2", "lr/0.002/s1", "lr/0.001/s1"] and "3 jobs; written: " in out
    from sala_train.report import report

    with pytest.raises(FileNotFoundError, match="neither a run directory"):  # (outputs/ holds runs two levels down)
        report(tmp_path / "lr")


def test_a_sweeps_job_statuses_leave_refused_jobs_to_their_marks(tmp_path):
    """A submitit sweep's summary reads the jobs' statuses and the refusal marks: a refused job's
    own record (written so the report lists it) counted it twice, under its directory's name and
    its number; nested job directories were keyed by their last part only, merging jobs."""
    from sala_train.report import write_refused
    from sala_train.sweep import job_statuses

    for job, status in (("lr0.001/s1", "completed"), ("lr0.002/s1", "failed")):
        (tmp_path / job).mkdir(parents=True)
        (tmp_path / job / "config.yaml").write_text("{}\n")
        (tmp_path / job / "status.json").write_text(json.dumps({"status": status}))
    (tmp_path / "lr0.003" / "s1").mkdir(parents=True)
    write_refused(tmp_path / "lr0.003" / "s1", "bad input")
    (tmp_path / "multirun.yaml").write_text("{}\n")
    assert job_statuses(tmp_path, records=None) == {"lr0.001/s1": "completed", "lr0.002/s1": "failed"}


def test_a_dry_run_directory_is_not_started_not_incomplete(tmp_path):
    from sala_train.report import read_status

    (tmp_path / "config.yaml").write_text("{}\n")
    assert read_status(tmp_path) == "not started"
    (tmp_path / "checkpoint-2").mkdir()
    assert read_status(tmp_path) == "incomplete"  # it trained, then was killed


def test_reporting_a_dry_run_directory_writes_nothing_into_it(tmp_path):
    """It holds only the config the dry run wrote: no curves to draw (an empty loss.png was left)."""
    from sala_train.report import report

    (tmp_path / "config.yaml").write_text("{}\n")
    assert "not started" in report(tmp_path) and "loss curves" not in report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    # Nor one stopped before its first log (only the start event).
    (tmp_path / "metrics.jsonl").write_text(metrics_line({"event": "start", "step": 0, "time": 1.0}) + "\n")
    assert "loss curves" not in report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_a_run_resumed_from_another_runs_checkpoint_counts_only_its_own_tokens(tmp_path):
    """train.resume=PATH of another run at 2,000 tokens: this run trained 1,000 more in 10 s; the
    tokens seen (3,000) over this run's runtime read 2.5x too fast."""
    records = [
        {"event": "start", "step": 20, "session": 1.0, "num_input_tokens_seen": 2000},
        {"event": "train", "step": 30, "session": 1.0, "train_runtime": 5.0, "num_input_tokens_seen": 2500},
        {"event": "summary", "step": 40, "session": 1.0, "train_runtime": 10.0, "num_input_tokens_seen": 3000},
    ]
    assert speed_of(tmp_path, records) == (10.0, 1000, 100.0)


def test_a_preempted_session_counts_the_tokens_up_to_its_checkpoint(tmp_path):
    """Preempted at step 8 (its checkpoint at 5,681 tokens) with its last log at step 1 (778): the
    resumed session starts from 5,681, so the steps in between were trained by the first and are
    counted (the report undercounted them); tokens/s stays that of the timed spans."""
    records = [
        {"event": "start", "step": 0, "session": 1.0, "num_input_tokens_seen": 0},
        {"event": "train", "step": 1, "session": 1.0, "train_runtime": 1.0, "num_input_tokens_seen": 778},
        {"event": "start", "step": 8, "session": 2.0, "num_input_tokens_seen": 5681},
        {"event": "summary", "step": 40, "session": 2.0, "train_runtime": 9.0, "num_input_tokens_seen": 28901},
    ]
    assert speed_of(tmp_path, records) == (10.0, 28901, (778 + 28901 - 5681) / 10.0)


def test_a_killed_sessions_speed_counts_the_tokens_of_its_timed_span_only(tmp_path):
    """Killed after an evaluation past its last train log (step 10 of logging every 4): the tokens
    to step 10 were counted against the time to step 8, so tokens/s read 7% high."""
    records = [
        {"event": "start", "step": 0, "session": 1.0, "num_input_tokens_seen": 0},
        {"event": "train", "step": 8, "session": 1.0, "train_runtime": 2.0, "num_input_tokens_seen": 5681},
        {"event": "eval", "step": 10, "session": 1.0, "eval_loss": 6.0, "num_input_tokens_seen": 7156},
        {"event": "start", "step": 10, "session": 2.0, "num_input_tokens_seen": 7156},
        {"event": "summary", "step": 20, "session": 2.0, "train_runtime": 3.0, "num_input_tokens_seen": 14000},
    ]
    assert speed_of(tmp_path, records) == (5.0, 14000, (5681 + 14000 - 7156) / 5.0)


def test_a_run_directory_is_held_by_one_command_at_a_time(tmp_path):
    """Two commands started in the same second get the same clock-named directory: the second
    trained the first's config there. A live holder on this machine refuses the next; a claim
    left by a process that ended, or by another machine, is taken over; it goes when released."""
    import socket
    import subprocess
    import sys

    from sala_train.run_dir import CLAIM_FILE, DirectoryTaken, claimed

    claim = tmp_path / CLAIM_FILE
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(DirectoryTaken) as taken, claimed(tmp_path):
            pass
        assert taken.value.pid == holder.pid and claim.is_file()
    finally:
        holder.kill()
        holder.wait()
    for stale in ({"host": socket.gethostname(), "pid": holder.pid}, {"host": "another-node", "pid": 1}):
        claim.write_text(json.dumps(stale))
        with claimed(tmp_path):
            assert json.loads(claim.read_text())["pid"] == os.getpid()
        assert not claim.exists()
    claim.write_text("")  # created this instant by another command, not yet written: held
    with pytest.raises(DirectoryTaken), claimed(tmp_path):
        pass


def test_a_running_status_whose_pid_another_process_holds_now_is_incomplete(tmp_path):
    """After a reboot or a container's restart, a hard-killed run's pid is soon another process's:
    the run read as running for good (sala-report), and its rerun was refused, naming that process
    to kill. The record keeps the boot and start of its process, which tell them apart."""
    import subprocess
    import sys

    from sala_train.liveness import this_process
    from sala_train.report import running_here, write_running

    write_running(tmp_path)
    record = json.loads((tmp_path / STATUS_FILE).read_text())
    assert record == {"status": "running", **this_process()} and {"boot", "started"} <= set(record)
    assert read_status(tmp_path) == RunStatus.RUNNING and running_here(tmp_path) == os.getpid()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # the same record, its pid now another (live) process's
        (tmp_path / STATUS_FILE).write_text(json.dumps({**record, "pid": other.pid}))
        assert read_status(tmp_path) == RunStatus.INCOMPLETE and running_here(tmp_path) is None
        (tmp_path / STATUS_FILE).write_text(json.dumps({**record, "boot": "another boot"}))
        assert read_status(tmp_path) == RunStatus.INCOMPLETE
        older = {k: v for k, v in record.items() if k not in ("boot", "started")} | {"pid": other.pid}
        (tmp_path / STATUS_FILE).write_text(json.dumps(older))  # (written before: the pid alone tells)
        assert read_status(tmp_path) == RunStatus.RUNNING
    finally:
        other.kill()
        other.wait()


def test_a_file_sala_report_cannot_read_or_write_is_one_line(tmp_path, capsys):
    """A metrics.jsonl (or report.md) that is a directory was an IsADirectoryError traceback."""
    from sala_train.report import main

    (tmp_path / "config.yaml").write_text("{}\n")
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"sala-report: {tmp_path / 'metrics.jsonl'}: Is a directory\n"


def test_the_sweep_legend_names_what_the_jobs_vary():
    """Cut to fit the legend, the overrides every job shares came first and hid the swept value."""
    from sala_train.report import RunSummary, legend_labels

    common = "train.max_steps=10 train.logging_steps=5 train.eval_steps=5 train.save_steps=10 method=full"
    rows = [RunSummary(str(i), f"{common} train.learning_rate={lr}", "completed", None, None, None, None, 0, None,
                       None, None) for i, lr in enumerate(("1e-3", "3e-3"))]  # fmt: skip
    assert legend_labels(rows) == {"0": "train.learning_rate=1e-3", "1": "train.learning_rate=3e-3"}
    assert legend_labels(rows[:1]) == {"0": f"{common} train.learning_rate=1e-3"}  # one job: all of them


def test_records_are_put_back_only_for_a_directory_seen_before_and_untouched_by_training(tmp_path, monkeypatch):
    """A refusal found before training puts an existing directory's records back. Not after training
    left a trace (a full disk once checkpoints were saved exits 2 too: they must stay), nor for a
    directory this command did not look at before (a new sweep job: its failed status must stay)."""
    from sala_train import run_dir as rd

    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text('{"status": "preempted", "exit_code": 75}')
    assert rd.records_before(run) is None  # not looked at by the callback: nothing to put back
    monkeypatch.setitem(rd._snapshots, run, rd._Snapshot(frozenset({"status.json"}), frozenset(), "x.log", None, None))
    records = rd.records_before(run)
    (run / "status.json").write_text('{"status": "failed", "exit_code": 2}')
    (run / "config.yaml").write_text("new: 1\n")
    rd.put_back(run, records)  # refused before training
    assert sorted(p.name for p in run.iterdir()) == ["status.json"] and "preempted" in (run / "status.json").read_text()
    records = rd.records_before(run)
    (run / "status.json").write_text('{"status": "failed", "exit_code": 2}')
    (run / "checkpoint-2").mkdir()  # trained, then stopped on a full disk
    (run / "metrics.jsonl").write_text('{"step": 1, "event": "train", "loss": 1.0}\n')
    rd.put_back(run, records)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "metrics.jsonl", "status.json"]
    assert "failed" in (run / "status.json").read_text()


def test_a_sweeps_summary_counts_only_its_own_jobs_refusals(tmp_path, monkeypatch, capsys):
    """Two commands started in the same second share a clock-named sweep directory: the first
    one's summary counted the second one's refused job 0 (its mark in the directory) as its own,
    and it exited 1 although its only job completed."""
    from omegaconf import OmegaConf

    from sala_train import sweep
    from sala_train.report import RunStatus, write_status

    job = tmp_path / "0"
    job.mkdir()
    write_status(job, RunStatus.COMPLETED, 0)
    (tmp_path / sweep.SWEEP_STARTED).touch()
    (tmp_path / f"{sweep.REFUSED_MARK}0").touch()  # the other command's
    monkeypatch.setattr(sweep, "ran_jobs", {"0": job})
    monkeypatch.setattr(sweep, "refused_jobs", [])
    monkeypatch.setattr(sweep, "failed_jobs", [])
    sweep.summarize(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "output_subdir": ".hydra"}}))
    assert f"sala-train: sweep {tmp_path}: 1 completed. Table" in capsys.readouterr().out
    assert sweep.failed_jobs == [] and (tmp_path / f"{sweep.REFUSED_MARK}0").exists()  # (not this one's to remove)


def test_a_symbolic_link_that_loops_is_one_message_to_report_and_export(tmp_path, capsys):
    """`Path.resolve` raises RuntimeError on a link loop: sala-report and sala-export were a
    traceback, exit 1."""
    from sala_train.export import main as export_main
    from sala_train.report import main as report_main

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(SystemExit) as exited:
        report_main([str(loop)])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"sala-report: PATH {loop}: a symbolic link in it loops back to itself\n"
    with pytest.raises(SystemExit) as exited:
        export_main([str(loop)])
    assert exited.value.code == 2
    assert f"RUN_DIR {loop}: a symbolic link in it loops back to itself" in capsys.readouterr().err


def test_an_atomic_write_that_fails_leaves_no_temporary_file(tmp_path):
    """A status.json that is a directory: the rename failed and `.status.json.<pid>.tmp` stayed."""
    from sala_train.atomic import write_text_atomic

    (tmp_path / "status.json").mkdir()
    with pytest.raises(IsADirectoryError):
        write_text_atomic(tmp_path / "status.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


REPORT_IN_A_FRESH_INTERPRETER = """
import sys
from pathlib import Path
from sala_train.report import report
for path in sys.argv[1:]:
    report(Path(path))
print(sorted(name for name in ("torch", "transformers", "datasets", "peft") if name in sys.modules))
"""


def test_sala_report_draws_its_plots_without_importing_the_training_stack(tmp_path):
    """sala-report reads metrics files: importing transformers (through the Trainer callback that
    sat beside the plotting code) made it take 5 s more, on every call."""
    import subprocess
    import sys

    for job in ("0", "1"):
        write_evals(tmp_path / "sweep" / job, [(0, 6.9), (2, 6.5 + int(job))])
        (tmp_path / "sweep" / job / "config.yaml").write_text("{}\n")
    run = tmp_path / "sweep" / "0"
    proc = subprocess.run([sys.executable, "-c", REPORT_IN_A_FRESH_INTERPRETER, str(run), str(tmp_path / "sweep")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert (run / "loss.png").stat().st_size > 0 and (tmp_path / "sweep" / "sweep.png").stat().st_size > 0


def test_a_train_curve_of_one_logged_step_is_drawn(tmp_path):
    """A line of one point draws nothing: a run shorter than two logging intervals had a legend
    entry for its train loss and no curve."""
    from matplotlib.image import imread

    from sala_train.plots import plot_losses

    (tmp_path / "metrics.jsonl").write_text(metrics_line({"event": "train", "step": 1, "loss": 6.9}))
    pixels = imread(plot_losses(tmp_path))[..., :3]
    train_blue = abs(pixels - [0x1F / 255, 0x77 / 255, 0xB4 / 255]).max(axis=-1) < 0.05  # (matplotlib's C0)
    rows = train_blue.nonzero()[0]
    assert rows.max() - rows.min() > 20  # (the legend's sample line alone is 2 pixel rows high)
