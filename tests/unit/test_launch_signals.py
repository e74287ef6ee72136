"""Stop requests around the moment the local launcher starts the training process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from sala_train.launch import local
from sala_train.launch.plan import LaunchPlan

# A child that reports how it ended: 7 if its SIGTERM handler ran, 0 if it slept on undisturbed.
CHILD = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
    "held = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
    "print('held' if held else 'open', flush=True)\n"
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})\n"
    "time.sleep(30)\n"
)


def test_a_ctrl_c_while_the_child_is_started_reaches_it(monkeypatch, capfd):
    """Ctrl-C that lands while the runner is being forked: it was a KeyboardInterrupt (which
    Python's fork hooks can swallow, and the run trained to its end); now it is held, and forwarded
    as the stop request (SIGTERM) once the child exists. The child starts with its stop signals held
    until it has a handler: one sent before that killed the interpreter, a run recorded as failed."""
    assert threading.current_thread() is threading.main_thread()
    real_popen = subprocess.Popen

    def popen_under_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered here, before the child exists
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(local.subprocess, "Popen", popen_under_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    code = local.run_local(LaunchPlan(argv=(sys.executable, "-c", CHILD)))
    assert code == 7 and capfd.readouterr().out == "held\n"
    assert signal.getsignal(signal.SIGINT) is before
    assert local.stop_requested()
    monkeypatch.setattr(local, "_stop_requested", False)


def _runner_started_with_pending(tmp_path: Path, signals: tuple[str, ...]) -> subprocess.CompletedProcess:
    """The runner of a prepared run, started with ``signals`` held and pending, in that order (as
    the launcher hands a stop request over while it starts)."""
    from tests.conftest import run_cli

    prepared = run_cli("sala-train", "hydra.run.dir=run", "train.max_steps=3", "launcher.dry_run=true", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    held = ", ".join(f"signal.{name}" for name in signals)
    starts_held = (
        "import os, signal, sys\n"
        f"signal.pthread_sigmask(signal.SIG_BLOCK, {{{held}}})\n"
        + "".join(f"os.kill(os.getpid(), signal.{name})\n" for name in signals)
        + "from sala_train.runner import main\n"
        "main([sys.argv[1]])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", starts_held, str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_a_stop_request_held_while_the_runner_started_stops_it_before_its_first_step(tmp_path):
    """The runner started with SIGTERM held and one pending (as the launcher hands it over): its
    handler gets it, so it ends before training (once its data is prepared), recorded as preempted."""
    import json

    proc = _runner_started_with_pending(tmp_path, ("SIGTERM",))
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "preempted"
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    assert (
        "sala-train: stopped as asked, before the first step: nothing trained, no checkpoint saved; the same "
        "command again starts it" in proc.stdout + proc.stderr
    )


def test_every_stop_signal_reaches_a_single_runner_as_sigterm(tmp_path, capfd):
    """SIGUSR1 (SLURM's warning) was passed on as it was, so a second one ended the runner with
    138, not the 143 the README gives for a second signal of any kind."""
    import time

    ready = tmp_path / "ready"
    child = (
        "import pathlib, signal, sys, time\n"
        "for sig in (signal.SIGTERM, signal.SIGUSR1):\n"
        "    signal.signal(sig, lambda n, f: (print(n, flush=True), sys.exit(0)))\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGUSR1})\n"  # (held so far)
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(30)\n"
    )

    main = threading.main_thread().ident
    assert main is not None

    def signal_when_ready() -> None:
        while not ready.exists():
            time.sleep(0.01)
        signal.pthread_kill(main, signal.SIGUSR1)  # (to the thread waiting for the child, as a lone launcher)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    try:
        assert local.run_local(LaunchPlan(argv=(sys.executable, "-c", child))) == 0
    finally:
        local._stop_requested = False
    assert capfd.readouterr().out == f"{int(signal.SIGTERM)}\n"


def test_ctrl_c_while_a_command_imports_is_one_line_and_130(capsys):
    """Importing a command takes about a second, before its own Ctrl-C guard exists: a Ctrl-C
    there was a KeyboardInterrupt traceback and death by SIGINT (seen at 0.4 s). The console
    scripts are the guarded entry points."""
    from pathlib import Path

    import pytest
    import tomllib

    from sala_train import entry

    def importing() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        entry._guarded("sala-train", importing)  # type: ignore[arg-type]
    assert exited.value.code == 130 and capsys.readouterr().err == "sala-train: interrupted\n"
    scripts = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert {target.split(":")[0] for target in scripts.values()} == {"sala_train.entry"}
    assert {getattr(entry, target.split(":")[1]) for target in scripts.values()} == {
        entry.train,
        entry.data,
        entry.report,
        entry.export,
    }


def test_a_second_stop_signal_ends_the_runner_at_once_and_says_so(tmp_path):
    """The second of two stop requests ended the runner with 143 and not a word (status failed,
    no line in the log to say why). Both arrive while it starts: SIGUSR1, then SIGTERM."""
    proc = _runner_started_with_pending(tmp_path, ("SIGUSR1", "SIGTERM"))
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.count("sala-train: a second stop signal (SIGTERM): stopped at once, without a checkpoint; "
                             "rerun the same command to resume from the last one\n") == 1  # fmt: skip
    # Another rank of the same run says nothing: rank 0's line is the one.
    quiet = subprocess.run([sys.executable, "-c", "from sala_train.launch.plan import stop_at_once; stop_at_once(15)"],
                           env={**os.environ, "RANK": "1"}, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert quiet.returncode == 143 and quiet.stderr == ""


def test_a_second_stop_signal_is_not_held_up_by_a_full_stderr_pipe():
    """Its line was written with a blocking write: with stderr a full pipe nobody reads (a stalled
    `| tee`), the stop "at once" hung there."""
    child = (
        "import os\n"
        "from sala_train.launch.plan import stop_at_once\n"
        "os.set_blocking(2, False)\n"
        "try:\n"
        "    while True:\n"
        "        os.write(2, b'x' * 4096)\n"
        "except BlockingIOError:\n"
        "    pass\n"
        "os.set_blocking(2, True)\n"
        "stop_at_once(15)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stderr=subprocess.PIPE)  # (never read)
    try:
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
        proc.wait()
