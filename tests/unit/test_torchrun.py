"""The launcher's torchrun: torchrun's own agent, but a failed worker is one line and its exit code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from sala_train.launch.torchrun import threads_per_worker

WORKER = """
import os, signal, sys, time
if os.environ["RANK"] == "1":
    print("rank 1 says what went wrong", file=sys.stderr, flush=True)
    how = sys.argv[1]
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(int(how))
time.sleep(60)  # rank 0 is still working when rank 1 fails: torchrun stops it
"""


def with_own_tmpdir(tmp_path) -> dict[str, str]:
    """An environment whose temporary files go to ``tmp_path/tmp``, for checking what is left there."""
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp")}


def torchrun(tmp_path, how: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    argv = [sys.executable, "-m", "sala_train.launch.torchrun", "--standalone", "--nproc_per_node", "2",
            str(script), how]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=with_own_tmpdir(tmp_path))


@pytest.mark.parametrize(
    ("how", "code", "said"), [("3", 3, "exited with code 3"), ("kill", 137, "was killed by SIGKILL")]
)
def test_a_failed_worker_is_one_line_and_its_own_exit_code(tmp_path, how, code, said):
    proc = torchrun(tmp_path, how)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "rank 1 says what went wrong" in proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr  # plain torchrun has both
    ours = [line for line in proc.stderr.splitlines() if line.startswith("sala-train: rank ")]
    assert len(ours) == 2 and ours[0].startswith("sala-train: rank 1 (local rank 1, pid ")
    assert ours[0].endswith(f"{said}; its output is above") or f"{said} (out of memory?); its output" in ours[0]
    assert ours[1].startswith("sala-train: rank 0 (local rank 0, pid ") and "was killed by SIGTERM" in ours[1]
    assert list((tmp_path / "tmp").iterdir()) == []  # torchrun's log folder (torchelastic_*) is not left behind


def test_workers_that_succeed_exit_0(tmp_path):
    script = tmp_path / "ok.py"
    script.write_text("import os; os.write(1, f\"hello from {os.environ['RANK']}\\n\".encode())\n")
    argv = [sys.executable, "-m", "sala_train.launch.torchrun", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=with_own_tmpdir(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("hello")) == [
        "hello from 0",
        "hello from 1",
    ]
    assert list((tmp_path / "tmp").iterdir()) == []  # torchrun's log folder (torchelastic_*) is not left behind


# One write per line: two workers' print() calls on one pipe can interleave mid-line.
THREADS = "import os; os.write(1, f\"threads {os.environ['RANK']} {os.environ['OMP_NUM_THREADS']}\\n\".encode())\n"


def test_threads_per_worker():
    assert [threads_per_worker(16, n) for n in (1, 2, 3, 8, 32)] == [16, 8, 5, 2, 1]


@pytest.mark.parametrize(
    ("affinity", "quota", "physical", "expected"),
    [(16, None, 16, 16), (16, None, 8, 8), (16, 4.0, 8, 2), (16, 2.5, 16, 3), (4, 64.0, 16, 4)],
)
def test_usable_cpus_are_the_affinity_capped_by_the_cgroup_in_physical_cores(
    monkeypatch, affinity, quota, physical, expected
):
    """A 16-thread machine: hyperthreads (8 cores) count once, a container's quota caps the count."""
    import psutil

    from sala_train import cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(cpus, "_cgroup_cpu_quota", lambda: quota)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else physical)
    assert cpus.usable_cpus() == expected


TASKSET = ["taskset", "-c", "0,1"]
HAS_TASKSET = shutil.which("taskset") is not None and {0, 1} <= os.sched_getaffinity(0)


@pytest.mark.skipif(not HAS_TASKSET, reason="needs taskset and CPUs 0 and 1")
@pytest.mark.parametrize(("workers", "given"), [(1, None), (2, None), (2, "5")])
def test_workers_share_the_cpus_they_may_use_unless_told(tmp_path, workers, given):
    """Two CPUs for the command (taskset): shared out among the workers; a user's value stays."""
    usable = subprocess.run([*TASKSET, sys.executable, "-c", USABLE], capture_output=True, text=True, check=True)
    expected = given or str(threads_per_worker(int(usable.stdout), workers))
    script = tmp_path / "threads.py"
    script.write_text(THREADS)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | (
        {"OMP_NUM_THREADS": given} if given else {}
    )
    argv = [*TASKSET, sys.executable, "-m", "sala_train.launch.torchrun", "--standalone",
            "--nproc_per_node", str(workers), str(script)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("threads"))
    assert lines == [f"threads {rank} {expected}" for rank in range(workers)]
    assert "Setting OMP_NUM_THREADS" not in proc.stderr  # torchrun's banner: it had nothing to set
    assert "WARNING" not in proc.stderr  # enough cores for the workers


