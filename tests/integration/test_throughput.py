"""Packing through the real runner: the same training trajectory as padding; token budgets; the benchmark."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_CHAT, run_cli
from tests.integration.test_cli import assert_ok, metrics

pytestmark = pytest.mark.slow

SHORT = ("method=full", "train.max_steps=6", "train.eval_steps=3", "train.save_steps=6", "train.logging_steps=1")


def losses(run: Path) -> list[tuple[str, int, float]]:
    return [(r["event"], r["step"], r.get("loss", r.get("eval_loss"))) for r in metrics(run)
            if r["event"] not in ("summary", "start")]  # fmt: skip


def test_packed_training_follows_the_padded_trajectory(tmp_path):
    padded = run_cli("sala-train", *SHORT, "hydra.run.dir=padded", cwd=tmp_path)
    packed = run_cli("sala-train", *SHORT, "train.packing=true", "hydra.run.dir=packed", cwd=tmp_path)
    assert_ok(padded)
    assert_ok(packed)
    assert "sala-train: packing check passed" in packed.stdout
    expected, got = losses(tmp_path / "padded"), losses(tmp_path / "packed")
    assert [e[:2] for e in expected] == [g[:2] for g in got] and len(got) == 9  # eval at 0, 3, 6; train 1-6
    for (_, step, want), (_, _, have) in zip(expected, got, strict=True):
        assert have == pytest.approx(want, rel=1e-4), step  # same batches, same loss, same updates


def test_packed_runs_count_the_tokens_padded_runs_count_when_pad_is_eos(tmp_path):
    """A tokenizer with no pad token pads with EOS; the packed run's tokens seen (and so its
    tokens/s) must still be the padded run's, end-of-turn tokens included."""
    model = tmp_path / "tiny-chat-no-pad"
    shutil.copytree(TINY_CHAT, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"pad_token": None}))
    short = ("method=full", "train.max_steps=2", "train.logging_steps=1", "train.eval_on_start=false",
             "train.eval_steps=2", "train.save_steps=2", f"model.name_or_path={model}")  # fmt: skip
    assert_ok(run_cli("sala-train", *short, "hydra.run.dir=padded", cwd=tmp_path))
    assert_ok(run_cli("sala-train", *short, "train.packing=true", "hydra.run.dir=packed", cwd=tmp_path))
    seen = {run: [r["num_input_tokens_seen"] for r in metrics(tmp_path / run) if r["event"] == "train"]
            for run in ("padded", "packed")}  # fmt: skip
    assert len(seen["packed"]) == 2 and seen["packed"] == seen["padded"], seen


def test_token_budget_batches_stay_within_budget(tmp_path):
    proc = run_cli("sala-train", *SHORT, "train.packing=true", "train.max_tokens_per_batch=1024",
                   "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    seen = [r["num_input_tokens_seen"] for r in metrics(tmp_path / "run") if r["event"] == "train"]
    per_step = [b - a for a, b in zip([0, *seen], seen, strict=False)]
    assert len(per_step) == 6 and all(700 < n <= 1024 for n in per_step), per_step  # full, never over


def test_benchmark_smoke_mode_reports_every_layout(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--steps", "4", "--warmup", "1",
                           "--samples-per-step", "8", "--max-length", "1024", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["layout"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"guide", "padded", "packed"} and all(r["tokens_per_s"] > 0 for r in rows.values())
    # Every layout trains the same samples: the same real tokens in all, whatever the padding; the
    # measured steps (2-4 of 4) hold most of them.
    assert len({r["tokens_total"] for r in rows.values()}) == 1, rows
    assert all(r["tokens_total"] / 2 < r["tokens"] < r["tokens_total"] for r in rows.values()), rows
    assert re.search(r"^packed\s+[\d,]+\s+\d+\.\dx", proc.stdout, re.M) and re.search(
        r"^guide .* 1\.0x", proc.stdout, re.M
    )
    # (the guide's ratio owes most to its padding: said with the figures)
    mean = rows["guide"]["tokens_total"] / (8 * 4)
    assert f"samples of {mean:.0f} real tokens on average; the guide pads each to 1024 ({1024 / mean:.1f}x)" in (
        proc.stdout
    )
    # The guide runs without Liger, whose patches of transformers' Llama modules last the process.
    late = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--layouts", "packed,guide"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert late.returncode == 2 and "--layouts: guide comes first" in late.stderr


def test_batch_shapes_benchmark_smoke_mode(tmp_path):
    """The per-shape benchmark runs, batches with sala-train's collator, and rounds as asked."""
    out = tmp_path / "shapes.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "batch_shapes.py"), "--passes", "5",
                           "--multiple", "512", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["scenario"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["exact, new widths", "exact, widths met", "rounded to 512, new lengths"], rows
    assert all(r["tokens_per_s"] > 0 and r["passes"] == 5 for r in rows.values())
    assert rows["exact, new widths"]["distinct_widths"] == rows["exact, widths met"]["distinct_widths"] > 1
    assert rows["rounded to 512, new lengths"]["distinct_widths"] <= 4  # (lengths of at most 2048: 512, ..., 2048)
    assert re.search(r"^exact, new widths\s+[\d.]+\s+[\d,]+\s+1\.0x", proc.stdout, re.M), proc.stdout
