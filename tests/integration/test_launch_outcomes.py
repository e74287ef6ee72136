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