@pytest.mark.skipif(not HAS_TASKSET, reason="needs taskset and CPU 0")
def test_fewer_cores_than_workers_is_said(tmp_path):
    """One CPU for two workers (a SLURM task given SLURM's default of one CPU): a warning, once."""
    script = tmp_path / "threads.py"
    script.write_text(THREADS)
    argv = ["taskset", "-c", "0", sys.executable, "-m", "sala_train.launch.torchrun", "--standalone",
            "--nproc_per_node", "2", str(script)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = "sala-train: WARNING: 2 workers share 1 usable CPU core(s) on this node"
    assert proc.stderr.count(warning) == 1 and "set launcher.cpus_per_task" in proc.stderr


USABLE = "from sala_train.launch.torchrun import usable_cpus; print(usable_cpus())"


def test_nodes_that_never_meet_are_one_line(tmp_path):
    """Node 1 of 2 alone: the rendezvous times out (here after 3 s, not torchrun's 600)."""
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('never started')\n")
    argv = [sys.executable, "-m", "sala_train.launch.torchrun", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:29791", "--rdzv_id", "alone",
            "--rdzv_conf", "join_timeout=3", str(script)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        proc.stderr.rstrip()
        .splitlines()[-1]
        .startswith("sala-train: the 2 nodes did not meet at 127.0.0.1:29791 (RendezvousTimeoutError)")
    )


ENDING_RANK = """
import atexit, sys, threading, time
from sala_train.process_exit import exit_without_teardown
atexit.register(lambda: print("atexit handler ran"))
class Teardown:
    def __del__(self):
        print("module teardown ran")
kept = Teardown()
def late_writer():
    time.sleep(0.5)
    print("thread joined;", end="")
threading.Thread(target=late_writer).start()
sys.stdout.write("buffered, no newline;")
exit_without_teardown(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])
"""


@pytest.mark.parametrize(("code", "status", "stderr"), [("7", 7, ""), ("0", 0, ""), ("a message", 1, "a message\n")])
def test_a_process_ends_without_the_interpreter_teardown(tmp_path, code, status, stderr):
    """The teardown is where gloo's worker threads, freeing tensors without the GIL, abort a run
    that had finished, and it cost every command up to 2 s. Skipping it must keep what a normal
    exit does: sys.exit's status (a message: printed, 1), non-daemon threads joined, buffered
    output and the atexit handlers, in that order."""
    script = tmp_path / "rank.py"
    script.write_text(ENDING_RANK)
    proc = subprocess.run([sys.executable, str(script), code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == status and proc.stderr == stderr, proc.stderr
    assert proc.stdout == "buffered, no newline;thread joined;atexit handler ran\n"  # no "module teardown ran"


BUFFERED_OUTPUT = """
import sys
from sala_train.process_exit import exit_without_teardown
sys.stdout.write("x" * 100)
exit_without_teardown(int(sys.argv[1]))
"""


@pytest.mark.parametrize("code", [0, 2])
def test_output_that_cannot_be_written_at_the_end_is_not_a_success(tmp_path, code):
    """Buffered output is written as the process ends: a full disk (``> /dev/full``) lost it
    with exit 0 and no word, and a reader that had left (``| true``) gave 0 instead of `cat`'s 141.
    A command that failed keeps its own code."""
    script = tmp_path / "out.py"
    script.write_text(BUFFERED_OUTPUT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (buffered, as in a plain shell)
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, str(script), str(code)], stdout=full, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=60)  # fmt: skip
    assert proc.returncode == (code or 120)
    assert proc.stderr == "out.py: output lost: [Errno 28] No space left on device\n"
    reader_left = subprocess.Popen([sys.executable, str(script), str(code)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert reader_left.stdout is not None
    reader_left.stdout.close()  # before it writes
    assert reader_left.wait(timeout=60) == (code or 141)
    assert reader_left.stderr is not None and reader_left.stderr.read() == ""


ENDING_TRACKED_RANK = """
import sys, wandb
from sala_train.process_exit import exit_without_teardown
wandb.init(mode="offline", dir=sys.argv[1], project="p")
exit_without_teardown(2)
"""


def test_a_rank_ending_without_the_teardown_gives_wandb_its_exit_code(tmp_path):
    """W&B takes a run's exit code from sys.exit, which the rank bypasses: a rank stopped on a
    damaged checkpoint (exit 2) showed as finished (0) in W&B."""
    from tests.integration.test_tracking import wandb_records

    script = tmp_path / "rank.py"
    script.write_text(ENDING_TRACKED_RANK)
    env = {**os.environ, "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert [record for record in wandb_records(tmp_path) if record[0] == "exit"] == [("exit", 2)]


def test_ranks_that_all_stopped_at_a_checkpoint_are_not_told_as_failures():
    """Exit 75 on every rank is a stop request honoured (rank 0 said "preempted; checkpoint-N"):
    no "rank R exited with code 75; its output is above" lines, which read like a crash."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from sala_train.launch.torchrun import describe

    def failed(*codes: int) -> ChildFailedError:
        return ChildFailedError("runner", {r: ProcessFailure(r, 100 + r, c, "<none>") for r, c in enumerate(codes)})

    assert describe(failed(75, 75)) == ([], 75)
    lines, code = describe(failed(75, 3))
    assert code in (75, 3) and any("rank 1 (local rank 1, pid 101) exited with code 3" in line for line in lines)


STOPPING_RANK = """
import os, pathlib, signal, sys, time
stop = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGUSR2, lambda *a: None)  # (the runner takes it as a stop request)
pathlib.Path(sys.argv[2] + os.environ["RANK"]).touch()
deadline = time.monotonic() + 60
while not stop.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(75 if stop.exists() else 1)
"""


def test_submitits_warning_leaves_the_agent_and_asks_the_ranks_to_stop(tmp_path):
    """SIGUSR2 (submitit's warning before a sweep job's time limit) reaches every process of the
    SLURM job; its default action killed torchrun's agent, leaving its ranks to stop for no one.
    The agent stays, touches the stop file the ranks look for, and reports their stop (exit 75)."""
    import signal
    import time

    script, stop, started = tmp_path / "rank.py", tmp_path / "stop", tmp_path / "started-"
    script.write_text(STOPPING_RANK)
    argv = [sys.executable, "-m", "sala_train.launch.torchrun", "--standalone", "--nproc_per_node", "2",
            str(script), str(stop), str(started)]  # fmt: skip
    agent = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**with_own_tmpdir(tmp_path), "SALA_TRAIN_STOP_FILE": str(stop)})  # fmt: skip
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"started-{rank}").exists() for rank in (0, 1)):
        assert time.monotonic() < deadline and agent.poll() is None, agent.communicate()
        time.sleep(0.05)
    agent.send_signal(signal.SIGUSR2)
    _, stderr = agent.communicate(timeout=60)
    assert stop.exists() and agent.returncode == 75, stderr[-2000:]


def test_the_rendezvous_probe_refuses_only_what_is_surely_not_a_rendezvous():
    """A real TCPStore (node 0 up: the other nodes' case, or a second node on one machine), a free
    port (node 0 not started yet) and a program that closes each connection (a tunnel whose far end
    is not up yet) pass: torchrun retries as it always did. A program that speaks first (an SSH
    server) is refused at once; one that stays silent, in seconds (the integration test)."""
    import datetime
    import socket
    import threading

    from torch._C._distributed_c10d import TCPStore

    from sala_train.config.typed import ConfigError
    from sala_train.launch.endpoint import check_rendezvous_endpoint

    def serving(reply: bytes | None) -> int:
        server = socket.create_server(("127.0.0.1", 0))

        def answer() -> None:
            while True:
                peer, _ = server.accept()
                if reply is None:
                    peer.close()
                else:
                    peer.sendall(reply)

        threading.Thread(target=answer, daemon=True).start()
        return server.getsockname()[1]

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30))
    check_rendezvous_endpoint("127.0.0.1", store.port)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        free = taken.getsockname()[1]
    check_rendezvous_endpoint("127.0.0.1", free)
    check_rendezvous_endpoint("127.0.0.1", serving(None))
    ssh = serving(b"SSH-2.0-OpenSSH_9.2\r\n")
    with pytest.raises(ConfigError, match=f"holds 127.0.0.1:{ssh} \\(it spoke first: 'SSH-2.0-OpenSSH_9.2'\\)"):
        check_rendezvous_endpoint("127.0.0.1", ssh)
