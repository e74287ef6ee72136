"""Crash-proof resume: kill -9 at arbitrary moments (mid-step, mid-checkpoint), SIGTERM, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sala_train.report import read_status
from tests.conftest import run_cli
from tests.integration.test_cli import assert_ok, metrics, train_losses

pytestmark = pytest.mark.slow

RUN = ("sala-train", "method=full", "train.max_steps=14", "train.save_steps=2", "train.eval_steps=4",
       "train.logging_steps=1", "train.save_total_limit=2", "hydra.run.dir=run")  # fmt: skip


def start(cwd: Path, argv: tuple[str, ...] = RUN, stderr: int = subprocess.DEVNULL) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = Path(sys.executable).parent / argv[0]
    return subprocess.Popen([str(script), *argv[1:]], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)  # fmt: skip


def wait_until(proc: subprocess.Popen[str], ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the moment came"
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.005)


def runner_pids(proc: subprocess.Popen[str]) -> list[str]:
    """The launcher's runner child: only it (the interpreter also runs short-lived helpers, such as
    ctypes' ldconfig probe, whose pid a bare ``pgrep -P`` returned to be signalled after it ended)."""
    pattern = "sala_train[.]runner"
    return subprocess.run(["pgrep", "-P", str(proc.pid), "-f", pattern], capture_output=True, text=True).stdout.split()


