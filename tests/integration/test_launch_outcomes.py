"""What a launch leaves behind and reports when it cannot train: bad input with a run directory that
already held the user's files, several processes, nodes started by hand, and a finished run rerun."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.integration.test_cli import assert_ok

pytestmark = pytest.mark.slow

BAD_ORDER = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}]}


def bad_data(where: Path) -> list[str]:
    (where / "bad.jsonl").write_text(json.dumps(BAD_ORDER) + "\n")
    return ["dataset=messages", "dataset.train=[bad.jsonl]", "dataset.validation=[bad.jsonl]"]


def test_bad_input_removes_only_what_the_command_wrote(tmp_path):
    """`hydra.run.dir=.` is the user's own directory: a data error must not delete it."""
    data = bad_data(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli("sala-train", *data, "hydra.run.dir=.", cwd=tmp_path)
    assert proc.returncode == 2 and "roles out of order" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no config.yaml, .hydra/, provenance.json
    # A new directory (and the parents Hydra made for it) goes entirely.
    proc = run_cli("sala-train", *data, "hydra.run.dir=outputs/a/b", cwd=tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "outputs").exists()


def test_several_processes_report_a_data_problem_once_before_starting(tmp_path):
    proc = run_cli("sala-train", *bad_data(tmp_path), "backend=ddp", "launcher.nproc_per_node=2",
                   "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("bad.jsonl:1: roles out of order") == 1 and "torch.distributed" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_problem_only_the_ranks_find_is_still_exit_2(tmp_path):
    """The tiny model has no weights to load: each rank fails with a user error, and the launch says so
    in its own lines, not in torchrun's traceback and table of ranks."""
    proc = run_cli("sala-train", "model.from_scratch=false", "backend=ddp", "launcher.nproc_per_node=2",
                   "hydra.run.dir=run", "train.max_steps=2", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("cannot load the model") == 1  # both ranks met it; it is printed once
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert "closing signal" not in proc.stderr and "failed (exitcode" not in proc.stderr  # torchrun's own lines
    assert re.search(
        r"sala-train: rank \d \(local rank \d, pid \d+\) exited with code 2; its output is above", proc.stderr
    )
    assert proc.stderr.rstrip().endswith("sala-train: a rank stopped on the config or data problem printed above")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_a_node_waits_for_the_others_stops_it_at_once(tmp_path):
    """No rank exists while torchrun waits at the rendezvous, so nothing read the stop request: the
    node waited out the rendezvous (10 minutes) and failed, a second Ctrl-C ending it as killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from sala_train.report import read_status

    argv = [str(Path(sys.executable).parent / "sala-train"), "backend=ddp", "launcher=multinode", "launcher.nnodes=2",
            "launcher.master_addr=127.0.0.1", "launcher.master_port=29731", "hydra.run.dir=run"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while "launch.torchrun" not in subprocess.run(["ps", "-o", "args=", "--ppid", str(proc.pid)], text=True,
                                                  capture_output=True).stdout:  # fmt: skip
        assert proc.poll() is None and time.monotonic() < deadline, "torchrun never started"
        time.sleep(0.2)
    time.sleep(2)  # (waiting at the rendezvous)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err[-3000:]
    assert "sala-train: stopped as asked while this node waited for the other nodes" in err and "Traceback" not in err
    assert read_status(tmp_path / "run") == "preempted"


def test_nodes_started_by_hand_need_one_run_directory_and_dry_runs_write_what_they_print(tmp_path):
    multinode = ("backend=ddp", "launcher=multinode", "launcher.nnodes=2", "launcher.master_addr=127.0.0.1")
    proc = run_cli("sala-train", *multinode, "launcher.node_rank=1", cwd=tmp_path)
    assert proc.returncode == 2 and "hydra.run.dir: launcher=multinode needs the same run directory" in proc.stderr
    assert not (tmp_path / "outputs").exists()
    # A sweep's jobs too (its directory named by the clock as well): each waited 10 minutes for the
    # other node, which had another rendezvous id, and failed.
    proc = run_cli("sala-train", "-m", *multinode, "launcher.node_rank=1", "train.learning_rate=1e-3,2e-3",
                   cwd=tmp_path, timeout=120)  # fmt: skip
    refusal = "hydra.sweep.dir: launcher=multinode needs the same sweep directory on every node"
    assert proc.stderr.count(refusal) == 2 and "refused: job 0, 1" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    # The SLURM dry run prints `sbatch SCRIPT`: the script is there to submit.
    proc = run_cli("sala-train", "backend=ddp", "launcher=slurm", "launcher.nnodes=2", "launcher.dry_run=true",
                   "hydra.run.dir=sl", cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    script = tmp_path / "sl" / "slurm" / "job.sbatch"
    assert f"sbatch --parsable {script}" in proc.stdout and script.read_text() in proc.stdout
    # A multinode dry run on a machine without GPUs (a login node), nproc_per_node left null: its
    # commands, pasted on GPU nodes, started one process each, and said nothing of it.
    counted = "# WARNING: launcher.nproc_per_node=null is counted from this machine's GPUs, and it has none: these " \
        "commands start 1 process per node; for GPU nodes set launcher.nproc_per_node=<GPUs per node>"  # fmt: skip
    for nproc, warned in ((), True), (("launcher.nproc_per_node=1",), False):
        proc = run_cli("sala-train", *multinode, "launcher.node_rank=0", "launcher.dry_run=true", *nproc,
                       f"hydra.run.dir=mn{len(nproc)}", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
        assert_ok(proc)
        assert (counted in proc.stdout) is warned and "--nproc_per_node 1 --node_rank 1" in proc.stdout
