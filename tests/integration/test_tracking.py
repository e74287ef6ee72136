"""Trackers (logger group) write real TensorBoard events and an offline W&B run; no secrets on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tests.integration.test_cli import assert_ok

pytestmark = pytest.mark.slow

TWO_STEPS = ("train.max_steps=2", "train.eval_steps=2", "train.save_steps=2", "train.logging_steps=1")
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B API key
FAKE_HF_TOKEN = "hf_sala_train_test_token_do_not_write_me"


def assert_secrets_absent(run_dir: Path, *outputs: str) -> None:
    for text in outputs:
        assert FAKE_KEY not in text and FAKE_HF_TOKEN not in text
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert FAKE_KEY.encode() not in data and FAKE_HF_TOKEN.encode() not in data, path


def test_a_resumed_run_logs_each_step_to_tensorboard_once(tmp_path):
    """TensorBoard events hold the losses and the config; a resumed run logs each step once."""
    args = ("sala-train", "logger=tensorboard", "hydra.run.dir=run", "train.max_steps=4", "train.eval_steps=2",
            "train.save_steps=2", "train.logging_steps=1")  # fmt: skip
    assert_ok(run_cli(*args, cwd=tmp_path))
    run = tmp_path / "run"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"train/loss", "eval/loss"} <= set(events.Tags()["scalars"])
    (config_text,) = events.Tensors("sala_train/config/text_summary")  # the resolved config
    assert b"cutoff_len" in config_text.tensor_proto.string_val[0]
    for lost in ("final", "checkpoint-4"):  # killed after logging steps 3-4, before their checkpoint
        shutil.rmtree(run / lost)
    (run / "status.json").unlink()
    assert_ok(run_cli(*args, cwd=tmp_path))
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 4]


def test_wandb_goes_offline_by_itself_and_keeps_secrets_out(tmp_path):
    env = {"WANDB_API_KEY": FAKE_KEY, "HF_TOKEN": FAKE_HF_TOKEN, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    proc = run_cli("sala-train", "logger=wandb", "logger.tags=[ci]", "hydra.run.dir=run", "method=full",
                   *TWO_STEPS, cwd=tmp_path, env=env)  # fmt: skip
    assert_ok(proc)
    run = tmp_path / "run"
    assert proc.stdout.count("wandb runs offline") == 1 and "127.0.0.1 is unreachable" in proc.stdout
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data = wandb_file.read_bytes()
    assert b"cutoff_len" in data  # the resolved config
    assert b"eval/loss" in data and b"train/loss" in data  # the metrics
    logger = yaml.safe_load((run / "config.yaml").read_text())["logger"]
    assert logger["run_name"] == (
        "logger.tags=[ci],logger=wandb,method=full,train.eval_steps=2,train.logging_steps=1,train.max_steps=2,train.save_steps=2"
    )
    assert_secrets_absent(run, proc.stdout, proc.stderr)
    # The name leaves out what a rerun may add, and a rerun worded differently (the tiny model's
    # own learning rate, spelt out) is the same run: no "holds a run of a different config".
    for neutral in ("train.resume=auto", "launcher.dry_run=true", "train.learning_rate=3e-3"):
        rerun = run_cli("sala-train", "logger=wandb", "logger.tags=[ci]", "hydra.run.dir=run", "method=full",
                        *TWO_STEPS, neutral, cwd=tmp_path, env=env)  # fmt: skip
        assert_ok(rerun)
    # The W&B run is the run directory's own (a random id its first session made), and ended
    # with the run's exit code.
    run_id = (run / "wandb" / "sala_run_id").read_text().strip()
    assert wandb_records(run) == [("run", run_id), ("exit", 0)]


def wandb_records(run_dir: Path) -> list[tuple[str, object]]:
    """The run id and exit code records of a run directory's offline W&B runs, in order. (W&B
    writes them in its own framing: 32 KiB blocks of CRC, length, type-prefixed chunks.)"""
    import struct

    from wandb.proto import wandb_internal_pb2

    found: list[tuple[str, object]] = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        while pos < len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0 and length == 0:
                pos += left
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                which = record.WhichOneof("record_type")
                if which == "run":
                    found.append(("run", record.run.run_id))
                elif which == "exit":
                    found.append(("exit", record.exit.exit_code))
    return found


def test_wandb_starts_after_the_checks_and_ends_with_the_runs_exit_code(tmp_path):
    """A run refused for its data opens no W&B run (online, a crashed run on the server); a
    diverged run's W&B run ends with exit code 1 (it said 0, "finished")."""
    env = {"WANDB_MODE": "offline"}
    refused = run_cli("sala-train", "logger=wandb", "hydra.run.dir=refused", "dataset.cutoff_len=8", *TWO_STEPS,
                      cwd=tmp_path, env=env)  # fmt: skip
    assert refused.returncode == 2 and "wandb runs offline" not in refused.stdout, refused.stdout
    diverged = run_cli("sala-train", "logger=wandb", "hydra.run.dir=diverged", "method=full", "train.max_steps=6",
                       "train.learning_rate=1e30", "train.warmup_steps=0", "train.max_grad_norm=0",
                       "train.logging_steps=1", "train.eval_steps=6", "train.save_steps=6",
                       cwd=tmp_path, env=env)  # fmt: skip
    assert diverged.returncode == 1 and "training diverged" in diverged.stderr
    records = wandb_records(tmp_path / "diverged")
    assert [kind for kind, _ in records] == ["run", "exit"] and records[1] == ("exit", 1)
    # Rerun, it starts over from step 0 (no checkpoint was saved): a W&B run of its own, not the
    # abandoned attempt's, into which it logged its steps 1, 2, ... again.
    again = run_cli("sala-train", "logger=wandb", "hydra.run.dir=diverged", "method=full", "train.max_steps=6",
                    "train.learning_rate=1e30", "train.warmup_steps=0", "train.max_grad_norm=0",
                    "train.logging_steps=1", "train.eval_steps=6", "train.save_steps=6",
                    cwd=tmp_path, env=env)  # fmt: skip
    assert again.returncode == 1, again.stderr[-2000:]
    runs = [run_id for kind, run_id in wandb_records(tmp_path / "diverged") if kind == "run"]
    assert len(runs) == 2 and runs[0] != runs[1], runs
    # W&B's own limits on names, which wandb.init raised as a traceback once the model had loaded.
    bad = run_cli("sala-train", "logger=wandb", "logger.project=team/proj", "hydra.run.dir=bad", *TWO_STEPS,
                  cwd=tmp_path, env=env)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert "logger.project='team/proj': a W&B project name contains /, which W&B refuses" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_wandb_online_without_a_key_is_refused_before_training(tmp_path):
    env = {"WANDB_API_KEY": "", "HOME": str(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}  # no key, no ~/.netrc
    proc = run_cli("sala-train", "logger=wandb", "logger.mode=online", "hydra.run.dir=run", cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "logger.mode=online: no W&B API key" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported  # refused by the launcher: no process started to find it


def test_a_w_and_b_server_on_plain_http_is_reachable_on_port_80():
    """WANDB_BASE_URL=http://host (a self-hosted server) was tried on port 443: said unreachable,
    and the run went offline."""
    import socket

    from sala_train.trackers import _reachable

    try:
        server = socket.create_server(("127.0.0.1", 80))
    except OSError:
        pytest.skip("cannot listen on port 80 here (needs root, and the port free)")
    with server:
        assert _reachable("http://127.0.0.1")
    assert not _reachable("http://127.0.0.1")


def test_a_file_where_the_tracker_writes_its_folder_is_one_message(tmp_path):
    """FileExistsError, a traceback and exit 1, once the model had loaded."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("notes")
    proc = run_cli("sala-train", "logger=tensorboard", "hydra.run.dir=run", *TWO_STEPS, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"logger=tensorboard: {tmp_path / 'run' / 'tensorboard'} is a file, where the tracker writes" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tensorboard"]
