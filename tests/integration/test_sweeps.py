"""Sweeps beyond the basic multirun: Optuna presets, and Hydra's submitit launcher on real SLURM."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ON_LOCAL_SLURM, run_cli
from tests.integration.test_cli import assert_ok
from tests.integration.test_distributed import slurm  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

TWO_STEPS = ("train.max_steps=2", "train.eval_steps=2", "train.save_steps=2")


def report_rows(sweep: Path, cwd: Path) -> list[dict[str, str]]:
    proc = run_cli("sala-report", str(sweep), cwd=cwd)
    assert_ok(proc)
    assert (sweep / "sweep.png").stat().st_size > 1000
    return list(csv.DictReader((sweep / "report.csv").read_text().splitlines()))


def test_a_sweep_job_refused_before_it_starts_is_in_the_sweeps_report(tmp_path):
    """A job refused by its own checks (here fp16 on a machine without CUDA, which the command
    line's check leaves to the machine that runs the job) wrote nothing in its new directory: the
    summary counted it, but sala-report, which the summary points to, listed none of it."""
    proc = run_cli("sala-train", "-m", "train.fp16=true", "train.bf16=false", "train.learning_rate=1e-3,2e-3",
                   "hydra.sweep.dir=sweep", *TWO_STEPS, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "sala-train: sweep sweep: 2 refused; refused: job 0, 1." in proc.stdout
    report = run_cli("sala-report", "sweep", cwd=tmp_path)
    assert_ok(report)
    rows = list(csv.DictReader((tmp_path / "sweep" / "report.csv").read_text().splitlines()))
    assert [(r["job"], r["status"], r["steps"]) for r in rows] == [("0", "refused", "0"), ("1", "refused", "0")]
    sweep = tmp_path / "sweep"
    written = f"2 jobs; written: {sweep / 'report.md'}, {sweep / 'report.csv'}, {sweep / 'sweep.png'}"
    assert "train.learning_rate=0.002" in rows[1]["overrides"] and report.stdout.strip().endswith(written)
    one = run_cli("sala-report", "sweep/1", cwd=tmp_path)
    assert_ok(one)
    assert one.stdout.splitlines()[-1] == (
        "sala-train: train.fp16=true needs a CUDA GPU: on CPU accelerate silently trains in float32 instead. Use "
        "train.bf16=true (CPU autocast) or neither."
    )
    # The same sweep, fixed: the jobs train in the directories their refusals were recorded in.
    again = run_cli("sala-train", "-m", "train.fp16=false", "train.bf16=false", "train.learning_rate=1e-3,2e-3",
                    "hydra.sweep.dir=sweep", "train.max_steps=1", "train.eval_steps=1", cwd=tmp_path)  # fmt: skip
    assert_ok(again)
    assert "sala-train: sweep sweep: 2 completed." in again.stdout


def test_optuna_lora_search_returns_the_best_jobs_value(tmp_path):
    proc = run_cli(
        "sala-train",
        "hparams_search=lora_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweep.dir=sweep",
        "method.r=choice(8,16)",  # the README's way to change one range of the preset's space
        *TWO_STEPS,
        cwd=tmp_path,
    )  # fmt: skip  (no -m: the preset switches to multirun)
    assert_ok(proc)
    assert "Traceback" not in proc.stderr and "sala-train: sweep " in proc.stdout
    assert "alembic" not in proc.stdout  # Optuna's storage library logged 7 lines on import
    sweep = tmp_path / "sweep"
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"train.learning_rate", "method.r", "method.alpha", "method.dropout"}
    rows = report_rows(sweep, tmp_path)
    assert sorted(r["job"] for r in rows) == ["0", "1"] and {r["status"] for r in rows} == {"completed"}
    # The value Optuna optimised is each job's best validation loss, as the report reads it.
    assert result["best_value"] == min(float(r["best_eval_loss"]) for r in rows)
    for job in ("0", "1"):
        method = yaml.safe_load((sweep / job / "config.yaml").read_text())["method"]
        assert method["name"] == "lora" and method["r"] in (8, 16) and 0 <= method["dropout"] <= 0.2
    # A trial's recorded command trains that trial, not a new search (it kept hparams_search=).
    command = json.loads((sweep / "0" / "provenance.json").read_text())["command"]
    assert not any(a.startswith("hparams_search=") for a in command) and "method=lora" in command
    assert_ok(run_cli(*command, "hydra.run.dir=again", "launcher.dry_run=true", cwd=tmp_path))
    trial, again = (yaml.safe_load((tmp_path / d / "config.yaml").read_text()) for d in ("sweep/0", "again"))
    again["launcher"].pop("dry_run"), trial["launcher"].pop("dry_run")
    assert again == trial


def test_an_optuna_search_where_no_trial_completes_ends_in_one_line(tmp_path):
    """Every trial fails (cutoff_len=8 drops every sample): each failure is reported, then the
    summary and one line saying there is no best, exit 1 (Hydra's sweeper raised a traceback)."""
    proc = run_cli("sala-train", "hparams_search=lora_optuna", "hydra.sweeper.n_trials=2", "hydra.sweep.dir=sweep",
                   "dataset.cutoff_len=8", *TWO_STEPS, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("every sample was dropped") == 2
    assert "sala-train: sweep sweep: 2 failed; failed: job 0, 1." in proc.stdout
    assert proc.stderr.rstrip().endswith(
        "sala-train: no trial of the Optuna search completed, so there are no best parameters "
        "(sweep/optimization_results.yaml not written)"
    )
    assert "max_failure_rate" not in proc.stdout  # no error line for each failed trial
    assert not (tmp_path / "sweep" / "optimization_results.yaml").exists()


def test_full_preset_searches_its_own_space(tmp_path):
    proc = run_cli("sala-train", "hparams_search=full_optuna", "--cfg", "hydra", cwd=tmp_path)
    assert_ok(proc)
    sweeper = yaml.safe_load(proc.stdout)["hydra"]["sweeper"]
    assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper["direction"] == "minimize"
    assert set(sweeper["params"]) == {"train.learning_rate", "train.warmup_ratio", "train.weight_decay"}


@ON_LOCAL_SLURM
def test_submitit_sweep_runs_jobs_as_slurm_jobs(tmp_path, slurm):  # noqa: F811
    # Jobs SLURM refuses (here a partition it lacks): submitit's traceback, exit 1, and the sweep
    # directory begun; now sbatch's words, exit 2, asked with a test job before anything is written.
    refused = run_cli("sala-train", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=nope",
                      "method=full,lora", "hydra.sweep.dir=sweep", *TWO_STEPS, cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "sala-train: hydra/launcher=submitit_slurm: sbatch refuses its jobs: " in refused.stderr
    assert "invalid partition" in refused.stderr and not (tmp_path / "sweep").exists()
    proc = run_cli("sala-train", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=10",
                   "method=full,lora", "hydra.sweep.dir=sweep", *TWO_STEPS, cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    sweep = tmp_path / "sweep"
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # one SLURM job (array task) per sweep job, each with its own log
    for job in ("0", "1"):
        assert any(f"sala-train: saved {sweep / job / 'final'}" in log.read_text() for log in logs)
    rows = report_rows(sweep, tmp_path)
    assert sorted((r["job"], r["status"]) for r in rows) == [("0", "completed"), ("1", "completed")]
    assert all(r["best_eval_loss"] != "" for r in rows)
    # Again with job 1 changed: refused inside its SLURM job, which the launching process hears of
    # (it counted the job completed, exit 0), and the report keeps the overrides it trained with.
    again = run_cli("sala-train", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=10",
                    "method=full,full", "hydra.sweep.dir=sweep", *TWO_STEPS, cwd=tmp_path)  # fmt: skip
    assert again.returncode == 1, again.stderr[-2000:]
    assert "sala-train: sweep sweep: 1 completed, 1 refused; refused: job 1." in again.stdout
    assert {r["job"]: r["overrides"].split()[0] for r in report_rows(sweep, tmp_path)} == {
        "0": "method=full",
        "1": "method=lora",
    }
    assert not list(sweep.glob(".refused-*"))


@ON_LOCAL_SLURM
def test_a_submitit_sweep_job_warned_of_its_time_limit_checkpoints_requeues_and_resumes(tmp_path, slurm):  # noqa: F811
    """submitit's warning (SIGUSR2, sent to every process of the job) killed the runner without a
    checkpoint, and submitit requeued the job at once: the training was lost. Now the runner saves a
    checkpoint, then submitit requeues the job, which resumes from it."""
    import re
    import subprocess
    import sys
    import time

    from tests.integration.test_cli import metrics, train_losses
    from tests.integration.test_distributed import job_state

    command = [str(Path(sys.executable).parent / "sala-train"), "-m", "hydra/launcher=submitit_slurm",
               "hydra.launcher.timeout_min=10", "method=lora", "hydra.sweep.dir=sweep", "train.max_steps=30",
               "train.save_steps=1000", "train.eval_steps=1000", "train.logging_steps=1"]  # fmt: skip
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "sweep" / "0"
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists() or not any(r.get("step", 0) >= 3 for r in metrics(run)):
        assert time.monotonic() < deadline and sweep.poll() is None, "the job did not start training"
        time.sleep(0.3)
    (job_id,) = [p.name for p in (tmp_path / "sweep" / ".submitit").iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what submitit's --signal=USR2@120 sends
    released = False
    while sweep.poll() is None:
        assert time.monotonic() < deadline + 240, "the sweep did not finish"
        if not released and job_state(job_id) == "PENDING":
            time.sleep(2)  # (SLURM holds a requeued job for cred_expire; see the launcher=slurm requeue test)
            update = ["scontrol", "update", f"JobId={job_id}", "StartTime=now"]
            released = subprocess.run(update, capture_output=True).returncode == 0
        time.sleep(0.5)
    stdout, stderr = sweep.communicate()
    assert sweep.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert "sala-train: sweep sweep: 1 completed." in stdout
    log = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    (saved,) = re.findall(r"preempted; checkpoint-(\d+) saved", log)
    assert f"resuming from {run}/checkpoint-{saved}" in log
    assert sorted(train_losses(run)) == list(range(1, 31))  # every step once, none lost or repeated
    assert (run / "final" / "adapter_model.safetensors").is_file()