def kill_when(proc: subprocess.Popen[str], ready) -> None:
    wait_until(proc, ready)
    # The runner (its own process group) and the launcher, with no chance to clean up: a crash.
    runners = runner_pids(proc)
    for pid in runners:
        os.killpg(int(pid), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def last_step(run: Path) -> int:
    try:
        return max((r["step"] for r in metrics(run) if r["event"] == "train"), default=0)
    except (ValueError, FileNotFoundError):  # not started yet, or a line being written right now
        return 0


def test_kill_9_mid_checkpoint_and_mid_step_then_resume_is_bit_exact(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    assert_ok(run_cli(*RUN, cwd=straight))
    expected = train_losses(straight / "run")

    cut = tmp_path / "cut"
    cut.mkdir()
    run = cut / "run"
    kill_when(start(cut), lambda: (run / "checkpoint-4").exists())  # while checkpoint-4 is being written
    # The runner said it was running; its process is gone, so the run reads as incomplete.
    assert json.loads((run / "status.json").read_text())["status"] == "running"
    deadline = time.monotonic() + 30  # SIGKILL is delivered, and the process reaped, a moment later
    while read_status(run) != "incomplete" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_status(run) == "incomplete"
    kill_when(start(cut), lambda: last_step(run) >= 9)  # in the middle of training between checkpoints
    proc = run_cli(*RUN, cwd=cut)
    assert_ok(proc)
    assert "resuming from" in proc.stdout
    assert train_losses(run) == expected  # every step, bit for bit, none lost or repeated
    names = sorted(p.name for p in run.glob("checkpoint-*"))
    assert names == ["checkpoint-12", "checkpoint-14"]  # save_total_limit=2, nothing partial left
    assert all((run / n / "sala_checkpoint.json").is_file() for n in names)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = start(tmp_path)
    wait_until(proc, lambda: last_step(run) >= 3)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75  # checkpointed after the preemption request: rerun to resume
    saved = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert saved and saved[-1] >= 3 and (run / f"checkpoint-{saved[-1]}" / "sala_checkpoint.json").is_file()
    resumed = run_cli(*RUN, cwd=tmp_path)
    assert_ok(resumed)
    assert f"resuming from {run}/checkpoint-{saved[-1]}" in resumed.stdout
    assert sorted(train_losses(run)) == list(range(1, 15))
    # The tied output head is stored once (with the embeddings): not a missing key worth a warning.
    assert "missing keys" not in resumed.stdout + resumed.stderr


def test_a_killed_training_process_is_said_by_its_launcher(tmp_path):
    """The runner cannot say it was killed (the kernel's out-of-memory killer sends SIGKILL): the
    launcher, which waited for it, says so, and exits as a shell would (128+9)."""
    run = tmp_path / "run"
    argv = [str(Path(sys.executable).parent / RUN[0]), *RUN[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen(argv, cwd=tmp_path, stderr=err, stdout=subprocess.DEVNULL, env=env, text=True)
        wait_until(proc, lambda: last_step(run) >= 2)
        (runner,) = runner_pids(proc)
        os.kill(int(runner), signal.SIGKILL)
        assert proc.wait(timeout=60) == 137
    stderr = (tmp_path / "err.txt").read_text()
    assert stderr.rstrip().endswith("sala-train: the training process was killed by SIGKILL (out of memory?)"), stderr
    assert json.loads((run / "status.json").read_text()) == {"status": "failed", "exit_code": 137}


def test_a_stop_between_logging_steps_logs_the_loss_of_the_steps_since_the_last_log(tmp_path):
    """Stopped at step s between logs, the steps since the last log would never be logged: the
    resumed run's first record averages only its own steps. With logging_steps past max_steps,
    the only train records before the end are the first step's and the stop's."""
    from sala_train.launch.plan import PREEMPT_REQUEST

    run = tmp_path / "run"
    argv = (*RUN[:5], "train.logging_steps=100", *RUN[6:])
    proc = start(tmp_path, argv)
    wait_until(proc, lambda: (run / "checkpoint-2" / "sala_checkpoint.json").is_file())
    (run / PREEMPT_REQUEST).touch()
    assert proc.wait(timeout=120) == 75
    saved = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))  # the step it stopped at
    # (the first step is logged too: logging_first_step)
    assert 2 <= saved < 14 and [r["step"] for r in metrics(run) if r["event"] == "train"] == [1, saved]


def test_a_second_command_in_a_run_directory_being_trained_is_refused(tmp_path):
    """Both would train, resume from each other's checkpoints and interleave metrics.jsonl."""
    run = tmp_path / "run"
    # Long enough not to end while the second command starts (14 steps did, on a loaded machine).
    argv = tuple(a.replace("max_steps=14", "max_steps=100000") for a in RUN)
    proc = start(tmp_path, argv)
    try:
        wait_until(proc, lambda: last_step(run) >= 2)
        pid = json.loads((run / "status.json").read_text())["pid"]
        records = {path.name: path.read_bytes() for path in (run / ".hydra").iterdir()}
        second = run_cli(*argv, "train.resume=auto", cwd=tmp_path)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert f"{run} is being trained now by process {pid} on this machine" in second.stderr
        assert proc.poll() is None  # the first one trains on
        # (the refused command's overrides were left in .hydra/, which sala-report reads as the run's)
        assert {path.name: path.read_bytes() for path in (run / ".hydra").iterdir()} == records
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)


def test_a_stop_signal_while_the_runner_starts_up_ends_it_before_the_first_step(tmp_path):
    """Signalled while it imports and loads (seconds to minutes), the runner must not die of the
    signal, nor train a step and write a checkpoint of what the next run starts from anyway: it
    ends before its first step, preempted (exit 75), and the same command again trains the run."""
    run = tmp_path / "run"
    proc = start(tmp_path, stderr=subprocess.PIPE)

    wait_until(proc, lambda: bool(runner_pids(proc)))
    # Its handler is in place within a fraction of a second; its first step is far off (imports alone take longer).
    time.sleep(2)
    assert last_step(run) == 0
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75
    # (said when asked: a large data set's tokenizing went on in silence)
    assert err.count("sala-train: stopping as asked, before the first step, once what is being prepared") == 1
    assert json.loads((run / "status.json").read_text())["status"] == "preempted"
    assert not list(run.glob("checkpoint-*")) and not (run / "metrics.jsonl").exists()
    again = run_cli(*RUN, cwd=tmp_path)
    assert_ok(again)
    assert "resuming" not in again.stdout + again.stderr and (run / "final").is_dir()
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


def test_a_stop_signal_ends_a_sweep_and_the_rerun_resumes_it(tmp_path):
    """The signal is for the whole command: job 1 checkpoints, job 2 never starts, exit 75; the
    same command again skips job 0 (complete), resumes job 1 from its checkpoint, runs job 2, and
    its summary counts all three."""
    sweep = tmp_path / "sweep"
    argv = ["sala-train", "-m", "train.learning_rate=1e-4,2e-4,3e-4", "hydra.sweep.dir=sweep",
            *(a for a in RUN[1:] if not a.startswith("hydra."))]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen([str(Path(sys.executable).parent / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=err, text=True)  # fmt: skip
        wait_until(proc, lambda: last_step(sweep / "1") >= 3)
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    stderr = (tmp_path / "err.txt").read_text()
    assert code == 75 and "Traceback" not in stderr, stderr[-3000:]
    assert f"sala-train: sweep stopped on a signal at job 1 ({sweep}/1); rerun the same command" in stderr
    assert json.loads((sweep / "1" / "status.json").read_text())["status"] == "preempted"
    assert not (sweep / "2").exists()  # the next job never started
    saved = max(int(p.parent.name.split("-")[1]) for p in (sweep / "1").glob("checkpoint-*/sala_checkpoint.json"))

    resumed = run_cli(*argv, cwd=tmp_path)
    assert_ok(resumed)
    assert f"{sweep}/0 is already complete" in resumed.stdout
    assert f"resuming from {sweep}/1/checkpoint-{saved}" in resumed.stdout
    assert "sala-train: sweep sweep: 3 completed." in resumed.stdout
    for job in ("0", "1", "2"):
        assert sorted(train_losses(sweep / job)) == list(range(1, 15))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_between_two_sweep_jobs_ends_the_sweep(tmp_path, signum):
    """Sent as job 1 is set up (Hydra has made its directory; no runner yet, or just started): no
    death by the signal, no traceback, no job 2; exit 75. Ctrl-C's sweep has the default
    directory, named by the clock: the message names it, as the same command alone would not."""
    named = signum == signal.SIGTERM
    argv = ["sala-train", "-m", "train.seed=1,2,3", *(["hydra.sweep.dir=sweep"] if named else []), "train.max_steps=2",
            "train.eval_steps=2", "train.save_steps=2"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen([str(Path(sys.executable).parent / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=err, text=True)  # fmt: skip
        wait_until(proc, lambda: any(tmp_path.glob("sweep/1/.hydra" if named else "multirun/*/*/1/.hydra")))
        os.kill(proc.pid, signum)
        code = proc.wait(timeout=120)
    sweep = tmp_path / "sweep" if named else next(tmp_path.glob("multirun/*/*"))
    stderr = (tmp_path / "err.txt").read_text()
    assert code == 75 and "Traceback" not in stderr, stderr[-3000:]
    assert "sala-train: sweep stopped on a signal" in stderr
    assert ("rerun the same command to resume it" if named
            else f"rerun the same command with hydra.sweep.dir={sweep} to resume it") in stderr  # fmt: skip
    assert json.loads((sweep / "0" / "status.json").read_text())["status"] == "completed"
    assert not (sweep / "2").exists()


def test_a_stopped_search_leaves_no_trial_of_its_stored_study_running(tmp_path):
    """The stop ends the search from inside its job, so Hydra's sweeper never told Optuna how that
    trial ended: a stored study kept it RUNNING for good, and "rerun the same command" drew the
    first trials again (the same sampler seed) and reported their jobs twice."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    argv = ["sala-train", "hparams_search=lora_optuna", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}",
            "hydra.sweep.dir=sweep", "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen([str(Path(sys.executable).parent / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=err, text=True)  # fmt: skip
        wait_until(proc, lambda: any(tmp_path.glob("sweep/1/.hydra")))
        # Another worker of the stored study has a trial running: not this search's to end.
        optuna.load_study(study_name="sala-train-lora", storage=storage).ask()
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    stderr = (tmp_path / "err.txt").read_text()
    assert code == 75 and "Traceback" not in stderr, stderr[-3000:]
    assert (f"the study in {storage} keeps its completed trials (the stopped one is marked failed); continue it "
            "with a new hydra.sweep.dir and another hydra.sweeper.sampler.seed") in stderr  # fmt: skip
    study = optuna.load_study(study_name="sala-train-lora", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "RUNNING"]
    # The same command again drew the same trials (the same seed) and counted their jobs twice.
    again = subprocess.run([str(Path(sys.executable).parent / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert (f"sala-train: hydra.sweeper.storage={storage}: its study sala-train-lora holds 3 trials, and "
            f"{tmp_path / 'sweep'} the jobs of a search of it") in again.stderr  # fmt: skip
    assert len(optuna.load_study(study_name="sala-train-lora", storage=storage).trials) == 3


def test_a_search_whose_only_trial_was_preempted_exits_75(tmp_path):
    """The runner alone stopped (as a cluster stops one job): the trial is preempted, not failed,
    and the search, with nothing completed, exits 75 as a sweep of preempted jobs does (it exited
    1, "failed", to a requeue wrapper)."""
    argv = ["sala-train", "hparams_search=lora_optuna", "hydra.sweeper.n_trials=1", "hydra.sweep.dir=sweep",
            "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen([str(Path(sys.executable).parent / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=err, text=True)  # fmt: skip

        wait_until(proc, lambda: bool(runner_pids(proc)))
        os.kill(int(runner_pids(proc)[0]), signal.SIGTERM)
        code = proc.wait(timeout=120)
    stderr = (tmp_path / "err.txt").read_text()
    assert code == 75 and "Traceback" not in stderr, stderr[-3000:]
    assert "sala-train: no trial of the Optuna search completed: each was stopped on request" in stderr
    assert json.loads((tmp_path / "sweep" / "0" / "status.json").read_text())["status"] == "preempted"


def test_two_commands_started_at_once_in_one_directory_train_one_config(tmp_path):
    """Two commands started in the same second share a clock-named directory (here named, to start
    them together): both trained there, one with the other's config, and both said saved."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = str(Path(sys.executable).parent / "sala-train")
    procs = {lr: subprocess.Popen([script, f"train.learning_rate={lr}", "train.max_steps=4", "train.eval_steps=4",
                                   "train.save_steps=4", "hydra.run.dir=run"], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for lr in ("0.001", "0.005")}  # fmt: skip
    outcomes = {lr: (proc.wait(timeout=300), proc.stderr.read()) for lr, proc in procs.items()}
    assert sorted(code for code, _ in outcomes.values()) == [0, 2], outcomes
    (winner,) = (lr for lr, (code, _) in outcomes.items() if code == 0)
    (loser,) = (err for code, err in outcomes.values() if code == 2)
    assert ("is in use by" in loser or "is being trained now by" in loser) and "Traceback" not in loser, loser
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"learning_rate: {winner}" in config and read_status(tmp_path / "run") == "completed"
    assert not (tmp_path / "run" / ".sala_claim").exists()


def test_a_sweep_whose_job_was_preempted_exits_75_and_says_so(tmp_path):
    """Only job 0's runner is signalled (the sweep goes on): it checkpoints, job 1 completes, and
    the command exits 75, not 0 (job 0 has no final/), with job 0 called preempted, not failed."""
    sweep = tmp_path / "sweep"
    argv = ["sala-train", "-m", "train.seed=1,2", "hydra.sweep.dir=sweep", *RUN[2:-1]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (tmp_path / "out.txt").open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        wait_until(proc, lambda: last_step(sweep / "0") >= 1)
        (runner,) = runner_pids(proc)
        os.kill(int(runner), signal.SIGTERM)
        code = proc.wait(timeout=240)
    output = (tmp_path / "out.txt").read_text()
    assert code == 75 and "Traceback" not in output, output[-3000:]
    assert f"sala-train: job 0 preempted (stopped on request; rerun to resume) with exit code 75: {sweep}/0" in output
    assert ("sala-train: sweep sweep: 1 completed, 1 preempted; preempted: job 0 (stopped on request; the same "
            "command again resumes them, from their last checkpoint if they saved one)") in output  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "Ctrl-C"])
def test_a_stop_signal_checkpoints_every_rank_of_a_multi_process_run(tmp_path, signum):
    """The launcher asks the ranks through the stop file; signalled itself, torchrun would die of
    SIGUSR1 and leave its workers training, or give them 30 s before killing them."""
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [str(Path(sys.executable).parent / RUN[0]), *RUN[1:], "backend=ddp", "launcher.nproc_per_node=2",
            "train.max_steps=200"]  # fmt: skip
    with (tmp_path / "out.txt").open("w") as out, (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, start_new_session=True, stdout=out, stderr=err,
                                text=True)  # fmt: skip
        wait_until(proc, lambda: last_step(run) >= 3)
        os.kill(proc.pid, signum)
        code = proc.wait(timeout=120)
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert code == 75, stderr[-3000:]
    assert "sala-train: preempted; checkpoint-" in stdout and "Traceback" not in stderr, stderr[-3000:]
    assert "killed by" not in stderr  # no rank cut short by the SIGTERM torchrun sends once one has exited
    assert "exited with code 75" not in stderr  # a stop at a checkpoint, as asked: not told like a failure
    saved = max(int(p.parent.name.split("-")[1]) for p in run.glob("checkpoint-*/sala_checkpoint.json"))
    assert 3 <= saved < 200 and json.loads((run / "status.json").read_text())["status"] == "preempted"
    workers = subprocess.run(["pgrep", "-f", f"sala_train.runner {run}"], capture_output=True, text=True).stdout
    assert workers == ""  # none left training


@pytest.mark.parametrize("ranks", [1, 2], ids=["one process", "ddp"])
def test_a_killed_launcher_takes_its_runner_down_with_a_checkpoint(tmp_path, ranks):
    """One process gets SIGTERM from the kernel when its launcher dies; torchrun (which would stop
    its workers on that signal without a checkpoint) instead sees the launcher go and asks the
    ranks through the stop file."""
    run = tmp_path / "run"
    if ranks == 1:
        proc = start(tmp_path)
    else:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        argv = [str(Path(sys.executable).parent / RUN[0]), *RUN[1:], "backend=ddp", "launcher.nproc_per_node=2",
                "train.max_steps=200"]  # fmt: skip
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
    wait_until(proc, lambda: last_step(run) >= 3)
    (runner,) = runner_pids(proc)
    os.kill(proc.pid, signal.SIGKILL)  # only the launcher
    deadline = time.monotonic() + 120
    while Path(f"/proc/{runner}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{runner}").exists(), "the runner outlived its launcher"
    assert any(run.glob("checkpoint-*/sala_checkpoint.json"))  # it checkpointed on the way out
    assert json.loads((run / "status.json").read_text())["status"] == "preempted"  # rank 0 said so
    workers = subprocess.run(["pgrep", "-f", f"sala_train.runner {run}"], capture_output=True, text=True).stdout
    assert workers == ""


@pytest.fixture
def small_disk(tmp_path):
    """A real 2.6 MB filesystem (tmpfs): room for the run and one tiny LoRA checkpoint (1.6 MB),
    not for a second. Mounting needs root, which the CI machines give."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_stops_with_one_message_and_the_rerun_resumes(tmp_path, small_disk):
    """The disk fills while checkpoint-6 is written (torch.save reports it as a RuntimeError with no
    errno): one message naming the intact checkpoint, exit 2, no traceback, the half-written
    checkpoint gone; after space is freed, the same command resumes from checkpoint-3 and finishes."""
    run = ("sala-train", f"hydra.run.dir={small_disk / 'run'}", "train.max_steps=6", "train.save_steps=3",
           "train.eval_steps=3", "train.logging_steps=1")  # fmt: skip
    full = run_cli(*run, cwd=tmp_path)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert f"no room to write in {small_disk / 'run'} (the disk is full, a quota is reached, or a file is past the " \
           "file-size limit, ulimit -f) (removed the half-written checkpoint-6); the newest complete checkpoint, " \
           "checkpoint-3, is intact" in full.stderr  # fmt: skip
    assert sorted(p.name for p in (small_disk / "run").glob("checkpoint-*")) == ["checkpoint-3"]
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    resumed = run_cli(*run, cwd=tmp_path)
    assert_ok(resumed)
    assert f"resuming from {small_disk / 'run' / 'checkpoint-3'}" in resumed.stdout
    assert [r["step"] for r in metrics(small_disk / "run") if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert (small_disk / "run" / "final" / "adapter_model.safetensors").is_file()


def test_a_run_directory_turned_read_only_mid_run_stops_with_one_message(tmp_path, small_disk):
    """A storage fault remounts the file system read-only: the runner's next write to the run
    directory failed (EROFS) in three chained tracebacks, runner and launcher, `status.json` left
    `running`. Now one message naming the checkpoint a rerun resumes from, exit 2; writable again,
    the same command resumes."""
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    run = small_disk / "run"
    argv = ("sala-train", f"hydra.run.dir={run}", "train.max_steps=300", "train.save_steps=5", "train.eval_steps=1000",
            "train.logging_steps=1")  # fmt: skip
    proc = subprocess.Popen([str(Path(sys.executable).parent / argv[0]), *argv[1:]], cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_until(proc, lambda: (run / "checkpoint-5" / "sala_checkpoint.json").is_file())
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    _, err = proc.communicate(timeout=300)
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert f"sala-train: {run} is on a read-only file system now, so the run cannot go on writing there; the " \
           "newest complete checkpoint, checkpoint-" in err  # fmt: skip
    assert err.count("read-only file system now") == 1
    newest = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if (p / "sala_checkpoint.json").is_file())
    resumed = run_cli(*argv[:2], f"train.max_steps={newest + 1}", f"train.resume={run / f'checkpoint-{newest}'}",
                      *argv[3:], cwd=tmp_path)  # fmt: skip
    assert_ok(resumed)
    assert f"resuming from {run / f'checkpoint-{newest}'}" in resumed.stdout


def test_a_file_past_the_file_size_limit_stops_as_a_full_disk_does(tmp_path):
    """``ulimit -f`` (as a quota, which leaves the disk showing free space) failed the optimizer
    state's write with torch's errno-less RuntimeError: a traceback, exit 1, `failed`, and the
    half-written checkpoint left behind. Now the full-disk message and exit 2."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))  # (the full model's Adam state is 3.4 MB)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [str(Path(sys.executable).parent / "sala-train"), "method=full", "train.max_steps=4", "train.save_steps=2",
            "train.eval_steps=100", "hydra.run.dir=run"]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, preexec_fn=limited, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = (f"no room to write in {tmp_path / 'run'} (the disk is full, a quota is reached, or a file is past the "
            "file-size limit, ulimit -f) (removed the half-written checkpoint-2); no checkpoint was kept")  # fmt: skip
    assert said in proc.stderr
    assert not list(tmp_path.glob("run/checkpoint-*"))


def test_a_full_disk_after_final_is_saved_keeps_final(tmp_path):
    """The disk fills on a write after final/ is complete (here the loss plot): the run stops with
    the full-disk message, and the complete final/ stays (it was removed as "half-written")."""
    import errno
    import os
    import sys

    from tests.conftest import run_cli

    assert_ok(run_cli("sala-train", "hydra.run.dir=run", "train.max_steps=2", "launcher.dry_run=true", cwd=tmp_path))
    full_at_the_plot = (
        "import errno, sys\n"
        "import sala_train.plots as plots\n"
        "def plot(run_dir):\n"
        f"    raise OSError({errno.ENOSPC}, 'No space left on device', str(run_dir / 'loss.png'))\n"
        "plots.plot_losses = plot\n"
        "from sala_train.runner import main\n"
        "main([sys.argv[1]])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", full_at_the_plot, str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2 and "no room to write in" in proc.stderr, proc.stderr[-2000:]
    assert "half-written final" not in proc.stderr
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_a_disk_filling_while_final_is_written_stops_with_one_message(tmp_path, small_disk):
    """safetensors reports a full disk as its own SafetensorError (neither OSError nor
    RuntimeError): it was a traceback, exit 1, and a final/ holding a README alone. Now one message,
    exit 2, the half-written final/ gone, checkpoint-2 intact; with space again the rerun saves final/."""
    subprocess.run(["mount", "-o", "remount,size=2000k", str(small_disk)], check=True)  # the checkpoint fits
    run = ("sala-train", f"hydra.run.dir={small_disk / 'run'}", "train.max_steps=2")
    full = run_cli(*run, cwd=tmp_path)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "(removed the half-written final); the newest complete checkpoint, checkpoint-2, is intact" in full.stderr
    assert not (small_disk / "run" / "final").exists()
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    assert_ok(run_cli(*run, cwd=tmp_path))
    assert (small_disk / "run" / "final" / "adapter_model.safetensors").is_file()


def test_a_run_whose_reader_left_trains_on_to_its_end(tmp_path):
    """`sala-train ... 2>&1 | head -3`: the run died at its next progress line (Python's
    BrokenPipeError), exit 1 and `failed`, losing the steps since its last checkpoint. What is still
    to be said goes nowhere; two processes under torchrun too."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = str(Path(sys.executable).parent / "sala-train")
    for run, extra in (("single", ()), ("ddp", ("backend=ddp", "launcher.nproc_per_node=2"))):
        argv = [script, *extra, "train.max_steps=6", "train.save_steps=3", "train.logging_steps=1",
                f"hydra.run.dir={run}"]  # fmt: skip
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for _ in range(3):  # (as head -3 reads, then leaves)
            proc.stdout.readline()
        proc.stdout.close()
        assert proc.wait(timeout=300) == 0, run
        assert read_status(tmp_path / run) == "completed" and (tmp_path / run / "final").is_dir()
        assert [r["step"] for r in metrics(tmp_path / run) if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_run_whose_terminal_hung_up_checkpoints_and_stops(tmp_path, ranks):
    """The terminal window closed or the SSH session dropped mid-run: the launcher died of SIGHUP,
    and its runner's next line to the gone terminal failed (EIO), exit 1 and `failed`, with no
    checkpoint. Now the hang-up is a stop request as SIGTERM is: a checkpoint, exit 75,
    `preempted`, and the rerun resumes. (A real terminal: a pseudo-terminal whose end is closed.)"""
    import fcntl
    import select
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # (a progress bar is drawn)

    def on_the_terminal() -> None:  # (a session whose controlling terminal it is, as a login shell's)
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    extra = ["backend=ddp", f"launcher.nproc_per_node={ranks}"] if ranks > 1 else []
    args = [*extra, "train.save_steps=1000", "train.eval_steps=1000", "train.eval_on_start=false", "hydra.run.dir=run"]
    script = str(Path(sys.executable).parent / "sala-train")
    proc = subprocess.Popen([script, *args, "train.max_steps=400"], cwd=tmp_path, env=env, stdin=slave, stdout=slave,
                            stderr=slave, preexec_fn=on_the_terminal)  # fmt: skip
    os.close(slave)
    run = tmp_path / "run"
    deadline = time.monotonic() + 240
    while last_step(run) < 10:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended, or never reached step 10"
        while select.select([master], [], [], 0.01)[0]:  # (read what it writes: a full terminal would block it)
            try:
                os.read(master, 65536)
            except OSError:
                break
    os.close(master)  # the terminal hangs up
    assert proc.wait(timeout=300) == 75
    assert read_status(run) == "preempted"
    (checkpoint,) = run.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert step >= 10 and (checkpoint / "sala_checkpoint.json").is_file()
    resumed = run_cli("sala-train", *args, f"train.max_steps={step + 2}", f"train.resume={checkpoint}", cwd=tmp_path)
    assert_ok(resumed)
    assert f"resuming from {checkpoint}" in resumed.stdout
